"""Loss scaling (``mixed_float16``) for AliG: Keras' ``LossScaleOptimizer`` that passes the loss on.

Keras' ``LossScaleOptimizer`` multiplies the loss by its dynamic scale before the trainer
differentiates it, divides the gradients by the same scale, and skips the inner step when
a gradient is not finite; its ``scale_loss`` keeps the loss to itself, so AliG never sees
one. This subclass changes that only: the unscaled loss goes to AliG with the unscaled
gradients (SPEC, "The loss value"). Everything else is Keras' own.
"""

from __future__ import annotations

from typing import Any

import keras

from alig_tf import _backend
from alig_tf._base import as_loss
from alig_tf._optimizer import AliG

__all__ = ["LossScaleOptimizer"]


@keras.saving.register_keras_serializable(package="alig")
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """``keras.optimizers.LossScaleOptimizer`` around an :class:`~alig_tf.AliG`, loss included.

    Dynamic loss scaling for ``mixed_float16`` training: the trainer differentiates the loss
    times the scale; this wrapper divides the gradients by the scale and hands AliG the
    unscaled loss with them, so AliG's step is the one of the unscaled loss and gradients.
    A step whose gradients are not finite is skipped by the wrapper as Keras skips it
    (the scale halves; AliG's variables, buffers, records and ``iterations`` stay as they
    were, and its ``steps_skipped`` does not count it: AliG never saw it).

    ``model.compile`` of a model with the :class:`~alig_tf.AliGTrainStep` mixin wraps AliG
    in this under a ``mixed_float16`` policy by itself; otherwise compile with
    ``optimizer=LossScaleOptimizer(AliG(...))`` (Keras does not wrap it again). On the JAX
    backend the model needs the mixin anyway (it passes the loss to ``stateless_apply``).

    Args:
      inner_optimizer: the :class:`~alig_tf.AliG` to wrap.
      initial_scale: the loss scale to start from (Keras' default, 2**15).
      dynamic_growth_steps: the scale doubles after this many steps with finite gradients.
      name: the optimizer's name.
      **kwargs: as for ``keras.optimizers.LossScaleOptimizer``.

    Example:
      >>> import numpy as np, keras
      >>> from alig_tf import AliG, AliGTrainStep, LossScaleOptimizer
      >>> class Regressor(AliGTrainStep, keras.Sequential):
      ...     pass
      >>> layer = keras.layers.Dense(
      ...     1, use_bias=False, kernel_initializer="zeros", dtype="mixed_float16"
      ... )  # a fixed start: the scaled float16 gradients stay finite at Keras' 2**15
      >>> model = Regressor([keras.Input((4,)), layer])
      >>> model.compile(optimizer=LossScaleOptimizer(AliG(max_lr=0.1)), loss="mse")
      >>> x, y = np.full((8, 4), 0.5), np.full((8, 1), 0.5)
      >>> history = model.fit(x, y, batch_size=8, verbose=0)
      >>> int(model.optimizer.inner_optimizer.steps_taken.numpy())
      1
    """

    def __init__(
        self,
        inner_optimizer: AliG,
        initial_scale: float = 2.0**15,
        dynamic_growth_steps: int = 2000,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(inner_optimizer, AliG):
            raise ValueError(
                "alig_tf.LossScaleOptimizer wraps an alig_tf.AliG (it hands AliG the "
                f"unscaled loss); got {type(inner_optimizer).__name__}. Wrap another "
                "optimizer in keras.optimizers.LossScaleOptimizer."
            )
        super().__init__(
            inner_optimizer,
            initial_scale=initial_scale,
            dynamic_growth_steps=dynamic_growth_steps,
            name=name,
            **kwargs,
        )

    def scale_loss(self, loss: Any) -> Any:
        """Keeps the unscaled loss for AliG's next step, and returns it times the scale.

        The TensorFlow and torch trainers call this just before differentiating (the JAX
        trainer discards what it keeps: there the :class:`~alig_tf.AliGTrainStep` mixin
        passes the loss to :meth:`stateless_apply`).
        """
        if _backend.name() != "jax":
            self.inner_optimizer._pending_losses.put(as_loss(loss))
        return super().scale_loss(loss)

    def apply(
        self, grads: list[Any], trainable_variables: list[Any] | None = None, loss: Any = None
    ) -> None:
        """Keras' loss-scaled step; ``loss`` (unscaled) goes to AliG with the gradients."""
        with self.inner_optimizer._loss_of_this_call(loss):
            super().apply(grads, trainable_variables)

    def apply_gradients(self, grads_and_vars: Any, loss: Any = None) -> Any:
        """``apply_gradients`` with the (unscaled) loss, for tf.keras-style loops."""
        grads, trainable_variables = zip(*grads_and_vars, strict=True)
        self.apply(list(grads), list(trainable_variables), loss=loss)
        return self.iterations

    def stateless_apply(
        self,
        optimizer_variables: list[Any],
        grads: list[Any],
        trainable_variables: list[Any],
        loss: Any = None,
    ) -> tuple[list[Any], list[Any]]:
        """Keras' stateless loss-scaled step (JAX), ``loss`` (unscaled) going to AliG."""
        with self.inner_optimizer._loss_of_this_call(loss):
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)
