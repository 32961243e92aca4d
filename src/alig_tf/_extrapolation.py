"""Extrapolation around any Keras 3 optimizer: storage and glue around the core's procedure.

:func:`alig_core._extrapolation.extrapolation_step` decides everything (the phase, the
default ``lr_x``, the linearised loss, the skip, the next point); this module receives the
loss (as :class:`~alig_tf.AliG` does), computes the one squared gradient norm of the call,
runs the base optimizer's own ``apply`` from the anchor (:class:`_KerasBase`), draws the
noise and assigns what the core returns to optimizer variables. The phase is a variable,
so the core computes both phases of ``"gradient"`` mode and selects one: one traced step
serves every call under ``tf.function``, XLA and ``jax.jit``. The guide:
``docs/guides/keras.md``, "Extrapolation"; the rules: ``docs/extrapolation.md``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
from keras import ops

import alig_core
from alig_core import EXTRAPOLATION_MODES, ExtrapolationConfig
from alig_core._extrapolation import (
    ArrayLists,
    ExtrapolationState,
    current_anchor,
    extrapolation_step,
)
from alig_tf import _backend
from alig_tf._base import LossTakingOptimizer, loss_in
from alig_tf._optimizer import AliG

__all__ = ["EvaluateAtAnchor", "Extrapolation"]

_LOSS_HELP = (
    "Extrapolation around AliG needs the loss of every evaluation (ALI-G's step size and its "
    "default lr_x come from it). model.fit hands it over by itself on the TensorFlow and "
    "torch backends; on the JAX backend, add alig_tf.AliGTrainStep to your model's classes; "
    "in a custom loop call optimizer.apply(grads, variables, loss=loss) (or "
    "stateless_apply(..., loss=loss) on JAX)."
)

_REFUSED_BASE_OPTIONS: dict[str, str] = {
    "gradient_accumulation_steps": (
        "the base would step only on every k-th call, and the wrapper alternates on every "
        "call; accumulate in your loop and call the wrapper once per accumulated gradient"
    ),
    "loss_scale_factor": (
        "the wrapper would displace along the scaled gradients; train without loss scaling "
        "(mixed_bfloat16 needs none)"
    ),
    "use_ema": (
        "the base would average (and may overwrite the weights with) iterates the wrapper "
        "does not know of; average the anchors yourself, e.g. from anchor_params()"
    ),
}
"""Options of the base optimizer that would break the wrapper, and why (refused)."""

_SEED_BOUND = 2**31
"""Seeds are below this: TensorFlow's stateless generators take an int32 seed pair."""


def _config_code(mode: str, linearized: bool) -> int:
    """What the saved variables were made by: ``mode`` and ``linearized`` as one int."""
    return 2 * EXTRAPOLATION_MODES.index(mode) + int(linearized)


