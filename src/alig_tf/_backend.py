"""The few places where Keras' backends differ for alig_tf, each chosen here.

Everything else is ``keras.ops``. The TensorFlow side lives in :mod:`alig_tf._tensorflow`,
imported only when the backend is TensorFlow.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

import alig_core

__all__ = [
    "dense",
    "keep_if",
    "multi_replica_context",
    "name",
    "replica_key",
    "run_updates",
    "sum_of_squares",
    "value",
]


def name() -> str:
    """The Keras backend: ``"tensorflow"``, ``"jax"`` or ``"torch"``."""
    return keras.backend.backend()


def value(variable: Any) -> Any:
    """The current value of a Keras variable (the scoped one inside ``stateless_apply``)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def sum_of_squares(tensors: list[Any], dtype: str) -> Any:
    """Sum of all squared entries of ``tensors``, in ``dtype``.

    TensorFlow: :func:`alig_tf._tensorflow.sum_of_squares`. Elsewhere a plain
    ``sum(square(.))`` per tensor (Keras' torch ``vdot`` loses float64 precision).
    """
    if name() == "tensorflow":
        from alig_tf import _tensorflow

        return _tensorflow.sum_of_squares(tensors, dtype)
    total = ops.zeros((), dtype)
    for tensor in tensors:
        total = total + ops.sum(ops.square(ops.cast(tensor, dtype)))
    return total


def dense(grads: list[Any]) -> list[Any]:
    """The gradients with the sparse ones made dense (entries at a repeated index summed).

    TensorFlow's ``tf.IndexedSlices`` (an ``Embedding``'s gradient), JAX's
    ``jax.experimental.sparse.BCOO``, torch's sparse COO tensors: each densified as its
    framework sums it (what Keras' own optimizers apply), so the norm and the update see
    the gradient the sparse value stands for.
    """
    backend = name()
    if backend == "tensorflow":
        from alig_tf import _tensorflow

        return _tensorflow.dense(grads)
    if backend == "jax":
        from jax.experimental import sparse

        return [g.todense() if isinstance(g, sparse.JAXSparse) else g for g in grads]
    return [g.to_dense() if getattr(g, "is_sparse", False) else g for g in grads]


def keep_if(skipped: Any, old: Any, new: Any) -> Any:
    """``old`` if the step is skipped (a 0-d bool), else ``new`` (``alig_core._math.keep_if_skipped``).

    TensorFlow: :func:`alig_tf._tensorflow.select`, the whole-tensor select.
    """
    if name() == "tensorflow":
        from alig_tf import _tensorflow

        return _tensorflow.select(skipped, old, new)
    return alig_core._math.keep_if_skipped(ops, skipped, old, new)


def replica_key() -> Any:
    """Which replica is running (``None`` but under a multi-replica ``tf.distribute``)."""
    if name() != "tensorflow":
        return None
    from alig_tf import _tensorflow

    return _tensorflow.replica_key()


def multi_replica_context() -> Any:
    """The tf.distribute replica context with more than one replica, else ``None``."""
    if name() != "tensorflow":
        return None
    from alig_tf import _tensorflow

    return _tensorflow.multi_replica_context()


def run_updates(updates: list[tuple[Any, Any, tuple[Any, ...]]], replica_context: Any) -> None:
    """Runs each ``fn(variable, *args)``: directly, or on every replica's copy.

    ``replica_context`` is :func:`multi_replica_context`'s: with one, the updates run
    through :func:`alig_tf._tensorflow.run_updates` (a merge call).
    """
    if replica_context is None:
        for fn, variable, args in updates:
            fn(variable, *args)
        return
    from alig_tf import _tensorflow

    _tensorflow.run_updates(updates, replica_context.strategy)
