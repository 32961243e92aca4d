"""ALI-G as a Keras 3 optimizer (TensorFlow, JAX and torch backends).

The numbers come from :mod:`alig_core`, called with ``keras.ops``; this module receives
the loss, gathers the gradients once per step in ``_backend_update_step`` (as Nadam does
for its global scalar) and assigns the results.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any

import keras
from keras import ops

import alig_core
from alig_core import (
    AliGConfig,
    momentum_buffer_update,
    momentum_coefficients,
    momentum_param_update,
    projection_scale,
)

__all__ = ["AliG", "project_onto_ball"]

_LOSS_HELP = (
    "ALI-G computes its step size from the loss, and none reached it for this step. "
    "model.fit hands it over by itself on the TensorFlow and torch backends; on the JAX "
    "backend, add alig_tf.AliGTrainStep to your model's classes; in a custom loop call "
    "optimizer.apply(grads, variables, loss=loss) (or apply_gradients(..., loss=loss), "
    "stateless_apply(..., loss=loss)). A mixed_float16 policy wraps the optimizer in a "
    "LossScaleOptimizer that does not pass the loss on: use mixed_bfloat16 instead, "
    "which needs no loss scaling."
)


def _backend_name() -> str:
    return keras.backend.backend()


# ---------------------------------------------------------------- Keras' own arguments

_SUPPORTED_KERAS_ARGUMENTS = frozenset(
    {
        "use_ema",
        "ema_momentum",
        "ema_overwrite_frequency",
        "loss_scale_factor",
        "gradient_accumulation_steps",
    }
)
"""The arguments of ``keras.optimizers.Optimizer`` that AliG passes on (besides ``name``).

A whitelist: each was read in Keras' source and is tested to keep ALI-G's step exact (the
moving average of the weights does not feed back into the step; Keras divides the
gradients by ``loss_scale_factor`` before the step and :meth:`AliG.scale_loss` keeps the
unscaled loss; with ``gradient_accumulation_steps`` AliG averages the losses as Keras
averages the gradients). Any other argument, a new Keras one included, is refused until
it has been decided on.
"""

_NO_CLIPPING = (
    "ALI-G's step size gamma = (loss - f_star) / (||g||^2 + eps) needs the norm of the raw "
    "gradient, and Keras clips the gradients before the step: gamma would come from the "
    "clipped gradient (a step of up to loss / clipnorm^2 along it). Leave clipnorm, "
    "global_clipnorm and clipvalue unset (None); the cap max_lr bounds the step instead."
)

_REFUSED_KERAS_ARGUMENTS: dict[str, str] = {
    "weight_decay": (
        "Keras decays the weights by learning_rate * weight_decay, and AliG's learning rate "
        "is its cap max_lr (inf without a cap), not the step size gamma: one step would "
        "scale the weights by 1 - inf. Constrain the weights to an l2 ball instead, as "
        "the paper does: AliG(max_norm=r), with alig_tf.project_onto_ball("
        "model.trainable_variables, r) once at the start; or add an l2 penalty to the "
        "loss (kernel_regularizer=...), which then is part of the loss ALI-G sees."
    ),
    "clipnorm": _NO_CLIPPING,
    "global_clipnorm": _NO_CLIPPING,
    "clipvalue": _NO_CLIPPING,
}
"""Arguments of ``keras.optimizers.Optimizer`` that would change ALI-G's step, and why.

``None`` (their default, as ``get_config`` writes it) is accepted.
"""


def _check_keras_arguments(kwargs: dict[str, Any]) -> None:
    """Raises a ``ValueError`` for an argument of Keras' optimizer that AliG does not take."""
    if "learning_rate" in kwargs:
        raise ValueError(
            "AliG takes its cap on the step size as max_lr=, not learning_rate= "
            f"(got learning_rate={kwargs['learning_rate']!r})."
        )
    for name, why in _REFUSED_KERAS_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"AliG does not take {name} (got {name}={kwargs[name]!r}). {why}")
    unknown = sorted(set(kwargs) - _SUPPORTED_KERAS_ARGUMENTS - set(_REFUSED_KERAS_ARGUMENTS))
    if unknown:
        given = ", ".join(f"{name}={kwargs[name]!r}" for name in unknown)
        raise ValueError(
            f"AliG does not support the argument(s) {given}. It takes max_lr, momentum, "
            "adjusted_momentum, eps, f_star, max_norm and name, and of "
            "keras.optimizers.Optimizer's arguments only "
            f"{', '.join(sorted(_SUPPORTED_KERAS_ARGUMENTS))}: each of those is tested to "
            "leave ALI-G's step exact. Remove the argument (a misspelt name?)."
        )


