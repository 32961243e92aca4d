"""Extrapolation around any Keras 3 optimizer (docs/specification.md, "Extrapolation").

A thin adapter of :mod:`alig_core._extrapolation`, called with ``keras.ops``: this module
receives the loss (as :class:`~alig_tf.AliG` does), gathers the variables and gradients,
runs the base optimizer's own ``apply`` from the anchor, draws the noise and assigns what
the core returns. Both phases are computed on every call and one is selected with
``where`` (``alig_core._extrapolation.select_call``), so one traced step serves every call under
``tf.function``, XLA and ``jax.jit``. See ``docs/extrapolation.md`` for which details are
the paper's and which are this project's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import keras
from keras import ops

import alig_core
from alig_core import EXTRAPOLATION_MODES, ExtrapolationConfig
from alig_core._extrapolation import (
    ExtrapolationState,
    anchor_step_size,
    extrapolate,
    finish_update,
    select_call,
    update_inputs,
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
        "does not know of; average the anchors yourself, e.g. from anchor_weights()"
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

    On torch a variable's value is the tensor the optimizers update in place, so it is
    copied; on TensorFlow the copy is the read of the variable at this point; on JAX a
    value (also the scoped one inside ``stateless_apply``).
    """
    return ops.copy(variable.value if isinstance(variable, keras.Variable) else variable)


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    """torch: no autograd graph through the optimizer's arithmetic (as Keras' own steps)."""
    if _backend.name() != "torch":
        yield
        return
    import torch

    with torch.no_grad():
        yield


def _standard_normal(seed: Any, iteration: Any, size: int, dtype: str, like: Any) -> Any:
    """``size`` standard normal numbers of ``dtype``, a function of ``(seed, iteration)`` only.

    TensorFlow: Philox bits of the seed pair ``(seed, iteration)`` and the Box-Muller
    transform on 53-bit uniforms (``tf.random.stateless_normal`` itself draws other
    numbers under XLA than without, for the same seed, while its bits agree); JAX:
    ``jax.random.normal`` of ``fold_in(PRNGKey(seed), iteration)``; torch: a generator on
    ``like``'s device seeded with a hash of both (read on the host: torch steps eagerly).
    Both arguments may be tensors (optimizer variables).
    """
    backend = _backend.name()
    if backend == "tensorflow":
        import tensorflow as tf

        pair = tf.stack([tf.cast(seed, tf.int32), tf.cast(iteration, tf.int32)])
        half = (size + 1) // 2
        bits = tf.random.stateless_uniform(
            (4, half), seed=pair, minval=None, maxval=None, dtype=tf.uint32, alg="philox"
        )

        def unit(high: Any, low: Any) -> Any:  # 53 random bits, in (0, 1]
            high = tf.cast(tf.bitwise.right_shift(high, 5), tf.float64)
            low = tf.cast(tf.bitwise.right_shift(low, 6), tf.float64)
            return (high * 2.0**26 + low + 1.0) / 2.0**53

        radius = tf.sqrt(-2.0 * tf.math.log(unit(bits[0], bits[1])))
        angle = (2.0 * math.pi) * unit(bits[2], bits[3])
        normal = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
        return tf.cast(normal[:size], dtype)
    if backend == "jax":
        import jax

        key = jax.random.fold_in(jax.random.PRNGKey(seed), iteration)
        return jax.random.normal(key, (size,), dtype=dtype)
    import torch

    generator = torch.Generator(device=like.device)
    generator.manual_seed(alig_core._extrapolation.noise_generator_seed(int(seed), int(iteration)))
    return torch.randn(size, generator=generator, dtype=getattr(torch, dtype), device=like.device)


