"""Keras callbacks of alig_tf: :class:`EvaluateAtAnchor` (around ``fit``'s validation)."""

from __future__ import annotations

from typing import Any

import keras

from alig_tf._extrapolation import Extrapolation

__all__ = ["EvaluateAtAnchor"]


class EvaluateAtAnchor(keras.callbacks.Callback):
    """Evaluates and predicts at the anchor ``w_t`` of an :class:`Extrapolation` optimizer.

    The validation of ``model.fit`` (and ``model.evaluate`` or ``model.predict`` given the
    callback) runs inside :meth:`Extrapolation.at_anchor`; training carries on from where
    it was.

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

    def on_test_begin(self, logs: Any = None) -> None:
        """Puts the anchor in."""
        optimizer = getattr(self.model, "optimizer", None)
        if not isinstance(optimizer, Extrapolation):
            raise ValueError(
                "EvaluateAtAnchor needs a model compiled with alig_tf.Extrapolation; this "
                f"model's optimizer is {type(optimizer).__name__}."
            )
        if optimizer.built and self._context is None:
            self._context = optimizer.at_anchor()
            self._context.__enter__()

    def on_test_end(self, logs: Any = None) -> None:
        """Puts the weights back."""
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)

    on_predict_begin = on_test_begin
    on_predict_end = on_test_end
