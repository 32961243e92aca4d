"""ALI-G as a Keras 3 optimizer (TensorFlow, JAX and torch backends).

In Keras' own shape (as ``keras.optimizers.Nadam``): ``_backend_update_step`` takes the
loss, computes the step size once per step from it and the global gradient norm, moves
the records, and hands the step to Keras' per-variable loop, where :meth:`AliG.update_step`
updates one variable; the projection follows. The numbers come from :mod:`alig_core`,
called with ``keras.ops``; what only TensorFlow needs is in :mod:`alig_tf._tensorflow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
from keras import ops
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.utils.naming import auto_name

import alig_core
from alig_core import AliGConfig
from alig_core._math import momentum_buffer_update, momentum_coefficients
from alig_tf import _backend
from alig_tf._base import LossTakingOptimizer, as_loss, loss_in

__all__ = ["AliG", "project_onto_ball"]

_LOSS_HELP = (
    "ALI-G computes its step size from the loss, and none reached it for this step. "
    "model.fit hands it over by itself on the TensorFlow and torch backends; on the JAX "
    "backend, add alig_tf.AliGTrainStep to your model's classes; in a custom loop call "
    "optimizer.apply(grads, variables, loss=loss) (or apply_gradients(..., loss=loss), "
    "stateless_apply(..., loss=loss)). Under a mixed_float16 policy, compile() wraps the "
    "optimizer in keras.optimizers.LossScaleOptimizer, which does not pass the loss on: "
    "add alig_tf.AliGTrainStep to your model's classes (its compile() wraps AliG in "
    "alig_tf.LossScaleOptimizer, which does), or compile with "
    "optimizer=alig_tf.LossScaleOptimizer(AliG(...)) yourself."
)


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


class _Step(NamedTuple):
    """This step's numbers for every variable's update (passed as Keras' ``learning_rate``).

    ALI-G's learning rate is its step size: Keras' per-variable loop hands this to
    :meth:`AliG.update_step` in the place of the learning rate, and ``tf.distribute``
    hands each replica its own copy.
    """

    size: alig_core.StepSize
    coefficients: alig_core._math.MomentumCoefficients


@keras.saving.register_keras_serializable(package="alig")
class AliG(LossTakingOptimizer):
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
    traced): it is never taken with a stale value. Under ``mixed_float16`` the loss scaling
    goes through :class:`~alig_tf.LossScaleOptimizer`, which hands over the unscaled loss
    (the mixin's ``compile`` wraps AliG in it).

    Sparse gradients (``tf.IndexedSlices`` of an ``Embedding``, a JAX ``BCOO``, a torch
    sparse tensor) are made dense before the step, their repeated indices summed.

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
      max_lr: the cap ``eta`` on the step size, a number (an int too), a
        ``keras.optimizers.schedules.LearningRateSchedule`` (of ``steps_taken``, which
        skipped steps do not advance) or, as Keras' learning rate, a callable of no
        argument (called at every step); ``None`` for no cap. It is the optimizer's
        ``learning_rate`` (``inf`` when there is no cap). A cap that is below 0 when a step
        runs gives ``gamma = 0``: never an ascent step.
      momentum: ``mu``, with ``0 <= mu < 1``.
      adjusted_momentum: the momentum convention (the two agree while gamma is constant).
      eps: ``delta``, added to the squared gradient norm.
      f_star: the lower bound of the loss.
      max_norm: radius of the l2-ball constraint; ``None`` for no projection. Project
        the initial weights with :func:`project_onto_ball`.
      name: the optimizer's name; by default a unique one, as Keras gives its own
        optimizers (``"alig"``, ``"alig_1"``, ...).
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
        max_lr: float
        | keras.optimizers.schedules.LearningRateSchedule
        | Callable[..., Any]
        | None = None,
        momentum: float = 0.0,
        *,
        adjusted_momentum: bool = False,
        eps: float = 1e-5,
        f_star: float = 0.0,
        max_norm: float | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        _check_keras_arguments(kwargs)
        # As Keras' learning rate: a schedule (of the step count) or a zero-argument callable.
        config = AliGConfig(
            max_lr=max_lr,
            momentum=momentum,
            adjusted_momentum=adjusted_momentum,
            eps=eps,
            f_star=f_star,
            max_norm=max_norm,
        )
        if not callable(max_lr) and max_lr is not None:
            max_lr = float(max_lr)  # an int, a NumPy number: Keras takes a float only
        if name is None:  # unique, as Keras names its own: "alig", "alig_1", ...
            name = auto_name("alig")
        super().__init__(learning_rate=math.inf if max_lr is None else max_lr, name=name, **kwargs)
        self.max_lr = max_lr
        self.momentum = config.momentum
        self.adjusted_momentum = config.adjusted_momentum
        self.eps = config.eps
        self.f_star = config.f_star
        self.max_norm = config.max_norm
        self._given_sq_grad_norm: Any = None  # S handed over by _apply_with_sq_grad_norm
        self._taken_gamma: Any = None  # the gamma of the step that S was handed to

    # ------------------------------------------------------------------ variables

    def build(self, variables: list[keras.Variable]) -> None:
        """Creates the momentum buffers and the monitoring variables."""
        if self.built:
            return
        variables = list(variables)
        dtype = self._check_variables(
            variables,
            "optimizer.build(model.trainable_variables), or "
            "optimizer.apply(grads, model.trainable_variables, loss=loss)",
            allow_empty=True,  # as Keras' optimizers: a model with nothing to train
        )
        super().build(variables)
        self._accumulation_dtype = dtype
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
        self._refuse_other_settings(
            store,
            len(self.variables) - 1,
            self._convention_code(),
            alig_core.describe_momentum_convention,
            "their momentum buffers hold different quantities",
        )
        super().load_own_variables(store)

    # ------------------------------------------------------------------ the loss

    def apply(
        self, grads: list[Any], trainable_variables: list[Any] | None = None, loss: Any = None
    ) -> None:
        """Applies one ALI-G step; ``loss`` is the unscaled loss of these gradients."""
        if trainable_variables is not None and not self.built:
            # Its checks run before Keras' no-op on []; in the scope Keras' apply uses.
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        with self._loss_of_this_call(loss):
            super().apply(grads, trainable_variables)

    def _take_loss(self) -> Any:
        """This replica's pending loss, in the accumulation dtype; raises if there is none."""
        loss = self._pending_losses.take()
        if loss is None:
            raise ValueError(_LOSS_HELP)
        return loss_in(loss, self._accumulation_dtype)

    def _backend_apply_gradients(self, grads: list[Any], trainable_variables: list[Any]) -> None:
        """With ``gradient_accumulation_steps``: the loss accumulates with the gradients.

        Keras adds each micro-batch's gradients to its accumulators and, every k-th call,
        steps with their mean. Here each call's loss is added to ``accumulated_loss`` (an
        optimizer variable: it works in ``stateless_apply``, and is saved and restored), and
        the step receives the mean of the k losses: the loss of the gradient it applies.
        """
        if self.gradient_accumulation_steps:
            steps = self.gradient_accumulation_steps
            total = _backend.value(self.accumulated_loss) + self._take_loss()
            last = (self._iterations + 1) % steps == 0
            self._pending_losses.put(total / steps)  # taken by the k-th call's step
            # Assigned before Keras' JAX path saves the optimizer variables that a
            # non-stepping call restores; zero again after the k-th call.
            self.assign(self.accumulated_loss, ops.where(last, ops.zeros_like(total), total))
        super()._backend_apply_gradients(grads, trainable_variables)

    # ------------------------------------------------------------------ the step

    def _backend_update_step(
        self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any
    ) -> None:
        """The step size once per step (as Nadam's scalar), then Keras' per-variable loop.

        Then the records (``alig_core._math.record_step``) and, with ``max_norm``, the projection
        (``alig_core._math.projection_scale``), both skip-gated by the core.
        """
        loss = self._take_loss()
        dtype = self._accumulation_dtype
        grads = _backend.dense(grads)  # sparse gradients (an Embedding's): duplicates summed
        replicas = _backend.multi_replica_context()
        if replicas is not None:  # tf.distribute: the step of the global batch
            from alig_tf import _tensorflow

            grads, loss = _tensorflow.all_reduce_sum(
                self, replicas, grads, trainable_variables, loss
            )
        sq_grad_norm = self._given_sq_grad_norm  # the extrapolation wrapper's, if any
        if sq_grad_norm is None:
            sq_grad_norm = _backend.sum_of_squares(grads, dtype)
        size = self._step_size(loss, sq_grad_norm, learning_rate)
        if self._given_sq_grad_norm is not None:
            self._taken_gamma = size.gamma  # handed back to the wrapper
        step = _Step(
            size,
            momentum_coefficients(
                size.gamma, momentum=self.momentum, adjusted_momentum=self.adjusted_momentum
            ),
        )
        records = alig_core._math.record_step(ops, self._records(), size)
        updates: list[tuple[Any, Any, tuple[Any, ...]]] = [
            (self._assign_record, variable, (new,))
            for variable, new in zip(self._record_variables(), records, strict=True)
        ]
        if replicas is None:
            # Keras' per-variable loop, the base optimizer's (what Nadam's super() call
            # reaches on JAX and torch). Not the TensorFlow backend's override: it sums the
            # gradients over the replicas, which the step size needed first (above), and
            # wraps each update for tf.distribute, a cost of eager steps (benchmarks/README.md,
            # "Keras on TensorFlow: the sum of squares").
            BaseOptimizer._backend_update_step(self, grads, trainable_variables, step)
        else:  # the gradients are summed already: each replica's copies updated
            updates = [
                (self._update_replica_variable, variable, (g, step))
                for g, variable in zip(grads, trainable_variables, strict=True)
            ] + updates
        _backend.run_updates(updates, replicas)

        if self.max_norm is not None:  # after the updates: the norm of the new values
            managed = self._trainable_variables
            scale = alig_core._math.projection_scale(
                ops,
                _backend.sum_of_squares([_backend.value(v) for v in managed], dtype),
                self.max_norm,
                skipped=size.skipped,
            )
            _backend.run_updates(
                [(self._scale_variable, v, (scale, dtype)) for v in managed], replicas
            )

    def update_step(self, gradient: Any, variable: Any, learning_rate: _Step) -> None:
        """One variable's update with this step's numbers; kept as it is if skipped.

        Args:
          gradient: the variable's gradient (summed over the replicas).
          variable: the variable (under tf.distribute, one replica's ``tf.Variable``).
          learning_rate: the step's :class:`_Step` (ALI-G's learning rate is its step size).
        """
        size, coefficients = learning_rate
        dtype = self._accumulation_dtype
        value = ops.cast(_backend.value(variable), dtype)
        g = ops.cast(gradient, dtype)
        if self.momentum == 0:
            new_value = alig_core._math.sgd_update(value, g, size.gamma)
        else:
            buffer = self.momentums[self._get_variable_index(variable)]
            old_buffer = _backend.value(buffer)
            new_buffer = momentum_buffer_update(g, ops.cast(old_buffer, dtype), coefficients)
            self.assign(
                buffer,
                _backend.keep_if(size.skipped, old_buffer, ops.cast(new_buffer, buffer.dtype)),
            )
            if keras.backend.standardize_dtype(buffer.dtype) == dtype:
                # The buffer as written (equal unless the step is skipped, and then the
                # parameter keeps its value): XLA then reads it instead of recomputing it
                # from the old buffer, which it would have to copy first (2 passes more;
                # test_the_compiled_momentum_step_copies_no_buffer).
                new_buffer = _backend.value(buffer)
            new_value = alig_core._math.momentum_param_update(value, g, new_buffer, coefficients)
        self.assign(
            variable,
            _backend.keep_if(
                size.skipped, _backend.value(variable), ops.cast(new_value, variable.dtype)
            ),
        )

    # Called directly or, under tf.distribute, on each replica's copy of the variable
    # (``variable`` is then a tf.Variable).

    def _update_replica_variable(self, variable: Any, gradient: Any, step: _Step) -> None:
        self.update_step(gradient, variable, step)

    def _records(self) -> alig_core._math.Records:
        """The records before this step (:class:`alig_core._math.Records`)."""
        return alig_core._math.Records(*(_backend.value(v) for v in self._record_variables()))

    def _record_variables(self) -> tuple[Any, ...]:
        """The optimizer variables that hold the records, in ``alig_core._math.Records`` order."""
        return (self.gamma, self.gamma_hat, self.capped, self.steps_taken, self.steps_skipped)

    def _assign_record(self, record: Any, new: Any) -> None:
        self.assign(record, ops.cast(new, record.dtype))

    def _scale_variable(self, variable: Any, scale: Any, dtype: str) -> None:
        value = ops.cast(_backend.value(variable), dtype)
        self.assign(variable, ops.cast(value * scale, variable.dtype))

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        """ALI-G's step size ``gamma`` for an evaluation ``(l, S)``, moving nothing.

        The step size this optimizer's next step would take from the loss ``l`` and the
        squared global gradient norm ``S`` (:func:`alig_core.step_size`, with this
        optimizer's cap at the current step: a ``max_lr`` schedule at ``steps_taken``, a
        learning rate set by a callback; and its ``eps`` and ``f_star``). 0 where the step
        would be skipped (a non-finite loss or ``S``). No variable or record moves.

        Args:
          loss: the (unscaled) loss, a number or a 0-d tensor.
          sq_grad_norm: ``S``, the sum of the squared gradient entries, a number or a 0-d
            tensor.

        Returns:
          ``gamma``, a 0-d tensor of the accumulation dtype (``floatx``'s, at least
          float32, before the optimizer is built).

        Example:
          >>> opt = AliG(max_lr=0.5, eps=0.0, f_star=0.0)
          >>> float(opt.step_size_at(1.0, 4.0))  # (1 - 0) / (4 + 0), under the cap
          0.25
          >>> float(opt.step_size_at(4.0, 4.0))  # 1.0, capped at max_lr
          0.5
        """
        return self._step_size(as_loss(loss), sq_grad_norm, self.learning_rate).gamma

    def _step_size(self, loss: Any, sq_grad_norm: Any, learning_rate: Any) -> alig_core.StepSize:
        """The step size from ``(l, S)`` with the cap from ``learning_rate`` (Keras' current)."""
        dtype = (
            self._accumulation_dtype
            if self.built
            else alig_core._math.accumulation_dtype(keras.config.floatx())
        )
        return alig_core.step_size(
            ops,
            loss_in(loss, dtype),
            loss_in(float(sq_grad_norm) if isinstance(sq_grad_norm, int) else sq_grad_norm, dtype),
            max_lr=self._cap(learning_rate, dtype),
            eps=self.eps,
            f_star=self.f_star,
        )

    def _apply_with_sq_grad_norm(
        self, grads: list[Any], trainable_variables: list[Any], loss: Any, sq_grad_norm: Any
    ) -> Any:
        """One step on the given loss and ``S`` (the extrapolation wrapper's: one norm a call).

        ``S`` must be the squared global norm of ``grads`` in the accumulation dtype; the
        step takes it as it is, instead of computing it again. Returns the step's ``gamma``
        (0 where it was skipped).
        """
        self._given_sq_grad_norm = sq_grad_norm
        try:
            self.apply(grads, trainable_variables, loss=loss)
            return self._taken_gamma
        finally:
            self._given_sq_grad_norm = None
            self._taken_gamma = None

    def _get_current_learning_rate(self) -> Any:
        """A ``max_lr`` schedule is evaluated at ``steps_taken`` (skipped steps don't count).

        So a skipped step changes nothing, not even the next cap, as in ``alig_jax``.
        """
        if self.built and isinstance(
            self._learning_rate, keras.optimizers.schedules.LearningRateSchedule
        ):
            return self._learning_rate(self.steps_taken)
        return super()._get_current_learning_rate()

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
        """Rebuilds the optimizer from :meth:`get_config` (schedules and callables included)."""
        config = dict(config)
        if isinstance(config.get("max_lr"), dict):  # a schedule or a callable, as Keras'
            config["max_lr"] = keras.saving.deserialize_keras_object(
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
    alig_core._config.validate_max_norm(max_norm)
    if not variables:
        return
    dtype = alig_core._math.accumulation_dtype(*(v.dtype for v in variables))
    sq_norm = _backend.sum_of_squares([_backend.value(v) for v in variables], dtype)
    scale = alig_core._math.projection_scale(ops, sq_norm, max_norm)
    for v in variables:
        v.assign(ops.cast(ops.cast(v, dtype) * scale, v.dtype))