@keras.saving.register_keras_serializable(package="alig")
class Extrapolation(LossTakingOptimizer):
    r"""Extrapolated steps around any Keras optimizer (EXTRAP-SGD and relatives).

    Each iteration displaces the iterate :math:`w_t` (the *anchor*) by :math:`d_t`,
    evaluates the loss and the gradient there, and lets the base optimizer step **from the
    anchor** with that gradient (extragradient):
    :math:`w_{t+1} = \mathrm{Base}\big(w_t,\ g(w_t + d_t)\big)`. ``mode`` picks
    :math:`d_t` (the rules: ``docs/extrapolation.md``, "What it does"): ``"gradient"``
    (EXTRAP-SGD) :math:`-\mathrm{lr_x}\, g(w_t)`, two evaluations per iteration;
    ``"past"`` :math:`-\mathrm{lr_x}` times the gradient the previous update used;
    ``"noise"`` :math:`\sigma \xi_t`, standard normal numbers of ``(seed, t)`` only (the
    perturbation baseline); the last two, one evaluation per iteration.

    The base's state (momentum buffers, its ``iterations``) moves once per iteration. An
    :class:`~alig_tf.AliG` base takes the Polyak step of the loss linearised at
    :math:`\tilde w_t = w_t + d_t` and seen from the anchor, :math:`l(\tilde w) +
    \langle g(\tilde w), w_t - \tilde w\rangle` in place of the loss (``linearized=False``:
    the plain :math:`l(\tilde w)`);
    the wrapper hands AliG the corrected loss through ``apply(..., loss=...)``. Every other
    base is applied as it is. Projection (AliG's ``max_norm``) applies to
    :math:`w_{t+1}`, never to :math:`\tilde w_t`. ``lr_x=None`` (the default) takes the
    base's own step size: its ``learning_rate`` (SGD); for ALI-G in ``"gradient"`` mode its
    step size at the anchor (from :math:`l(w_t)`, :math:`g(w_t)`; its records do not move
    for it), in ``"past"`` mode the gamma of the previous update. For a base whose step is
    not ``learning_rate`` times the gradient (Adam), pass ``lr_x``.

    **The call form: alternating.** Each call (``apply``, ``apply_gradients``,
    ``stateless_apply``: one per batch in ``model.fit``) makes one evaluation's step. In
    ``"gradient"`` mode the calls alternate: one at the anchor moves the weights to
    :math:`\tilde w_t` (the gradient of that batch), the next updates (the gradient of the
    next batch at :math:`\tilde w_t`), as ``optax.contrib.sam`` does; ``"past"`` and
    ``"noise"`` update on every call. So ``model.compile(optimizer=Extrapolation(...))``
    and ``model.fit`` run unchanged on every backend (JAX: with the
    :class:`~alig_tf.AliGTrainStep` mixin where the base is AliG, which needs the loss), and
    so do custom loops. This form was chosen over a train-step mixin because it needs
    nothing from the model on TensorFlow and torch and changes no Keras internals; the
    state lives in optimizer variables, so it works in ``stateless_apply`` and ``.keras``
    files. The same-batch form of EXTRAP-SGD is a custom loop: evaluate, ``apply``, and
    where :attr:`is_extrapolated` is then True, evaluate on the same batch and ``apply``
    again (tested against the oracle's same-batch form).

    Both phases are computed on every call and one is selected with ``where``, so the step
    traces and compiles once; the base's ``apply`` runs on every call (from the anchor),
    and its variables are put back where the call is not an update. Its cost per call is
    therefore about the base's step plus a few passes over the weights.

    **Skipped iterations.** A non-finite loss or gradient at either point skips the whole
    iteration: the base's variables, the stored anchor and the counters stay bit for bit,
    the weights go back to the anchor and :attr:`iterations_skipped` goes up (this
    optimizer's own ``iterations``, the count of calls, moves on every call).

    **Between calls** the weights may hold :math:`\tilde w_t`: always in ``"past"`` and
    ``"noise"`` modes after the first update, and between the two calls of an iteration in
    ``"gradient"`` mode (:attr:`is_extrapolated`). To evaluate, predict or save at the
    anchor:

    * ``with opt.at_anchor(): model.evaluate(...); model.save("anchor.keras")`` puts the
      anchor into the weights for the block (and the state in phase 0, so that a file
      saved there is consistent: it resumes from the anchor, the iteration in flight
      started again), then puts everything back;
    * ``model.fit(..., callbacks=[EvaluateAtAnchor()])`` does the same around the
      validation of every epoch (and around ``evaluate``/``predict`` given the callback);
    * :meth:`anchor_weights` returns the anchor's values.

    A ``.keras`` file saved outside :meth:`at_anchor` (``model.save``, ``ModelCheckpoint``)
    holds the weights as they are and the wrapper's variables (anchor, phase, counters,
    noise seed) and the base's: loaded in a new process it resumes the run exactly.

    **Pitfalls.** Every forward pass in training mode updates BatchNorm's moving
    statistics, the one at :math:`\tilde w_t` included. ``tf.distribute`` with more than
    one replica is not supported yet (refused). The base must not use
    ``gradient_accumulation_steps``, ``loss_scale_factor`` or ``use_ema`` (refused, with
    the reason); ``mixed_float16`` wraps this optimizer in a ``LossScaleOptimizer``, which
    passes no loss on (an AliG base raises; use ``mixed_bfloat16``).

    Args:
      base_optimizer: the optimizer to wrap (``keras.optimizers.SGD(learning_rate,
        momentum=0.9, nesterov=True)``, :class:`~alig_tf.AliG`, any
        ``keras.optimizers.Optimizer``). Its ``learning_rate`` is this optimizer's (so
        ``LearningRateScheduler`` and ``ReduceLROnPlateau`` drive it). A base that was
        built (and stepped) on the same variables carries on from its state.
      mode: ``"gradient"``, ``"past"`` or ``"noise"``.
      lr_x: the displacement's step size in the gradient modes: ``None`` (the base's, see
        above), a number >= 0 (0: the wrapper is its base, bit for bit), or a schedule: a
        ``keras.optimizers.schedules.LearningRateSchedule`` or a callable, called with the
        iteration count (a 0-d float tensor). ``None`` in ``"noise"`` mode.
      sigma: the noise scale, ``"noise"`` mode only (required there; 0 turns it off).
      linearized: AliG as the base: the linearised loss (``True``) or the plain loss at
        :math:`\tilde w_t`. Ignored by a base that takes no loss.
      seed: ``"noise"`` mode: the seed of the noise, an int in ``[0, 2**31)`` (default 0);
        ``None`` elsewhere. The noise differs between backends (each draws with its own
        generator) and is the same on every run of one backend.
      name: the optimizer's name.

    Raises:
      ValueError: an invalid option (``mode``, ``lr_x``, ``sigma``, ``linearized``: the
        core's validation; ``seed``), or a base that cannot be wrapped.

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
      Deep Learning", ICML 2020, arXiv:2006.05720. The details the paper's text did not
      settle here (stepping from the anchor, ``"past"`` mode, ALI-G's linearised step) are
      this project's: see ``docs/extrapolation.md``.
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
        self.mode = config.mode
        self.lr_x = lr_x
        self.sigma = sigma
        self.linearized = config.linearized
        self.seed = seed
        self._core_config = ExtrapolationConfig(
            mode=config.mode,
            lr_x=self._float_schedule if callable(lr_x) else lr_x,
            sigma=sigma,
            linearized=config.linearized,
        )
        self._is_alig = isinstance(base_optimizer, AliG)
        self._in_anchor_context = False

    def _float_schedule(self, iteration: Any) -> Any:
        """The ``lr_x`` schedule, called with the iteration as a float of the step's dtype.

        Its value is taken in that dtype too (a Keras schedule computes in float32).
        """
        assert callable(self.lr_x)
        value = self.lr_x(ops.cast(iteration, self._dtype))
        if isinstance(value, int | float):  # not through float32 (TensorFlow's default)
            return ops.convert_to_tensor(float(value), dtype=self._dtype)
        return ops.cast(value, self._dtype)

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
        self.anchors = self.add_optimizer_variables(variables, "anchor")
        self.phase = self.add_variable((), initializer="zeros", dtype="int", name="phase")
        self.iteration_count = self.add_variable(
            (), initializer="zeros", dtype="int", name="extrapolation_iteration"
        )
        self.skipped_count = self.add_variable(
            (), initializer="zeros", dtype="int", name="extrapolation_skipped"
        )
        self.noise_seed = self.add_variable(
            (), initializer=keras.initializers.Constant(self.seed), dtype="int", name="noise_seed"
        )
        # Last of this optimizer's own, so that load_own_variables finds it.
        self.config_code = self.add_variable(
            (),
            initializer=keras.initializers.Constant(_config_code(self.mode, self.linearized)),
            dtype="int",
            name="extrapolation_config",
        )

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

    def anchor_weights(self) -> list[Any]:
        """The anchor ``w_t``, one tensor per variable the optimizer was built on.

        The stored anchor in phase 1, the variables' values in phase 0
        (``alig_core._extrapolation.current_anchor``): the weights to evaluate and save.
        """
        if not self.built:
            raise ValueError(
                "Extrapolation.anchor_weights() before the optimizer is built: the weights "
                "are the anchor until its first call."
            )
        phase = self.phase.value
        return [
            ops.copy(alig_core._extrapolation.current_anchor(ops, phase, a.value, v.value))
            for a, v in zip(self.anchors, self._trainable_variables, strict=True)
        ]

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
                anchor = self.anchor_weights()
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
        return self._noise(self.noise_seed.value, iteration)

    def _noise(self, seed: Any, iteration: Any) -> list[Any]:
        shapes = [tuple(v.shape) for v in self._trainable_variables]
        sizes = [math.prod(shape) for shape in shapes]
        flat = _standard_normal(
            seed, iteration, sum(sizes), self._dtype, self._trainable_variables[0].value
        )
        xi, start = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            xi.append(ops.reshape(flat[start : start + size], shape))
            start += size
        return xi

    # ------------------------------------------------------------------ the loss

    def apply(
        self, grads: list[Any], trainable_variables: list[Any] | None = None, loss: Any = None
    ) -> None:
        """One call: extrapolates, or updates from the anchor (see the class docstring).

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
            if _backend.name() == "tensorflow":  # e.g. an Embedding's sparse gradient
                from alig_tf import _tensorflow

                grads = _tensorflow.dense(grads)
            full: list[Any] = [None] * len(self._trainable_variables)
            for g, v in zip(grads, trainable_variables, strict=True):
                full[self._get_variable_index(v)] = g
            if _backend.multi_replica_context() is not None:
                raise NotImplementedError(
                    "alig_tf.Extrapolation under tf.distribute with more than one replica is "
                    "not supported yet. Train on one replica, or use the base optimizer "
                    "without extrapolation."
                )
            loss_value = self._pending_losses.take()
            if loss_value is None and self._is_alig:
                raise ValueError(_LOSS_HELP)
            with keras.name_scope(self.name, caller=self), _no_grad():
                self._step(full, loss_value)
            self._iterations.assign_add(1)

    # ------------------------------------------------------------------ the step

    def _step(self, grads: list[Any], loss: Any) -> None:
        """Both phases from the core, one selected; the base's variables kept or advanced."""
        config, dtype, base = self._core_config, self._dtype, self.base_optimizer
        variables = self._trainable_variables
        params = tuple(ops.cast(_snapshot(v), dtype) for v in variables)
        gradients = tuple(None if g is None else ops.cast(g, dtype) for g in grads)
        if loss is not None:
            loss = loss_in(loss, dtype)
        sq_grad_norm = _backend.sum_of_squares([g for g in gradients if g is not None], dtype)
        state = ExtrapolationState(
            anchor=tuple(ops.cast(_snapshot(a), dtype) for a in self.anchors),
            phase=_snapshot(self.phase),
            iteration=_snapshot(self.iteration_count),
            skipped=_snapshot(self.skipped_count),
        )
        base_lr = ops.cast(_snapshot(base.learning_rate), dtype)  # the lr this update uses

        # The update (every call in "past"/"noise" mode, phase 1 in "gradient" mode): the
        # base steps from the anchor with these gradients.
        inputs = update_inputs(
            ops,
            state,
            params,
            gradients,
            loss=loss,
            sq_grad_norm=sq_grad_norm,
            linearized=config.linearized and self._is_alig,
        )
        base_variables = base.variables
        old_base = [_snapshot(v) for v in base_variables]
        for v, a in zip(variables, inputs.anchor, strict=True):
            self.assign(v, ops.cast(a, v.dtype))
        if self._is_alig:
            base.apply(list(grads), list(variables), loss=inputs.loss)
        else:
            base.apply(list(grads), list(variables))
        stepped = tuple(ops.cast(_snapshot(v), dtype) for v in variables)
        new_base = [_snapshot(v) for v in base_variables]
        default = None
        if config.mode == "past" and config.lr_x is None:  # the step size of this update
            default = ops.cast(_snapshot(base.gamma), dtype) if self._is_alig else base_lr
        noise = None
        if config.mode == "noise":  # d_{t+1} = sigma * xi_{t+1}
            noise = self._noise(self.noise_seed.value, state.iteration + 1)
        call = finish_update(
            ops, config, state, inputs, stepped, gradients, default_lr_x=default, noise=noise
        )

        if config.mode == "gradient":  # phase 0: the call at the anchor, w_t -> w~_t
            default = None
            if config.lr_x is None:
                default = base_lr
                if self._is_alig:  # its step size at the anchor; no record moves
                    default = anchor_step_size(
                        ops,
                        loss,
                        sq_grad_norm,
                        max_lr=base._cap(base.learning_rate, dtype),
                        eps=base.eps,
                        f_star=base.f_star,
                    )
            extrapolating = extrapolate(
                ops,
                config,
                state,
                params,
                gradients,
                loss=loss,
                sq_grad_norm=sq_grad_norm,
                default_lr_x=default,
            )
            call = select_call(ops, state.phase > 0, call, extrapolating)

        for v, p in zip(variables, call.params, strict=True):
            self.assign(v, ops.cast(p, v.dtype))
        for a, x in zip(self.anchors, call.state.anchor, strict=True):
            self.assign(a, ops.cast(x, a.dtype))
        self.assign(self.phase, ops.cast(call.state.phase, self.phase.dtype))
        self.assign(
            self.iteration_count, ops.cast(call.state.iteration, self.iteration_count.dtype)
        )
        self.assign(self.skipped_count, ops.cast(call.state.skipped, self.skipped_count.dtype))
        for v, old, new in zip(base_variables, old_base, new_base, strict=True):
            self.assign(v, ops.where(call.base_stepped, new, old))

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
        config["base_optimizer"] = keras.saving.deserialize_keras_object(
            config["base_optimizer"], custom_objects=custom_objects
        )
        if isinstance(config.get("lr_x"), dict):
            config["lr_x"] = keras.saving.deserialize_keras_object(
                config["lr_x"], custom_objects=custom_objects
            )
        return cls(**config)


