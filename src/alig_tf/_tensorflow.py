"""What only Keras' TensorFlow backend needs: tf.distribute, and the sum of squares.

Imported only on that backend (through :mod:`alig_tf._backend`). Under a multi-replica
``tf.distribute`` strategy the gradients and the loss are summed over the replicas
before the step size is taken, and the per-variable updates then run on every replica's
copy of the variables (as Keras' own TensorFlow optimizer runs them).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
from keras import ops

__all__ = [
    "all_reduce_sum",
    "dense",
    "multi_replica_context",
    "replica_key",
    "run_updates",
    "select",
    "sum_of_squares",
]

Update = tuple[Callable[..., Any], Any, tuple[Any, ...]]
"""``(fn, variable, args)``: a call ``fn(variable, *args)``."""


# ---------------------------------------------------------------- tf.distribute


def replica_key() -> Any:
    """Which replica is running: its id under a multi-replica ``tf.distribute`` strategy.

    ``None`` with one replica. MirroredStrategy runs each replica in a thread of its own,
    all in the same optimizer; they meet at every merge call.
    """
    if not tf.distribute.has_strategy():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync < 2:
        return None
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    return ("thread", threading.get_ident()) if replica is None else int(replica)


def multi_replica_context() -> Any:
    """The tf.distribute replica context when training on more than one replica, else None."""
    if not tf.distribute.has_strategy() or tf.distribute.get_strategy().num_replicas_in_sync < 2:
        return None
    context = tf.distribute.get_replica_context()
    if context is None:
        raise NotImplementedError(
            "alig_tf.AliG steps inside a replica context (model.fit, or strategy.run in a "
            "custom loop); calling apply() in cross-replica context is not supported."
        )
    return context


def all_reduce_sum(
    optimizer: keras.optimizers.Optimizer,
    context: Any,
    grads: list[Any],
    variables: list[Any],
    loss: Any,
) -> tuple[list[Any], Any]:
    """The gradients (of ``variables``) and the loss summed over the replicas of ``context``.

    Keras divided each replica's loss by the number of replicas, so the sums are the
    global batch's mean loss and gradient: every replica then computes the same step size.
    The gradients go through Keras' own all-reduce (``_all_reduce_sum_gradients``, what
    its TensorFlow ``_backend_update_step`` calls), so the step that follows must not
    reduce them again: it runs the updates with :func:`run_updates`.
    """
    pairs = optimizer._all_reduce_sum_gradients(list(zip(grads, variables, strict=True)))
    return [g for g, _ in pairs], context.all_reduce(tf.distribute.ReduceOp.SUM, loss)


def run_updates(updates: list[Update], strategy: Any) -> None:
    """Runs each ``fn(variable, *args)`` on every replica's copy of the variable.

    In a merge call, through ``strategy.extended.update``, as Keras' TensorFlow optimizer
    runs its ``update_step`` (``variable`` is then a ``tf.Variable``).
    """

    def distributed(distribution: Any, args_list: list[tuple[Any, ...]]) -> None:
        for (fn, variable, _), args in zip(updates, args_list, strict=True):
            target = variable.value if isinstance(variable, keras.Variable) else variable
            distribution.extended.update(target, fn, args=args, group=False)

    tf.__internal__.distribute.interim.maybe_merge_call(
        distributed, strategy, [args for _, _, args in updates]
    )


def dense(grads: list[Any]) -> list[Any]:
    """The gradients with ``tf.IndexedSlices`` (an ``Embedding``'s) made dense tensors."""
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


# ---------------------------------------------------------------- kernels


def select(skipped: Any, old: Any, new: Any) -> Any:
    """``old`` if the step is skipped (a 0-d bool), else ``new``: a whole tensor either way.

    The v1 ``Select``, which forwards one of its inputs when the condition is a scalar
    (``ops.where``, ``SelectV2``, picks entry by entry: slower, see ``benchmarks/README.md``,
    "Keras on TensorFlow: the sum of squares"); the same fused select under XLA. Guarded by
    ``test_the_graph_step_keeps_or_replaces_whole_tensors`` (test_keras_behaviour.py).
    """
    return tf.compat.v1.where(skipped, old, new)


_FOLD = 8
"""Slices per fold of the sum of squares under XLA (see :func:`sum_of_squares`)."""

_FIRST_FOLD_FROM = 8 * 1024
"""A tensor is folded once from this many entries on, ..."""

_NEXT_FOLD_FROM = 1 << 20
"""... and again while the folded result still has this many."""


def sum_of_squares(tensors: list[Any], dtype: str) -> Any:
    """Sum of all squared entries, in ``dtype``.

    Under XLA (``jit_compile=True``) each flattened tensor is first *folded*: cut into 8
    equal slices whose squares are added entry by entry (the result again, while it has a
    million entries or more), and only that goes to a reduction; the small tensors and the
    entries the slices leave over are joined into one vector, folded in turn. Without XLA,
    ``tf.nn.l2_loss``, one kernel per tensor. Both for speed at float32 accuracy:
    ``benchmarks/README.md``, "Keras on TensorFlow: the sum of squares", has the
    measurements; ``test_the_norm_of_a_large_float32_gradient_is_accurate`` and
    ``test_the_norm_counts_every_entry_once`` (tests/keras/test_keras_behaviour.py) guard
    every path.
    """
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
