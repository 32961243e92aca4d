"""A layer, an activation and a loss that stay in float64 on every Keras backend.

For comparisons to 1e-10 of two Keras runs (micro-batches against their union, a scaled
loss against the plain one). Keras 3.15 rounds float64 to float32 on the JAX and torch
backends wherever an op takes its dtype from ``keras.backend.result_type``, which maps
float64 to float32 there (``BIT64_TO_BIT32_DTYPE``, "aligned with JAX's default"):
``ops.mean`` (so the built-in losses), ``divide_no_nan`` (their reduction), ``ops.tanh``
and, on torch, ``ops.matmul`` (so ``Dense``), forward and backward. Elementwise products,
sums, absolute values and divisions keep the dtype.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["Linear", "mean_squared_error", "soft_sign"]


@keras.saving.register_keras_serializable(package="alig_tests")
class Linear(keras.layers.Layer):
    """``Dense`` without activation, through elementwise products and a sum: ``x W + b``,
    and with ``offset`` a scalar ``s`` added to every output (``x W + b + s``)."""

    def __init__(
        self,
        units: int,
        *,
        offset: bool = False,
        kernel_initializer: str = "glorot_uniform",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.has_offset = offset
        self.kernel_initializer = kernel_initializer

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.kernel = self.add_weight(
            (input_shape[-1], self.units), initializer=self.kernel_initializer
        )
        self.bias = self.add_weight((self.units,), initializer="zeros")
        if self.has_offset:
            self.offset = self.add_weight((), initializer="zeros")

    def call(self, x: Any) -> Any:
        y = ops.sum(ops.expand_dims(x, -1) * self.kernel, axis=-2) + self.bias
        return y + self.offset if self.has_offset else y

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "units": self.units,
            "offset": self.has_offset,
            "kernel_initializer": self.kernel_initializer,
        }


@keras.saving.register_keras_serializable(package="alig_tests")
def mean_squared_error(y_true: Any, y_pred: Any) -> Any:
    """The batch's mean squared error, already a scalar (Keras passes a scalar loss through
    its reduction unchanged)."""
    count = ops.cast(ops.size(y_true), y_pred.dtype)
    return ops.sum(ops.square(y_pred - y_true)) / count


@keras.saving.register_keras_serializable(package="alig_tests")
def soft_sign(x: Any) -> Any:
    """``x / (1 + |x|)``: a nonlinearity for ``keras.layers.Activation`` (``ops.tanh`` is
    computed in float32 on JAX)."""
    return x / (1.0 + ops.abs(x))
