"""Extrapolation around any Keras 3 optimizer: storage and glue around the core's procedure.

:func:`alig_core._extrapolation.extrapolation_step` decides everything; this module takes
the loss in (as :class:`~alig_tf.AliG`), computes the call's one squared gradient norm,
runs the base's own ``apply`` from the anchor (:class:`_KerasBase`) and assigns what the
core returns. The phase is a variable: the core computes both phases and selects one, so
one trace serves every call (``tf.function``, XLA, ``jax.jit``). The guide:
``docs/guides/keras.md``, "Extrapolation".
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

__all__ = ["Extrapolation"]

_LOSS_HELP = (
    "Extrapolation around AliG needs the loss of every evaluation (ALI-G's step size and its "
    "default lr_x come from it). model.fit hands it over by itself on the TensorFlow and "
    "torch backends; on the JAX backend, add alig_tf.AliGTrainStep to your model's classes; "
    "in a custom loop call optimizer.apply(grads, variables, loss=loss) (or "
    "stateless_apply(..., loss=loss) on JAX). Under a mixed_float16 policy, compile() wraps "
    "the optimizer in keras.optimizers.LossScaleOptimizer, which passes no loss on: train "
    "with mixed_bfloat16 (no loss scaling) instead."
)

_REFUSED_BASE_OPTIONS: dict[str, str] = {
    "gradient_accumulation_steps": "the base would step only on every k-th call, and the "
    "wrapper alternates on every call; accumulate in your loop and call the wrapper once "
    "per accumulated gradient",
    "loss_scale_factor": "the wrapper would displace along the scaled gradients; train "
    "without loss scaling (mixed_bfloat16 needs none)",
    "use_ema": "the base would average (and may overwrite the weights with) iterates the "
    "wrapper does not know of; average the anchors yourself, e.g. from anchor_params()",
}
"""Options of the base optimizer that would break the wrapper, and why (refused)."""

_SEED_BOUND = 2**31
"""Seeds are below this: TensorFlow's stateless generators take an int32 seed pair."""


def _config_code(mode: str, linearized: bool) -> int:
    """What the saved variables were made by: ``mode`` and ``linearized`` as one int."""
    return 2 * EXTRAPOLATION_MODES.index(mode) + int(linearized)