# ---------------------------------------------------------------- the loss of the next step


def _replica_key() -> Any:
    """Which replica is running: its id under a multi-replica ``tf.distribute`` strategy.

    ``None`` elsewhere (one replica, other backends). MirroredStrategy runs each replica
    in a thread of its own, all in the same optimizer; they meet at every merge call.
    """
    if _backend_name() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync < 2:
        return None
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    return ("thread", threading.get_ident()) if replica is None else int(replica)


class _PendingLosses:
    """The loss handed over for the next step: one slot per replica.

    Filled by ``scale_loss`` (or ``loss=``), taken by the step. Under MirroredStrategy the
    replicas' threads share the optimizer and may pass a merge call between the two (Keras'
    own steps make several), so each replica keeps its loss in a slot of its own.
    """

    def __init__(self) -> None:
        self._slots: dict[Any, Any] = {}

    def put(self, loss: Any) -> None:
        self._slots[_replica_key()] = loss

    def take(self) -> Any:
        """This replica's loss (``None`` if there is none), and the slot emptied."""
        return self._slots.pop(_replica_key(), None)

    def clear(self) -> None:
        self._slots.pop(_replica_key(), None)


def _multi_replica_context() -> Any:
    """The tf.distribute replica context when training on more than one replica, else None."""
    if _backend_name() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.get_strategy().num_replicas_in_sync < 2:
        return None
    context = tf.distribute.get_replica_context()
    if context is None:
        raise NotImplementedError(
            "alig_tf.AliG steps inside a replica context (model.fit, or strategy.run in a "
            "custom loop); calling apply() in cross-replica context is not supported."
        )
    return context


def _run_updates(
    updates: list[tuple[Any, Any, tuple[Any, ...]]], replica_context: Any, strategy: Any
) -> None:
    """Runs ``fn(variable, *args)`` for each update.

    Directly, or under tf.distribute on every replica's copy of the variable (as Keras' own
    TensorFlow optimizer does).
    """
    if replica_context is None:
        for fn, variable, args in updates:
            fn(variable, *args)
        return
    import tensorflow as tf

    def distributed(distribution: Any, args_list: list[tuple[Any, ...]]) -> None:
        for (fn, variable, _), args in zip(updates, args_list, strict=True):
            target = variable.value if isinstance(variable, keras.Variable) else variable
            distribution.extended.update(target, fn, args=args, group=False)

    tf.__internal__.distribute.interim.maybe_merge_call(
        distributed, strategy, [args for _, _, args in updates]
    )


def _keep_if(skipped: Any, old: Any, new: Any) -> Any:
    """``old`` if the step is skipped (a 0-d bool), else ``new``: a whole tensor either way.

    On TensorFlow this is the v1 ``Select``, which forwards one of its inputs when the
    condition is a scalar; ``SelectV2`` (``ops.where``) broadcasts the condition and picks
    entry by entry on one thread (without XLA 4x slower than a multiplication: it made the
    momentum step 4.4x SGD's). Under XLA both compile to the same fused select.
    """
    if _backend_name() == "tensorflow":
        import tensorflow as tf

        return tf.compat.v1.where(skipped, old, new)
    return ops.where(skipped, old, new)


