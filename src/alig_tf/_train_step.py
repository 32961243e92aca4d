"""The train-step mixin that hands the loss to ALI-G on Keras' JAX backend."""

from __future__ import annotations

from typing import Any

import keras

__all__ = ["AliGTrainStep"]


class AliGTrainStep:
    """Mixin for a ``keras.Model`` trained with :class:`~alig_tf.AliG` on the JAX backend.

    (Or with :class:`~alig_tf.Extrapolation`, which gets the loss the same way.)

    Keras' JAX trainer computes the loss inside ``jax.value_and_grad`` in a stateless
    scope, so what the optimizer's ``scale_loss`` records there is discarded. This mixin
    overrides ``train_step`` (Keras' documented way to customise ``fit``) with the JAX
    trainer's own steps plus one change: the unscaled loss is passed to
    ``optimizer.stateless_apply(..., loss=loss)``. On the TensorFlow and torch backends it
    defers to the model's own ``train_step``, so one model class serves every backend.
    Its ``compile`` wraps AliG in :class:`~alig_tf.LossScaleOptimizer` where Keras would
    wrap it in its own (a ``mixed_float16`` policy), on every backend.

    Example:
      >>> class MLP(AliGTrainStep, keras.Sequential):
      ...     pass
      >>> model = MLP([keras.Input((4,)), keras.layers.Dense(1)])
    """

    def compile(self, optimizer: Any = "rmsprop", *args: Any, **kwargs: Any) -> None:
        """Keras' ``compile``; under ``mixed_float16``, AliG goes in :class:`LossScaleOptimizer`.

        Where Keras would wrap the optimizer in its own ``LossScaleOptimizer`` (a
        ``mixed_float16`` policy, ``auto_scale_loss=True``), an :class:`~alig_tf.AliG` is
        wrapped in :class:`~alig_tf.LossScaleOptimizer` instead, which hands it the
        unscaled loss (Keras' does not). Any other optimizer is left to Keras.
        """
        from alig_tf._loss_scale import LossScaleOptimizer
        from alig_tf._optimizer import AliG

        if (
            isinstance(optimizer, AliG)
            and kwargs.get("auto_scale_loss", True)
            and self.dtype_policy.name == "mixed_float16"  # type: ignore[attr-defined]
        ):
            optimizer = LossScaleOptimizer(optimizer)
        super().compile(optimizer, *args, **kwargs)  # type: ignore[misc]

    def compile_from_config(self, config: dict[str, Any]) -> None:
        """Compiles a loaded model as Keras does.

        Keras skips this for a model whose ``compile`` is overridden, as this mixin's is:
        without it a ``.keras`` file of such a model would load uncompiled.
        """
        self.compile(**keras.saving.deserialize_keras_object(config))
        if getattr(self, "optimizer", None) is not None and self.built:  # type: ignore[attr-defined]
            self.optimizer.build(self.trainable_variables)  # type: ignore[attr-defined]

    def train_step(self, *args: Any) -> Any:
        """One training step; on JAX, ``args`` is ``(state, data)``."""
        if keras.backend.backend() != "jax":
            return super().train_step(*args)  # type: ignore[misc]
        return _jax_train_step(self, *args)


def _jax_train_step(model: Any, state: Any, data: Any) -> Any:
    """Keras 3.15's ``JAXTrainer.train_step``, with the loss passed to ``stateless_apply``.

    A copy of Keras' private step: ``tests/keras/test_keras_jax_train_step.py`` fails when
    Keras' source changes (re-derive this from it, then record the new hash there).
    """
    import jax
    from keras.src.trainers.data_adapters import data_adapter_utils

    from alig_tf._extrapolation import Extrapolation
    from alig_tf._loss_scale import LossScaleOptimizer
    from alig_tf._optimizer import AliG

    (trainable_variables, non_trainable_variables, optimizer_variables, metrics_variables) = state
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    grad_fn = jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)
    (_, aux), grads = grad_fn(
        trainable_variables,
        non_trainable_variables,
        metrics_variables,
        x,
        y,
        sample_weight,
        training=True,
        optimizer_variables=optimizer_variables,
    )
    unscaled_loss, y_pred, non_trainable_variables, metrics_variables = aux
    if isinstance(model.optimizer, AliG | Extrapolation | LossScaleOptimizer):
        trainable_variables, optimizer_variables = model.optimizer.stateless_apply(
            optimizer_variables, grads, trainable_variables, loss=unscaled_loss
        )
    else:  # e.g. Keras' LossScaleOptimizer around AliG: AliG raises its missing-loss error
        trainable_variables, optimizer_variables = model.optimizer.stateless_apply(
            optimizer_variables, grads, trainable_variables
        )
    logs, metrics_variables = model._update_metrics_variables(
        metrics_variables, unscaled_loss, x, y, y_pred, sample_weight
    )
    state = (trainable_variables, non_trainable_variables, optimizer_variables, metrics_variables)
    return logs, state
