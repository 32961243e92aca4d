"""The flax.nnx model of the integration tests, and its loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["MLP", "cross_entropy"]


class MLP(nnx.Module):
    """``5 -> 8 -> 3`` (tanh), its parameters and its computation in ``dtype``."""

    def __init__(self, rngs: nnx.Rngs, dtype: Any = jnp.float32) -> None:
        kwargs = {"dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.hidden = nnx.Linear(5, 8, **kwargs)
        self.out = nnx.Linear(8, 3, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def cross_entropy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    """The mean cross-entropy of ``model`` on inputs ``x`` and integer labels ``y``."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