def _value(variable: Any) -> Any:
    """The current value of a Keras variable (the scoped one inside ``stateless_apply``)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


_FOLD = 8
"""Slices per fold of the TensorFlow norm (see :func:`_sum_of_squares`)."""

_FIRST_FOLD_FROM = 8 * 1024
"""A tensor is folded once from this many entries on, ..."""

_NEXT_FOLD_FROM = 1 << 20
"""... and again while the folded result still has this many."""


def _sum_of_squares(tensors: list[Any], dtype: str) -> Any:
    """Sum of all squared entries, in ``dtype``.

    On TensorFlow under XLA (``jit_compile=True``), each flattened tensor is first
    *folded*: cut into 8 equal slices whose squares are added entry by entry (the result,
    again in 8 slices while it has a million entries or more); only that goes to a
    reduction. A fold is an elementwise loop, which XLA runs vectorized near the memory
    bandwidth, while its CPU reduction of a squared tensor is a scalar loop (ResNet-18
    shapes: about 2 ms for the folds against 22 ms). Each folded entry is a short sum, so the
    total stays accurate (at most 2e-6 relative error in float32 up to 1e8 entries, where
    the plain reduction drifts to 6e-5; one long ``ops.vdot`` is 2% low). The small
    tensors, and the entries left over by the slices, are joined into one vector, folded
    in turn: one reduction instead of one per tensor.

    On TensorFlow without XLA (eagerly, or a plain ``tf.function``), ``tf.nn.l2_loss``:
    one kernel per tensor that squares and sums in a single pass (5x faster than the folds,
    which there become 15 kernels a tensor), as accurate. Elsewhere, plain
    ``sum(square(.))`` (Keras' torch ``vdot`` also loses float64 precision, keras 3.15).
    """
    if _backend_name() != "tensorflow":
        total = ops.zeros((), dtype)
        for tensor in tensors:
            total = total + _sq(ops.cast(tensor, dtype))
        return total
    import tensorflow as tf

    if not _in_xla():
        halves = [tf.nn.l2_loss(ops.cast(tensor, dtype)) for tensor in tensors]
        return 2 * functools.reduce(ops.add, halves, ops.zeros((), dtype))
    sums: list[Any] = []
    loose: list[Any] = []  # flat entries still to be squared: small tensors, remainders
    for tensor in tensors:
        flat = ops.reshape(ops.cast(tensor, dtype), (-1,))
        if flat.shape[0] is None:  # a size known only when the step runs
            sums.append(_sq(flat))
        elif flat.shape[0] < _FIRST_FOLD_FROM:
            loose.append(flat)
        else:
            sums.append(_fold(flat, loose))
    if loose:
        joined = ops.concatenate(loose) if len(loose) > 1 else loose[0]
        if joined.shape[0] >= _FIRST_FOLD_FROM:
            left_over: list[Any] = []
            sums.append(_fold(joined, left_over))
            sums.extend(_sq(entries) for entries in left_over)
        else:
            sums.append(_sq(joined))
    return functools.reduce(ops.add, sums) if sums else ops.zeros((), dtype)


def _in_xla() -> bool:
    """Whether TensorFlow is tracing for XLA (``jit_compile=True``, also of an outer function).

    Through ``tf.__internal__.get_enclosing_xla_context`` (exported, but internal: should a
    release drop it, every step takes the XLA formulation, correct everywhere).
    """
    import tensorflow as tf

    find = getattr(tf.__internal__, "get_enclosing_xla_context", None)
    return find is None or find() is not None


def _sq(flat: Any) -> Any:
    """The plain sum of squares of ``flat``."""
    return ops.sum(ops.square(flat))


def _fold(flat: Any, loose: list[Any]) -> Any:
    """The sum of squares of ``flat`` (1-D, at least ``_FIRST_FOLD_FROM`` entries) by folds.

    The entries that do not fill the first fold's slices are appended to ``loose``.
    """
    squared = False  # whether the entries of flat are sums of squares already
    remainders: list[Any] = []
    while flat.shape[0] >= (_NEXT_FOLD_FROM if squared else _FIRST_FOLD_FROM):
        size = flat.shape[0]
        whole = size - size % _FOLD
        if whole < size:
            (remainders if squared else loose).append(flat[whole:])
        parts = ops.reshape(flat[:whole], (_FOLD, whole // _FOLD))
        terms = [parts[i] if squared else ops.square(parts[i]) for i in range(_FOLD)]
        flat = functools.reduce(ops.add, terms)
        squared = True
    return functools.reduce(ops.add, [ops.sum(r) for r in remainders], ops.sum(flat))


def _as_loss(loss: Any) -> Any:
    """Checks the loss and returns it as a tensor with no gradient attached."""
    if isinstance(loss, str | bytes | bool):
        raise ValueError(
            f"ALI-G needs the loss as a real scalar tensor or number, got {loss!r} "
            f"(type {type(loss).__name__}). Pass the value that was differentiated: "
            "optimizer.apply(grads, variables, loss=loss)."
        )
    if isinstance(loss, int | float):  # converted at the step, in the accumulation dtype
        return float(loss)
    tensor = ops.convert_to_tensor(loss)
    if len(tensor.shape) != 0 and math.prod(tensor.shape) != 1:
        raise ValueError(
            f"ALI-G needs the loss as a scalar, got a tensor of shape {tuple(tensor.shape)}. "
            "Reduce it first (e.g. ops.mean(loss)) and pass the value that was differentiated."
        )
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if "float" not in dtype and "int" not in dtype:
        raise ValueError(
            f"ALI-G needs the loss as a real scalar, got {loss!r} of dtype {dtype}. "
            "Pass the real-valued loss that was differentiated."
        )
    return ops.stop_gradient(ops.reshape(tensor, ()))


@keras.saving.register_keras_serializable(package="alig")
class AliG(keras.optimizers.Optimizer):
    r"""ALI-G: SGD with the Polyak step size, capped at ``max_lr``, for Keras 3.

    .. math::

        \gamma_t = \min\left(\max\left(\frac{l_t - f_\star}{\|g_t\|^2 + \epsilon},
        0\right), \eta\right)

    with :math:`l_t` the (unscaled) training loss and :math:`\|g_t\|^2` the squared norm
    of all gradients (accumulated in at least float32). Then, with buffer :math:`b`:

    * ``momentum == 0``: :math:`w \leftarrow w - \gamma g`;
    * standard (default; ``keras.optimizers.SGD(nesterov=True)`` with lr = gamma, which
      keeps the learning rate inside its buffer): :math:`b \leftarrow \mu b - \gamma g`,
      :math:`w \leftarrow w - \gamma g + \mu b`;
    * ``adjusted_momentum=True`` (``torch.optim.SGD(nesterov=True)`` and
      ``optax.sgd(nesterov=True)`` with lr = gamma): :math:`b \leftarrow \mu b - g`,
      :math:`w \leftarrow w - \gamma g + \gamma\mu b`;

    and with ``max_norm`` all trainable variables are scaled back onto the l2 ball of
    that radius. A step whose loss or gradient norm is not finite is skipped: variables,
    buffers and the recorded step size stay as they were and ``steps_skipped`` goes up.

    How the loss arrives: ``model.fit`` passes it through ``scale_loss`` on the
    TensorFlow and torch backends, unchanged; on the JAX backend the model needs the
    :class:`AliGTrainStep` mixin (Keras' JAX trainer drops what ``scale_loss`` does). In a
    custom loop: ``optimizer.apply(grads, variables, loss=loss)``. A step without a loss
    raises a ``ValueError`` (when the step runs eagerly, or when a compiled step is
    traced): it is never taken with a stale value.

    With ``gradient_accumulation_steps=k`` each call hands over its micro-batch's loss, as
    above; Keras adds the gradients up and AliG the losses (``accumulated_loss``), and the
    k-th call steps once with both means: the step on the union of the k micro-batches.

    Under ``tf.distribute`` (e.g. ``MirroredStrategy``), the replicas' losses and gradients
    are summed inside the step (Keras has divided each replica's loss by the number of
    replicas), so every replica computes the step size of the global batch. Each replica's
    loss waits for the step in a slot of its own.

    Monitoring: ``gamma``, ``gamma_hat``, ``capped``, ``steps_taken`` and
    ``steps_skipped`` are optimizer variables (saved with the model).

    Args:
      max_lr: the cap ``eta`` on the step size, a number (an int too) or a
        ``keras.optimizers.schedules.LearningRateSchedule`` (of ``steps_taken``, which
        skipped steps do not advance); ``None`` for no cap. It is the
        optimizer's ``learning_rate`` (``inf`` when there is no cap).
      momentum: ``mu``, with ``0 <= mu < 1``.
      adjusted_momentum: the momentum convention (the two agree while gamma is constant).
      eps: ``delta``, added to the squared gradient norm.
      f_star: the lower bound of the loss.
      max_norm: radius of the l2-ball constraint; ``None`` for no projection. Project
        the initial weights with :func:`project_onto_ball`.
      name: the optimizer's name.
      **kwargs: of ``keras.optimizers.Optimizer``'s arguments, those that leave ALI-G's
        step exact: ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency`` (an
        average of the weights, which does not enter the step), ``loss_scale_factor``
        (the loss is kept unscaled) and ``gradient_accumulation_steps``. Any other
        argument raises a ``ValueError``: ``weight_decay`` (Keras decays by the learning
        rate, which is the cap here, not gamma: use ``max_norm``), ``clipnorm``,
        ``global_clipnorm`` and ``clipvalue`` (the norm must be the raw gradient's),
        and any argument not decided on yet.

    Example:
      >>> import numpy as np, keras
      >>> from alig_tf import AliG, AliGTrainStep
      >>> class Regressor(AliGTrainStep, keras.Sequential):  # the mixin: for JAX only
      ...     pass
      >>> model = Regressor([keras.Input((4,)), keras.layers.Dense(1)])
      >>> model.compile(optimizer=AliG(max_lr=0.1, momentum=0.9), loss="mse")
      >>> history = model.fit(np.ones((8, 4)), np.zeros((8, 1)), verbose=0)
      >>> int(model.optimizer.steps_taken.numpy())
      1

    Reference:
      L. Berrada, A. Zisserman, M. P. Kumar, "Training Neural Networks for and by
      Interpolation", ICML 2020, arXiv:1906.05661.
    """

    def __init__(
        self,
        max_lr: float | keras.optimizers.schedules.LearningRateSchedule | None = None,
        momentum: float = 0.0,
        *,
        adjusted_momentum: bool = False,
        eps: float = 1e-5,
        f_star: float = 0.0,
        max_norm: float | None = None,
        name: str = "alig",
        **kwargs: Any,
    ) -> None:
        _check_keras_arguments(kwargs)
        schedule = isinstance(max_lr, keras.optimizers.schedules.LearningRateSchedule)
        config = AliGConfig(
            max_lr=max_lr if schedule else alig_core.validate_max_lr(max_lr),
            momentum=momentum,
            adjusted_momentum=adjusted_momentum,
            eps=eps,
            f_star=f_star,
            max_norm=max_norm,
        )
        if not schedule and max_lr is not None:
            max_lr = float(max_lr)  # an int, a NumPy number: Keras takes a float only
        super().__init__(learning_rate=math.inf if max_lr is None else max_lr, name=name, **kwargs)
        self.max_lr = max_lr
        self.momentum = config.momentum
        self.adjusted_momentum = config.adjusted_momentum
        self.eps = config.eps
        self.f_star = config.f_star
        self.max_norm = config.max_norm
        self._pending_losses = _PendingLosses()

    # ------------------------------------------------------------------ variables

    def build(self, variables: list[keras.Variable]) -> None:
        """Creates the momentum buffers and the monitoring variables."""
        if self.built:
            return
        variables = list(variables)
        if not variables:
            raise ValueError(
                "AliG got no variables to optimize (an empty list). Pass the model's "
                "trainable variables: optimizer.build(model.trainable_variables), or "
                "optimizer.apply(grads, model.trainable_variables, loss=loss)."
            )
        for variable in variables:
            dtype = keras.backend.standardize_dtype(variable.dtype)
            if "float" not in dtype:
                raise ValueError(
                    f"AliG optimizes real floating-point variables; {variable.path!r} has "
                    f"dtype {dtype} and shape {tuple(variable.shape)}. Leave integer "
                    "variables out of the optimized list (trainable=False), and optimize a "
                    "complex quantity as two float variables (its real and imaginary parts)."
                )
        super().build(variables)
        self._accumulation_dtype = alig_core.accumulation_dtype(
            "float64" if any(v.dtype == "float64" for v in variables) else "float32"
        )
        dtype = self._accumulation_dtype
        self.momentums = (
            self.add_optimizer_variables(variables, "momentum") if self.momentum != 0 else []
        )
        self.gamma = self.add_variable((), initializer="zeros", dtype=dtype, name="gamma")
        self.gamma_hat = self.add_variable((), initializer="zeros", dtype=dtype, name="gamma_hat")
        self.capped = self.add_variable((), initializer="zeros", dtype="bool", name="capped")
        self.steps_taken = self.add_variable((), initializer="zeros", dtype="int", name="taken")
        self.steps_skipped = self.add_variable((), initializer="zeros", dtype="int", name="skipped")
        if self.gradient_accumulation_steps:
            # The sum of the losses of the micro-batches accumulated so far.
            self.accumulated_loss = self.add_variable(
                (), initializer="zeros", dtype=dtype, name="accumulated_loss"
            )
        # Last, so that load_own_variables finds it: what the momentum buffers hold.
        self.momentum_convention = self.add_variable(
            (),
            initializer=keras.initializers.Constant(self._convention_code()),
            dtype="int",
            name="momentum_convention",
        )

    def _convention_code(self) -> int:
        """What the momentum buffers hold (:func:`alig_core.momentum_convention`)."""
        return alig_core.momentum_convention(self.momentum != 0, self.adjusted_momentum)

    def load_own_variables(self, store: Any) -> None:
        """Loads the optimizer's variables; refuses those of the other momentum convention.

        The buffers of the two conventions hold different quantities (``-gamma*g`` terms
        against ``-g`` terms): resuming with the other one would silently change the
        trajectory (a ``.keras`` file rebuilds the saved optimizer, so this guards
        ``load_weights`` into a model compiled with another AliG).
        """
        if self.built and len(store.keys()) == len(self.variables):
            saved = int(ops.convert_to_numpy(store[str(len(self.variables) - 1)]))
            ours = self._convention_code()
            if saved != ours:
                raise ValueError(
                    f"These optimizer variables were saved by an AliG with "
                    f"{alig_core.describe_momentum_convention(saved)}, and this AliG has "
                    f"{alig_core.describe_momentum_convention(ours)}: their momentum buffers "
                    "hold different quantities. "
                    "Compile the model with an AliG of the checkpoint's settings to resume."
                )
        super().load_own_variables(store)

    # ------------------------------------------------------------------ the loss

    def scale_loss(self, loss: Any) -> Any:
        """Keeps the (unscaled) training loss for the next step, then scales it as Keras does.

        The TensorFlow and torch trainers call this just before differentiating.
        """
        if _backend_name() != "jax":  # the JAX trainer runs this in a scope it discards
            self._pending_losses.put(_as_loss(loss))
        return super().scale_loss(loss)

    def apply(
        self, grads: list[Any], trainable_variables: list[Any] | None = None, loss: Any = None
    ) -> None:
        """Applies one ALI-G step; ``loss`` is the unscaled loss of these gradients."""
        if trainable_variables is not None and not self.built:
            # Its checks run before Keras' no-op on []; in the scope Keras' apply uses.
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        if grads and all(g is None for g in grads):
            raise ValueError(
                "No gradient reached AliG for any variable (every gradient is None). Check "
                "that the loss depends on the variables passed with the gradients and that "
                "they are trainable (a frozen model has nothing to step)."
            )
        if loss is not None:
            self._pending_losses.put(_as_loss(loss))
        try:
            super().apply(grads, trainable_variables)
        finally:
            self._pending_losses.clear()  # a loss serves one step only

    def apply_gradients(self, grads_and_vars: Any, loss: Any = None) -> Any:
        """``apply_gradients`` with the loss, for tf.keras-style loops."""
        grads, trainable_variables = zip(*grads_and_vars, strict=True)
        self.apply(list(grads), list(trainable_variables), loss=loss)
        return self._iterations

    def stateless_apply(
        self,
        optimizer_variables: list[Any],
        grads: list[Any],
        trainable_variables: list[Any],
        loss: Any = None,
    ) -> tuple[list[Any], list[Any]]:
        """``stateless_apply`` with the loss (JAX backend custom loops and train steps)."""
        if loss is not None:
            self._pending_losses.put(_as_loss(loss))
        try:
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)
        finally:
            self._pending_losses.clear()

    # ------------------------------------------------------------------ the step

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Not used: ALI-G's step is global (see ``_backend_update_step``)."""
        raise NotImplementedError("AliG updates all variables at once in _backend_update_step.")

    def _take_loss(self) -> Any:
        """This replica's pending loss, in the accumulation dtype; raises if there is none."""
        loss = self._pending_losses.take()
        if loss is None:
            raise ValueError(_LOSS_HELP)
        dtype = self._accumulation_dtype
        if isinstance(loss, float):  # not through float32 (TensorFlow's default)
            return ops.convert_to_tensor(loss, dtype=dtype)
        return ops.cast(loss, dtype)

    def _backend_apply_gradients(self, grads: list[Any], trainable_variables: list[Any]) -> None:
        """With ``gradient_accumulation_steps``: the loss accumulates with the gradients.

        Keras adds each micro-batch's gradients to its accumulators and, every k-th call,
        steps with their mean. Here each call's loss is added to ``accumulated_loss`` (an
        optimizer variable: it works in ``stateless_apply``, and is saved and restored), and
        the step receives the mean of the k losses: the loss of the gradient it applies.
        """
        if self.gradient_accumulation_steps:
            steps = self.gradient_accumulation_steps
            total = _value(self.accumulated_loss) + self._take_loss()
            last = (self._iterations + 1) % steps == 0
            self._pending_losses.put(total / steps)  # taken by the k-th call's step
            # Assigned before Keras' JAX path saves the optimizer variables that a
            # non-stepping call restores; zero again after the k-th call.
            self.assign(self.accumulated_loss, ops.where(last, ops.zeros_like(total), total))
        super()._backend_apply_gradients(grads, trainable_variables)

    def _backend_update_step(
        self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any
    ) -> None:
        loss = self._take_loss()
        dtype = self._accumulation_dtype
        replica_context = _multi_replica_context()
        if replica_context is not None:
            # tf.distribute: Keras divided each replica's loss by the number of replicas and
            # sums the gradients here, so the sums are the global batch's mean loss and
            # gradient: every replica then computes the same step size.
            import tensorflow as tf

            pairs = self._all_reduce_sum_gradients(
                list(zip(grads, trainable_variables, strict=True))
            )
            grads = [g for g, _ in pairs]
            loss = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, loss)
        size = alig_core.step_size(
            ops,
            loss,
            _sum_of_squares(grads, dtype),
            max_lr=self._cap(learning_rate, dtype),
            eps=self.eps,
            f_star=self.f_star,
        )
        coefficients = momentum_coefficients(
            size.gamma, momentum=self.momentum, adjusted_momentum=self.adjusted_momentum
        )
        updates: list[tuple[Any, Any, tuple[Any, ...]]] = [
            (self._update_variable, variable, (g, size, coefficients))
            for g, variable in zip(grads, trainable_variables, strict=True)
        ]
        for record, new in (
            (self.gamma, size.gamma),
            (self.gamma_hat, size.gamma_hat),
            (self.capped, size.capped),
        ):
            updates.append((self._keep_or_assign, record, (size.skipped, new)))
        one, zero = ops.ones((), self.steps_taken.dtype), ops.zeros((), self.steps_taken.dtype)
        updates.append((self._add, self.steps_taken, (ops.where(size.skipped, zero, one),)))
        updates.append((self._add, self.steps_skipped, (ops.where(size.skipped, one, zero),)))
        _run_updates(updates, replica_context, self._distribution_strategy_or_none())

        if self.max_norm is not None:  # after the updates: the norm of the new values
            managed = self._trainable_variables
            sq_norm = _sum_of_squares([_value(v) for v in managed], dtype)
            scale = ops.where(size.skipped, 1.0, projection_scale(ops, sq_norm, self.max_norm))
            _run_updates(
                [(self._scale_variable, v, (scale, dtype)) for v in managed],
                replica_context,
                self._distribution_strategy_or_none(),
            )

    # The per-variable updates, called directly or, under tf.distribute, on each replica's
    # copy of the variable (``variable`` is then a tf.Variable).

    def _update_variable(
        self,
        variable: Any,
        g: Any,
        size: alig_core.StepSize,
        coefficients: alig_core.MomentumCoefficients,
    ) -> None:
        dtype = self._accumulation_dtype
        value = ops.cast(_value(variable), dtype)
        g = ops.cast(g, dtype)
        if self.momentum == 0:
            new_value = alig_core.sgd_update(value, g, size.gamma)
        else:
            buffer = self.momentums[self._get_variable_index(variable)]
            old_buffer = _value(buffer)
            new_buffer = momentum_buffer_update(g, ops.cast(old_buffer, dtype), coefficients)
            self.assign(
                buffer, _keep_if(size.skipped, old_buffer, ops.cast(new_buffer, buffer.dtype))
            )
            if keras.backend.standardize_dtype(buffer.dtype) == dtype:
                # The buffer as written (equal unless the step is skipped, and then the
                # parameter keeps its value): XLA then reads it instead of recomputing it
                # from the old buffer, which it would have to copy first (2 passes more).
                new_buffer = _value(buffer)
            new_value = momentum_param_update(value, g, new_buffer, coefficients)
        self.assign(
            variable,
            _keep_if(size.skipped, _value(variable), ops.cast(new_value, variable.dtype)),
        )

    def _keep_or_assign(self, record: Any, skipped: Any, new: Any) -> None:
        self.assign(record, ops.where(skipped, _value(record), ops.cast(new, record.dtype)))

    def _add(self, counter: Any, increment: Any) -> None:
        self.assign_add(counter, increment)

    def _scale_variable(self, variable: Any, scale: Any, dtype: str) -> None:
        self.assign(variable, ops.cast(ops.cast(_value(variable), dtype) * scale, variable.dtype))

    def _get_current_learning_rate(self) -> Any:
        """A ``max_lr`` schedule is evaluated at ``steps_taken`` (skipped steps don't count).

        So a skipped step changes nothing, not even the next cap, as in ``alig_jax``.
        """
        if self.built and isinstance(
            self._learning_rate, keras.optimizers.schedules.LearningRateSchedule
        ):
            return self._learning_rate(self.steps_taken)
        return super()._get_current_learning_rate()

    def _distribution_strategy_or_none(self) -> Any:
        return getattr(self, "_distribution_strategy", None)

    def _cap(self, learning_rate: Any, dtype: str) -> Any:
        """The cap for this step, in the accumulation dtype (``None``: no cap).

        Keras keeps the learning rate in a ``floatx`` variable (float32 by default), so a
        float64 model would see ``max_lr`` rounded to float32. While that variable still
        holds ``max_lr`` (no callback or user changed it), the exact value is used.
        """
        if self.max_lr is None:
            return None
        current = ops.cast(learning_rate, dtype)
        if not isinstance(self.max_lr, int | float):  # a schedule: its value is the cap
            return current
        exact = ops.convert_to_tensor(float(self.max_lr), dtype=dtype)
        as_stored = ops.cast(
            ops.convert_to_tensor(float(self.max_lr), dtype=learning_rate.dtype), dtype
        )
        return ops.where(current == as_stored, exact, current)

    # ------------------------------------------------------------------ config

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments (``max_lr`` in place of ``learning_rate``)."""
        config = super().get_config()
        learning_rate = config.pop("learning_rate")
        config.update(
            {
                "max_lr": self._max_lr_for_config(learning_rate),
                "momentum": self.momentum,
                "adjusted_momentum": self.adjusted_momentum,
                "eps": self.eps,
                "f_star": self.f_star,
                "max_norm": self.max_norm,
            }
        )
        return config

    def _max_lr_for_config(self, learning_rate: Any) -> Any:
        """The cap to save: ``max_lr`` exactly, unless the learning rate was changed since.

        Keras saves its ``floatx`` learning-rate variable, in which a cap such as 0.1 is
        rounded to float32; while that variable still holds ``max_lr`` as stored, the
        exact ``max_lr`` is saved, as :meth:`_cap` uses it.
        """
        if self.max_lr is None:
            return None
        if not isinstance(self.max_lr, float) or not isinstance(
            self._learning_rate, keras.Variable
        ):
            return learning_rate  # a schedule, serialized
        stored = ops.convert_to_tensor(self.max_lr, dtype=self._learning_rate.dtype)
        return (
            self.max_lr if float(ops.convert_to_numpy(stored)) == learning_rate else learning_rate
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> AliG:
        """Rebuilds the optimizer from :meth:`get_config` (schedules included)."""
        config = dict(config)
        if isinstance(config.get("max_lr"), dict):
            config["max_lr"] = keras.optimizers.schedules.deserialize(
                config["max_lr"], custom_objects=custom_objects
            )
        return cls(**config)


def project_onto_ball(variables: list[keras.Variable], max_norm: float) -> None:
    """Scales ``variables`` in place onto the l2 ball of radius ``max_norm`` (all at once).

    ALI-G never changes weights at construction: call this once on the initial weights
    (``model.trainable_variables``) when training with ``max_norm``.

    Example:
      >>> v = keras.Variable([3.0, 4.0])
      >>> project_onto_ball([v], 1.0)
      >>> [round(float(x), 6) for x in v.numpy()]
      [0.6, 0.8]
    """
    alig_core.validate_max_norm(max_norm)
    if not variables:
        return
    dtype = "float64" if any(v.dtype == "float64" for v in variables) else "float32"
    sq_norm = _sum_of_squares([v.value for v in variables], dtype)
    scale = projection_scale(ops, sq_norm, max_norm)
    for v in variables:
        v.assign(ops.cast(ops.cast(v, dtype) * scale, v.dtype))