def _check_base(base: Any) -> None:
    if not isinstance(base, keras.optimizers.Optimizer):
        raise ValueError(
            f"Invalid base_optimizer: got {alig_core._config.describe_value(base)}; expected a "
            "keras.optimizers.Optimizer (e.g. keras.optimizers.SGD(0.1, momentum=0.9, "
            "nesterov=True) or alig_tf.AliG(max_lr=0.1)). Build the optimizer first, then "
            "wrap it."
        )
    if isinstance(base, Extrapolation):
        raise ValueError(
            "Invalid base_optimizer: got an Extrapolation; expected the optimizer it wraps. "
            "Extrapolation does not nest: wrap the base optimizer once."
        )
    if isinstance(base, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "Invalid base_optimizer: got a LossScaleOptimizer; the wrapper would displace "
            "along scaled gradients and the loss would not reach the inner optimizer. Wrap "
            "the inner optimizer, and train without loss scaling (mixed_bfloat16 needs none)."
        )
    for option, why in _REFUSED_BASE_OPTIONS.items():
        value = getattr(base, option, None)
        if value:
            raise ValueError(
                f"Invalid base_optimizer: it has {option}={value!r}, and Extrapolation does not "
                f"support that: {why}. Build the base optimizer without {option}."
            )


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

    def on_predict_begin(self, logs: Any = None) -> None:
        """Puts the anchor in."""
        self._enter()

    def on_predict_end(self, logs: Any = None) -> None:
        """Puts the weights back."""
        self._exit()
