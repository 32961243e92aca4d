"""The few places where Keras' backends differ for alig_tf, each chosen here.

Everything else is ``keras.ops``. The TensorFlow side lives in :mod:`alig_tf._tensorflow`,
imported only when the backend is TensorFlow.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

import alig_core

__all__ = [
    "dense",
    "keep_if",
    "multi_replica_context",
    "name",
    "no_grad",
    "replica_key",
    "run_updates",
    "standard_normal",
    "sum_of_squares",
    "value",
]


def name() -> str:
    """The Keras backend: ``"tensorflow"``, ``"jax"`` or ``"torch"``."""
    return keras.backend.backend()


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """torch: no autograd graph through an optimizer's arithmetic (as Keras' own steps)."""
    if name() != "torch":
        yield
        return
    import torch

    with torch.no_grad():
        yield


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
    """``old`` if the step is skipped (a 0-d bool), else ``new`` (as ``keep_if_skipped``).

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


def standard_normal(seed: Any, iteration: Any, size: int, dtype: str, like: Any) -> Any:
    """``size`` standard normal numbers of ``dtype``, a function of ``(seed, iteration)`` only.

    TensorFlow: Philox bits of the seed pair ``(seed, iteration)`` and the Box-Muller
    transform on 53-bit uniforms (``tf.random.stateless_normal`` draws other numbers under
    XLA than without, for the same seed, while its bits agree); JAX: ``jax.random.normal``
    of ``fold_in(PRNGKey(seed), iteration)``; torch: a generator on ``like``'s device
    seeded with ``noise_generator_seed(seed, iteration)`` (read on the host: torch steps
    eagerly). Both arguments may be tensors (optimizer variables).
    """
    backend = name()
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