def _describe_code(code: int) -> str:
    mode = EXTRAPOLATION_MODES[code // 2] if 0 <= code // 2 < len(EXTRAPOLATION_MODES) else "?"
    return f"mode={mode!r}, linearized={bool(code % 2)}"


def _snapshot(variable: Any) -> Any:
    """The value a variable holds now, as a tensor that later assignments do not change.

    torch updates a variable's tensor in place (copied); TensorFlow reads it at this point;
    JAX has values (the scoped one inside ``stateless_apply`` too).
    """
    return ops.copy(_backend.value(variable))


class _KerasLists(ArrayLists):
    """The core's list operations; a skip keeps whole tensors (TensorFlow's scalar select)."""

    def keep(self, flag: Any, old: Sequence[Any], new: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(_backend.keep_if(flag, a, b) for a, b in zip(old, new, strict=True))


class _KerasBase:
    """The base optimizer as the core sees it (``ExtrapolationBase``), for one call.

    :meth:`run` writes the anchor into the variables, runs the base's own ``apply`` (an
    AliG on the given loss and ``S``: one norm per call) and keeps the base's variables
    before and after, for the wrapper to keep the old ones where the core says so.
    """

    def __init__(
        self, base: Any, grads: list[Any], variables: list[Any], dtype: str, assign: Any
    ) -> None:
        self.base, self.grads, self.variables, self.dtype = base, grads, variables, dtype
        self.assign = assign  # the wrapper's (Keras' optimizer assign)
        self.takes_loss = isinstance(base, AliG)
        # The learning rate (AliG: the cap) this call's step uses, read before it moves
        # anything (a schedule of the base's step count).
        self.learning_rate = _snapshot(base.learning_rate)
        self.old: list[Any] = []
        self.new: list[Any] = []

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        if self.takes_loss:  # AliG's own gamma, at the cap of this call
            return self.base._step_size(loss, sq_grad_norm, self.learning_rate).gamma
        return ops.cast(self.learning_rate, self.dtype)

    def run(
        self, anchor: tuple[Any, ...], loss: Any, sq_grad_norm: Any, skipped: Any
    ) -> tuple[tuple[Any, ...], Any]:
        base, variables = self.base, self.variables
        self.old = [_snapshot(v) for v in base.variables]
        for v, a in zip(variables, anchor, strict=True):
            self.assign(v, ops.cast(a, v.dtype))
        if self.takes_loss:
            step = base._apply_with_sq_grad_norm(self.grads, variables, loss, sq_grad_norm)
        else:
            base.apply(self.grads, variables)
            step = ops.cast(self.learning_rate, self.dtype)
        self.new = [_snapshot(v) for v in base.variables]
        return tuple(ops.cast(_snapshot(v), self.dtype) for v in variables), step


@keras.saving.register_keras_serializable(package="alig")
class Extrapolation(LossTakingOptimizer):
    r"""Extrapolated steps around any Keras optimizer (EXTRAP-SGD and relatives).

    Each iteration displaces the anchor :math:`w_t` by :math:`d_t`, evaluates the loss and
    the gradient at :math:`\tilde w_t = w_t + d_t`, and lets the base optimizer step from
    the anchor with that gradient:
    :math:`w_{t+1} = \mathrm{Base}\big(w_t,\ g(\tilde w_t)\big)`, with :math:`d_t =
    -\mathrm{lr_x}\, g(w_t)` (``"gradient"``, EXTRAP-SGD: two calls per iteration, one at
    the anchor, one update), :math:`-\mathrm{lr_x}\, g(\tilde w_{t-1})` (``"past"``) or
    :math:`\sigma \xi_t` (``"noise"``); the last two update on every call. An
    :class:`~alig_tf.AliG` base steps on the loss linearised at :math:`\tilde w_t` and
    seen from the anchor, :math:`l(\tilde w) + \langle g(\tilde w), w_t - \tilde
    w\rangle` (``linearized=False``: :math:`l(\tilde w)`). ``lr_x=None`` takes the base's
    step size (its ``learning_rate``; AliG's gamma). A non-finite loss or gradient skips
    the iteration: weights back at the anchor, the base's state kept bit for bit.

    Between calls the weights may hold :math:`\tilde w_t`: evaluate and save at the
    anchor inside :meth:`at_anchor` (or with :class:`EvaluateAtAnchor`). Everything else
    (the call form, checkpoints, pitfalls, what each option means): the Keras guide,
    section "Extrapolation", and ``docs/extrapolation.md``.

    Args:
      base_optimizer: the optimizer to wrap (any ``keras.optimizers.Optimizer``; its
        ``learning_rate`` is this optimizer's).
      mode: ``"gradient"``, ``"past"`` or ``"noise"``.
      lr_x: ``None`` (the base's step size), a number >= 0 (0: the base, bit for bit) or a
        schedule of the iteration count. ``None`` in ``"noise"`` mode.
      sigma: the noise scale (``"noise"`` mode only, required there).
      linearized: AliG as the base: the linearised loss, or the plain loss at ``w~``.
      seed: ``"noise"`` mode: the noise's seed, an int in ``[0, 2**31)`` (default 0).
      name: the optimizer's name.

    Raises:
      ValueError: an invalid option, or a base that cannot be wrapped (the message says
        why and what to pass).

    Example:
      >>> import numpy as np, keras
      >>> from alig_tf import Extrapolation
      >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
      >>> sgd = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
      >>> model.compile(optimizer=Extrapolation(sgd), loss="mse")
      >>> x, y = np.ones((24, 4)), np.zeros((24, 1))
      >>> history = model.fit(x, y, batch_size=8, verbose=0)  # 3 calls: w~, update, w~
      >>> opt = model.optimizer
      >>> opt.iteration, opt.is_extrapolated
      (1, True)
      >>> with opt.at_anchor():  # evaluate (and save) at the anchor
      ...     anchor_loss = model.evaluate(x, y, verbose=0)

    Reference:
      T. Lin, L. Kong, S. U. Stich, M. Jaggi, "Extrapolation for Large-batch Training in
      Deep Learning", ICML 2020, arXiv:2006.05720.
    """

    def __init__(
        self,
        base_optimizer: keras.optimizers.Optimizer,
        mode: str = "gradient",
        *,
        lr_x: float | Callable[[Any], Any] | None = None,
        sigma: float | None = None,
        linearized: bool = True,
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        config = ExtrapolationConfig(mode=mode, lr_x=lr_x, sigma=sigma, linearized=linearized)
        _check_base(base_optimizer)
        seed = alig_core._extrapolation_config.validate_seed(
            seed, mode=config.mode, below=_SEED_BOUND
        )
        super().__init__(learning_rate=0.0, name=name)
        self.base_optimizer = base_optimizer
        self.mode, self.lr_x, self.sigma = config.mode, lr_x, sigma
        self.linearized, self.seed = config.linearized, seed
        self._core_config = ExtrapolationConfig(
            mode=config.mode,
            lr_x=self._float_schedule if callable(lr_x) else lr_x,
            sigma=sigma,
            linearized=config.linearized,
        )
        self._in_anchor_context = False

    def _float_schedule(self, iteration: Any) -> Any:
        """The ``lr_x`` schedule at the iteration as a float of the step's dtype (its value too)."""
        assert callable(self.lr_x)
        value = self.lr_x(ops.cast(iteration, self._dtype))
        return loss_in(float(value) if isinstance(value, int) else value, self._dtype)

    # ------------------------------------------------------------------ variables

    def build(self, variables: list[keras.Variable]) -> None:
        """Creates the anchor, the phase, the counters and the noise seed; builds the base."""
        if self.built:
            return
        variables = list(variables)
        dtype = self._check_variables(variables, "optimizer.build(model.trainable_variables)")
        base = self.base_optimizer
        if base.built:
            ours = [base._var_key(v) for v in variables]
            theirs = [base._var_key(v) for v in base._trainable_variables]
            if ours != theirs:
                raise ValueError(
                    f"The base optimizer {base.name!r} was built on other variables "
                    f"({len(theirs)} of them) than the {len(ours)} this Extrapolation is "
                    "built on. Wrap a fresh base optimizer, or one built on exactly these "
                    "variables, in this order (model.trainable_variables)."
                )
        else:
            with keras.name_scope(base.name, caller=base):
                base.build(variables)
        super().build(variables)
        self._dtype = dtype

        def counter(name: str, value: int = 0) -> Any:
            initializer = keras.initializers.Constant(value)
            return self.add_variable((), initializer=initializer, dtype="int", name=name)

        self.anchors = self.add_optimizer_variables(variables, "anchor")
        self.phase = counter("phase")
        self.iteration_count = counter("extrapolation_iteration")
        self.skipped_count = counter("extrapolation_skipped")
        self.noise_seed = counter("noise_seed", self.seed)
        # Last of this optimizer's own, so that load_own_variables finds it.
        self.config_code = counter("extrapolation_config", _config_code(self.mode, self.linearized))

    @property
    def variables(self) -> list[Any]:
        """This optimizer's variables, then the base's (so ``stateless_apply`` maps both)."""
        return self._variables[:] + self.base_optimizer.variables

    def load_own_variables(self, store: Any) -> None:
        """Loads the variables; refuses those of another ``mode`` or ``linearized``.

        The anchor means something else in each mode (and the base's loss differs with the
        correction on or off): resuming with another would silently change the run.
        """
        if self.built and len(store.keys()) == len(self.variables):
            saved = int(ops.convert_to_numpy(store[str(len(self._variables) - 1)]))
            ours = _config_code(self.mode, self.linearized)
            if saved != ours:
                raise ValueError(
                    f"These optimizer variables were saved by an Extrapolation with "
                    f"{_describe_code(saved)}, and this one has {_describe_code(ours)}: "
                    "resuming would change the run. Compile the model with an Extrapolation "
                    "of the checkpoint's settings to resume."
                )
        super().load_own_variables(store)

    # ------------------------------------------------------------------ what it reports

    @property
    def learning_rate(self) -> Any:
        """The base optimizer's learning rate (callbacks that set it drive the base)."""
        return self.base_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.base_optimizer.learning_rate = learning_rate

    @property
    def is_extrapolated(self) -> bool:
        """Whether the weights hold the extrapolated point ``w~_t`` (the core's phase 1)."""
        return self.built and bool(ops.convert_to_numpy(self.phase.value))

    @property
    def iteration(self) -> int:
        """Iterations completed (base steps taken through the wrapper)."""
        return int(ops.convert_to_numpy(self.iteration_count.value)) if self.built else 0

    @property
    def iterations_skipped(self) -> int:
        """Iterations skipped (a non-finite loss or gradient at either point)."""
        return int(ops.convert_to_numpy(self.skipped_count.value)) if self.built else 0

    def anchor_params(self) -> list[Any]:
        """The anchor ``w_t``, one tensor per variable the optimizer was built on.

        The stored anchor in phase 1, the variables' values in phase 0: the weights to
        evaluate and save.
        """
        if not self.built:
            raise ValueError(
                "Extrapolation.anchor_params() before the optimizer is built: the weights "
                "are the anchor until its first call."
            )
        phase = self.phase.value
        return [
            ops.copy(current_anchor(ops, phase, a.value, v.value))
            for a, v in zip(self.anchors, self._trainable_variables, strict=True)
        ]

    def anchor_weights(self) -> list[Any]:
        """Deprecated: :meth:`anchor_params` (the name every adapter uses)."""
        warnings.warn(
            "Extrapolation.anchor_weights() is deprecated: call anchor_params(), the same "
            "anchor under the name every alig adapter uses.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.anchor_params()

    @contextlib.contextmanager
    def at_anchor(self) -> Iterator[None]:
        """Puts the anchor ``w_t`` into the weights for the block, then everything back.

        For evaluation, prediction and saving between calls. Inside the block the state
        is in phase 0, so that a ``.keras`` file saved there is a consistent checkpoint:
        it resumes from the anchor, with the iteration in flight started again (its
        extrapolation redone, in ``"gradient"`` mode on the next batch; ``d = 0`` for its
        first call in ``"past"`` and ``"noise"`` modes). Save outside the block to resume
        exactly. Training inside the block raises; where the weights hold the anchor,
        nothing moves.
        """
        if self._in_anchor_context:
            raise RuntimeError("Extrapolation.at_anchor() is already active; do not nest it.")
        self._in_anchor_context = True
        held: list[Any] = []
        phase = None
        try:
            if self.is_extrapolated:
                anchor = self.anchor_params()
                held = [_snapshot(v) for v in self._trainable_variables]
                phase = _snapshot(self.phase)
                for v, a in zip(self._trainable_variables, anchor, strict=True):
                    v.assign(a)
                self.phase.assign(ops.zeros_like(phase))
            yield
        finally:
            for v, w in zip(self._trainable_variables, held, strict=False):
                v.assign(w)
            if phase is not None:
                self.phase.assign(phase)
            self._in_anchor_context = False

    def noise(self, iteration: Any) -> list[Any]:
        """``xi_t`` of iteration ``iteration``: one standard normal tensor per variable.

        In the step's dtype, a function of the seed and ``iteration`` only (so a resumed
        run draws the same). The update of iteration ``t`` places
        ``w~_{t+1} = w_{t+1} + sigma * noise(t + 1)``.
        """
        if not self.built:
            raise ValueError("Extrapolation.noise() needs the optimizer built (its variables).")
        variables = self._trainable_variables
        shapes = [tuple(v.shape) for v in variables]
        sizes = [math.prod(shape) for shape in shapes]
        flat = _backend.standard_normal(
            self.noise_seed.value, iteration, sum(sizes), self._dtype, variables[0].value
        )
        starts = itertools.accumulate(sizes, initial=0)
        return [
            ops.reshape(flat[start : start + size], shape)
            for start, size, shape in zip(starts, sizes, shapes, strict=False)
        ]

    # ------------------------------------------------------------------ the call

    def apply(
        self, grads: list[Any], trainable_variables: list[Any] | None = None, loss: Any = None
    ) -> None:
        """One call: places ``w~``, or updates from the anchor (the core decides).

        Args:
          grads: the gradients at the point the variables hold (``None``: no gradient).
          trainable_variables: the variables (those the optimizer was built on, or some of
            them; the others count as without a gradient). Builds the optimizer on the first
            call.
          loss: the (unscaled) loss of these gradients; ``model.fit`` hands it over through
            :meth:`scale_loss` on TensorFlow and torch. AliG as the base needs it; for
            another base it joins the skip rule.
        """
        if self._in_anchor_context:
            raise RuntimeError(
                "Extrapolation.apply() inside opt.at_anchor(): the weights hold the anchor "
                "only for evaluation and saving. Train after the with-block."
            )
        with self._loss_of_this_call(loss):
            if len(grads) == 0:  # Keras' own no-op
                return
            if trainable_variables is None:
                if not self.built:
                    raise ValueError(
                        "Extrapolation.apply() without variables before it is built: pass "
                        "apply(grads, model.trainable_variables, ...) on the first call."
                    )
                trainable_variables = self._trainable_variables
            trainable_variables = list(trainable_variables)
            if len(grads) != len(trainable_variables):
                raise ValueError(
                    f"Extrapolation.apply() got {len(grads)} gradients for "
                    f"{len(trainable_variables)} variables; pass one gradient per variable."
                )
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
            self._check_variables_are_known(trainable_variables)
            if all(g is None for g in grads):
                raise ValueError(
                    "No gradient reached Extrapolation for any variable (every gradient is "
                    "None). Check that the loss depends on the trainable variables."
                )
            if _backend.multi_replica_context() is not None:
                raise NotImplementedError(
                    "alig_tf.Extrapolation under tf.distribute with more than one replica is "
                    "not supported yet. Train on one replica, or use the base optimizer "
                    "without extrapolation."
                )
            full: list[Any] = [None] * len(self._trainable_variables)
            for g, v in zip(grads, trainable_variables, strict=True):
                full[self._get_variable_index(v)] = g
            loss_value = self._pending_losses.take()
            if loss_value is None and isinstance(self.base_optimizer, AliG):
                raise ValueError(_LOSS_HELP)
            with keras.name_scope(self.name, caller=self), _backend.no_grad():
                self._step(full, loss_value)
            self._iterations.assign_add(1)

    def _step(self, grads: list[Any], loss: Any) -> None:
        """One call of the core's procedure; its result assigned, the base's state kept or not."""
        dtype, variables = self._dtype, self._trainable_variables
        # Sparse gradients (an Embedding's) made dense, their repeated indices summed.
        present = _backend.dense([g for g in grads if g is not None])
        dense = iter(present)
        grads = [None if g is None else next(dense) for g in grads]
        gradients = tuple(None if g is None else ops.cast(g, dtype) for g in grads)
        state = ExtrapolationState(
            anchor=tuple(ops.cast(_snapshot(a), dtype) for a in self.anchors),
            phase=_snapshot(self.phase),
            iteration=_snapshot(self.iteration_count),
            skipped=_snapshot(self.skipped_count),
        )
        base = _KerasBase(self.base_optimizer, grads, variables, dtype, self.assign)
        call = extrapolation_step(
            ops,
            self._core_config,
            state,
            tuple(ops.cast(_snapshot(v), dtype) for v in variables),
            gradients,
            loss=None if loss is None else loss_in(loss, dtype),
            sq_grad_norm=_backend.sum_of_squares(present, dtype),  # the call's one norm
            base=base,
            noise=self.noise if self.mode == "noise" else None,
            lists=_KerasLists(ops),
        )
        for v, p in zip(variables, call.params, strict=True):
            self.assign(v, ops.cast(p, v.dtype))
        for a, x in zip(self.anchors, call.state.anchor, strict=True):
            self.assign(a, ops.cast(x, a.dtype))
        for counter, value in (
            (self.phase, call.state.phase),
            (self.iteration_count, call.state.iteration),
            (self.skipped_count, call.state.skipped),
        ):
            self.assign(counter, ops.cast(value, counter.dtype))
        for v, old, new in zip(self.base_optimizer.variables, base.old, base.new, strict=True):
            self.assign(v, _backend.keep_if(call.base_stepped, new, old))

    def finalize_variable_values(self, var_list: list[Any]) -> None:
        """Nothing to finalize: the weights stay where the run left them (see at_anchor)."""

    # ------------------------------------------------------------------ config

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments (the base optimizer and a schedule serialized)."""
        lr_x = self.lr_x
        if callable(lr_x):
            lr_x = keras.saving.serialize_keras_object(lr_x)
        return {
            "name": self.name,
            "base_optimizer": keras.saving.serialize_keras_object(self.base_optimizer),
            "mode": self.mode,
            "lr_x": lr_x,
            "sigma": self.sigma,
            "linearized": self.linearized,
            "seed": self.seed if self.mode == "noise" else None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Extrapolation:
        """Rebuilds the optimizer from :meth:`get_config`."""
        config = dict(config)
        for key in ("base_optimizer", "lr_x"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return cls(**config)


def _check_base(base: Any) -> None:
    """Raises a ``ValueError`` for a base optimizer the wrapper cannot wrap, with the fix."""
    refusal = None
    if not isinstance(base, keras.optimizers.Optimizer):
        refusal = (
            f"got {alig_core._config.describe_value(base)}; expected a "
            "keras.optimizers.Optimizer (e.g. keras.optimizers.SGD(0.1, momentum=0.9, "
            "nesterov=True) or alig_tf.AliG(max_lr=0.1)). Build the optimizer first, then "
            "wrap it."
        )
    elif isinstance(base, Extrapolation):
        refusal = (
            "got an Extrapolation; expected the optimizer it wraps. Extrapolation does not "
            "nest: wrap the base optimizer once."
        )
    elif isinstance(base, keras.optimizers.LossScaleOptimizer):
        refusal = (
            "got a LossScaleOptimizer; the wrapper would displace along scaled gradients and "
            "the loss would not reach the inner optimizer. Wrap the inner optimizer, and "
            "train without loss scaling (mixed_bfloat16 needs none)."
        )
    for option, why in _REFUSED_BASE_OPTIONS.items():
        value = getattr(base, option, None)
        if refusal is None and value:
            refusal = (
                f"it has {option}={value!r}, and Extrapolation does not support that: {why}. "
                f"Build the base optimizer without {option}."
            )
    if refusal is not None:
        raise ValueError(f"Invalid base_optimizer: {refusal}")


class EvaluateAtAnchor(keras.callbacks.Callback):
    """Evaluates and predicts at the anchor ``w_t`` of an :class:`Extrapolation` optimizer.

    Between calls the weights may hold the extrapolated point ``w~_t``; with this callback
    the validation of ``model.fit`` (and ``model.evaluate`` or ``model.predict`` given the
    callback) runs inside :meth:`Extrapolation.at_anchor`, and training carries on from
    where it was.

    Example:
      >>> import numpy as np, keras
      >>> from alig_tf import EvaluateAtAnchor, Extrapolation
      >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
      >>> model.compile(optimizer=Extrapolation(keras.optimizers.SGD(0.1)), loss="mse")
      >>> x, y = np.ones((8, 2)), np.zeros((8, 1))
      >>> history = model.fit(x, y, batch_size=8, validation_data=(x, y), verbose=0,
      ...                     callbacks=[EvaluateAtAnchor()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._context: Any = None

    def _enter(self) -> None:
        optimizer = getattr(self.model, "optimizer", None)
        if not isinstance(optimizer, Extrapolation):
            raise ValueError(
                "EvaluateAtAnchor needs a model compiled with alig_tf.Extrapolation; this "
                f"model's optimizer is {type(optimizer).__name__}."
            )
        if optimizer.built and self._context is None:
            self._context = optimizer.at_anchor()
            self._context.__enter__()

    def _exit(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)

    def on_test_begin(self, logs: Any = None) -> None:
        """Puts the anchor in."""
        self._enter()

    def on_test_end(self, logs: Any = None) -> None:
        """Puts the weights back."""
        self._exit()

    on_predict_begin = on_test_begin
    on_predict_end = on_test_end
