"""What every ``alig_jax`` transformation does with its trees and its loss, written once.

The parameter check at ``init``, the accumulation dtype over every leaf (the core's rule),
the squared norm of a list of leaves, and the loss handed over as ``value=``, checked and
cast. :func:`alig_jax.alig`, :func:`alig_jax.multi_steps` and
:func:`alig_jax.extrapolation` call these; the numbers come from :mod:`alig_core`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import alig_core

__all__ = ["accumulation_dtype", "check_params", "is_missing", "loss_value", "sum_of_squares"]


def is_missing(leaf: Any) -> bool:
    """A ``None`` leaf of a gradient tree: a parameter without a gradient."""
    return leaf is None


def _dtype(leaf: Any) -> Any:
    # .dtype first: abstract leaves (jax.eval_shape, ShapeDtypeStruct) have no value.
    return leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype


def accumulation_dtype(leaves: list[Any]) -> jnp.dtype:
    """The core's accumulation dtype over the dtypes of ``leaves``: float32 or float64."""
    return jnp.dtype(alig_core._math.accumulation_dtype(*{str(_dtype(x)) for x in leaves}))


def sum_of_squares(leaves: list[jax.Array], dtype: jnp.dtype) -> jax.Array:
    """The sum of the squared entries of ``leaves``, accumulated in ``dtype`` (0-d)."""
    total = jnp.zeros((), dtype)
    for leaf in leaves:
        total = total + jnp.sum(jnp.square(leaf.astype(dtype)))
    return total


def check_params(params: optax.Params, *, who: str, verb: str, allow_empty: bool = False) -> None:
    """Refuses a tree that cannot be stepped: no leaf at all, or a leaf not real floating.

    Args:
      params: the tree ``init`` was given.
      who: the transformation, as the messages name it (``"alig"``).
      verb: what it does to the parameters (``"optimizes"``, ``"displaces"``).
      allow_empty: accept a tree with no leaf (``alig``, as ``optax.sgd``: a state for
        ``optax.tree.map_params`` and for a partition label without parameters).

    Raises:
      ValueError: naming the leaf, its dtype and shape, and what to do instead.
    """
    with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    if not with_paths and not allow_empty:
        raise ValueError(
            f"{who} got a parameter tree with no arrays in it (an empty parameter list). "
            "Pass the model's trainable parameters to tx.init, e.g. tx.init(params) with the "
            "params of model.init(...); with flax.nnx, nnx.state(model, nnx.Param) or "
            "nnx.Optimizer(model, tx, wrt=nnx.Param)."
        )
    for path, leaf in with_paths:
        dtype = _dtype(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"{who} {verb} real floating-point parameters; the leaf "
                f"{jax.tree_util.keystr(path) or '(root)'} has dtype {dtype} and shape "
                f"{tuple(getattr(leaf, 'shape', ()))}. Leave integer leaves out of the "
                "optimized tree (e.g. with optax.masked or a flax filter), and optimize a "
                "complex parameter as its real and imaginary parts (a float array with a "
                "trailing axis of 2)."
            )


def loss_value(value: Any, dtype: jnp.dtype, *, who: str, missing: str, value_help: str) -> Any:
    """The loss given as ``value=``, checked, as a 0-d array of ``dtype``.

    Args:
      value: the loss: a real scalar (a Python number or a 0-d array, traced or not).
      dtype: the accumulation dtype.
      who: the transformation, as the messages name it.
      missing: the message where no loss was given (``value`` is ``None``).
      value_help: how to pass the loss, appended where it is not a number.

    Raises:
      ValueError: no loss, a string or a bool, an array of another shape, or a dtype that
        is not real; the message says what was given and what to pass.
    """
    if value is None:
        raise ValueError(missing)
    if isinstance(value, str | bytes | bool):
        raise ValueError(
            f"{who}'s value= must be the loss as a real scalar, got {value!r} "
            f"(type {type(value).__name__}). {value_help}"
        )
    array = jnp.asarray(value)
    real = jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)
    if array.shape != () or not real:
        raise ValueError(
            f"{who}'s value= must be the scalar real loss that was differentiated, got an array "
            f"of shape {array.shape} and dtype {array.dtype}. Reduce it first (e.g. "
            "loss.mean()) and pass that value (for a loss computed in complex arithmetic, "
            "jnp.real(loss))."
        )
    return array.astype(dtype)