def _describe_code(code: int) -> str:  # _config_code's inverse, for the refusal on load
    mode = EXTRAPOLATION_MODES[code // 2] if 0 <= code // 2 < len(EXTRAPOLATION_MODES) else "?"
    return f"mode={mode!r}, linearized={bool(code % 2)}"


def _snapshot(variable: Any) -> Any:
    """The value a variable holds now, unchanged by later assignments (torch: in place)."""
    return ops.copy(_backend.value(variable))


class _KerasLists(ArrayLists):
    """The core's list operations; a skip keeps whole tensors (TensorFlow's scalar select)."""

    def keep(self, flag: Any, old: Sequence[Any], new: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(_backend.keep_if(flag, a, b) for a, b in zip(old, new, strict=True))


class _KerasBase:
    """The base as the core sees it (``ExtrapolationBase``), for one call.

    :meth:`run` writes the anchor, runs the base's ``apply`` (AliG: on the given loss and
    ``S``) and holds the base's variables before and after, to keep the old ones.
    """

    def __init__(
        self, base: Any, grads: list[Any], variables: list[Any], dtype: str, assign: Any
    ) -> None:
        self.base, self.grads, self.variables, self.dtype = base, grads, variables, dtype
        self.assign, self.takes_loss = assign, isinstance(base, AliG)
        # This call's learning rate (AliG: cap), read before run moves the base's step count.
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

    Between calls the weights may hold :math:`\tilde w_t`: evaluate and save inside
    :meth:`at_anchor` (or with :class:`~alig_tf.EvaluateAtAnchor`). The call form, checkpoints and
    pitfalls: the Keras guide, "Extrapolation".

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
      ValueError: an invalid option, or a base that cannot be wrapped.

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
        schedule = self._float_schedule if callable(lr_x) else lr_x
        self._core_config = ExtrapolationConfig(
            mode=config.mode, lr_x=schedule, sigma=sigma, linearized=config.linearized
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
        if not base.built:
            with keras.name_scope(base.name, caller=base):
                base.build(variables)
        elif [base._var_key(v) for v in variables] != [
            base._var_key(v) for v in base._trainable_variables
        ]:
            raise ValueError(
                f"The base optimizer {base.name!r} was built on other variables "
                f"({len(base._trainable_variables)} of them) than the {len(variables)} this "
                "Extrapolation is built on. Wrap a fresh base optimizer, or one built on "
                "exactly these variables, in this order (model.trainable_variables)."
            )
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
        """Loads the variables; refuses those of another ``mode`` or ``linearized``."""
        ours, why = _config_code(self.mode, self.linearized), "resuming would change the run"
        index = len(self._variables) - 1
        self._refuse_other_settings(store, index, ours, _describe_code, why, this="one")
        super().load_own_variables(store)

    # ------------------------------------------------------------------ what it reports

    @property
    def learning_rate(self) -> Any:
        """The base optimizer's learning rate (callbacks that set it drive the base)."""
        return self.base_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.base_optimizer.learning_rate = learning_rate

    def _read(self, name: str) -> int:
        return int(ops.convert_to_numpy(getattr(self, name).value)) if self.built else 0

    @property
    def is_extrapolated(self) -> bool:
        """Whether the weights hold the extrapolated point ``w~_t`` (the core's phase 1)."""
        return bool(self._read("phase"))

    @property
    def iteration(self) -> int:
        """Iterations completed (base steps taken through the wrapper)."""
        return self._read("iteration_count")

    @property
    def iterations_skipped(self) -> int:
        """Iterations skipped (a non-finite loss or gradient at either point)."""
        return self._read("skipped_count")

    def anchor_params(self) -> list[Any]:
        """The anchor ``w_t`` (the weights to evaluate and save), one tensor per variable."""
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

        For evaluation, prediction and saving: the state is in phase 0 in the block, so a
        ``.keras`` file saved there resumes from the anchor, the iteration in flight
        started again (save outside the block to resume exactly). Training in it raises.
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
        """``xi_t`` of iteration ``iteration``, one standard normal tensor per variable.

        In the step's dtype, a function of the seed and ``iteration`` only (a resumed run
        draws the same): the update of iteration ``t`` adds ``sigma * noise(t + 1)``.
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
          trainable_variables: the variables (those it was built on, or some of them: the
            others count as without a gradient). Builds the optimizer on the first call.
          loss: the (unscaled) loss of these gradients (``model.fit`` hands it over on
            TensorFlow and torch). AliG as the base needs it; it joins the skip rule.
        """
        if self._in_anchor_context:
            raise RuntimeError(
                "Extrapolation.apply() inside opt.at_anchor(): the weights hold the anchor "
                "only for evaluation and saving. Train after the with-block."
            )
        with self._loss_of_this_call(loss):
            full = self._gradients_of_built_variables(grads, trainable_variables)
            if full is None:  # Keras' own no-op
                return
            if _backend.multi_replica_context() is not None:
                raise NotImplementedError(
                    "alig_tf.Extrapolation under tf.distribute with more than one replica is "
                    "not supported yet. Train on one replica, or use the base optimizer "
                    "without extrapolation."
                )
            loss_value = self._pending_losses.take()
            if loss_value is None and isinstance(self.base_optimizer, AliG):
                raise ValueError(_LOSS_HELP)
            with keras.name_scope(self.name, caller=self), _backend.no_grad():
                self._step(full, loss_value)
            self._iterations.assign_add(1)

    def _step(self, grads: list[Any], loss: Any) -> None:
        """One call of the core's procedure; its result assigned, the base's state kept or not."""
        dtype, variables = self._dtype, self._trainable_variables
        present = _backend.dense([g for g in grads if g is not None])  # sparse: made dense
        dense = iter(present)
        grads = [None if g is None else next(dense) for g in grads]
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
            tuple(None if g is None else ops.cast(g, dtype) for g in grads),
            loss=None if loss is None else loss_in(loss, dtype),
            sq_grad_norm=_backend.sum_of_squares(present, dtype),  # the call's one norm
            base=base,
            noise=self.noise if self.mode == "noise" else None,
            lists=_KerasLists(ops),
        )
        targets = [*variables, *self.anchors, self.phase, self.iteration_count, self.skipped_count]
        values = [*call.params, *call.state.anchor, *call.state[1:]]
        for target, value in zip(targets, values, strict=True):
            self.assign(target, ops.cast(value, target.dtype))
        for v, old, new in zip(self.base_optimizer.variables, base.old, base.new, strict=True):
            self.assign(v, _backend.keep_if(call.base_stepped, new, old))

    def finalize_variable_values(self, var_list: list[Any]) -> None:
        """Nothing to finalize: the weights stay where the run left them (see at_anchor)."""

    # ------------------------------------------------------------------ config

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments (the base optimizer and a schedule serialized)."""
        lr_x = self.lr_x
        return {
            "name": self.name,
            "base_optimizer": keras.saving.serialize_keras_object(self.base_optimizer),
            "mode": self.mode,
            "lr_x": keras.saving.serialize_keras_object(lr_x) if callable(lr_x) else lr_x,
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
    if not isinstance(base, keras.optimizers.Optimizer):
        refusal = (
            f"got {alig_core._config.describe_value(base)}; expected a "
            "keras.optimizers.Optimizer (e.g. keras.optimizers.SGD(0.1, momentum=0.9, "
            "nesterov=True) or alig_tf.AliG(max_lr=0.1)). Build it first, then wrap it."
        )
    elif isinstance(base, Extrapolation):
        refusal = "got an Extrapolation; Extrapolation does not nest: wrap the base once."
    elif isinstance(base, keras.optimizers.LossScaleOptimizer):
        refusal = (
            "got a LossScaleOptimizer; the wrapper would displace along scaled gradients and "
            "the loss would not reach the inner optimizer. Wrap the inner optimizer, and "
            "train without loss scaling (mixed_bfloat16 needs none)."
        )
    else:
        options = [(o, getattr(base, o, None), why) for o, why in _REFUSED_BASE_OPTIONS.items()]
        refusal = next(
            (
                f"it has {o}={v!r}, and Extrapolation does not support that: {why}. Build the "
                f"base optimizer without {o}."
                for o, v, why in options
                if v
            ),
            "",
        )
    if refusal:
        raise ValueError(f"Invalid base_optimizer: {refusal}")
