"""Gradient accumulation for transformations that take the loss: ``optax.MultiSteps`` + ``value``.

``optax.MultiSteps`` averages the gradients of k mini-steps but hands the inner
transformation the extra arguments of the k-th call only: ALI-G would get the last
micro-batch's loss with the mean gradient, and take the wrong step. :func:`multi_steps`
keeps the running mean (or sum) of ``value`` next to MultiSteps' accumulated gradients and
hands that to the inner update, so that k micro-batches equal one step on their union.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from alig_jax._leaves import accumulation_dtype, loss_value

__all__ = ["AccumulationState", "multi_steps"]

_VALUE_HELP = (
    "Pass each micro-batch's loss with its gradients: "
    "updates, state = tx.update(grads, state, params, value=loss) (with flax.nnx.Optimizer: "
    "optimizer.update(model, grads, value=loss))."
)


class AccumulationState(NamedTuple):
    """State of :func:`multi_steps`: optax's ``MultiStepsState`` and the accumulated loss."""

    multi_steps: optax.MultiStepsState
    """The state of the wrapped ``optax.MultiSteps`` (``mini_step``, ``gradient_step``,
    ``inner_opt_state``, ``acc_grads``, ``skip_state``)."""
    value: jax.Array
    """() float32 (float64 for float64 params): the mean (``use_grad_mean=True``) or sum of
    the ``value`` of this accumulation's mini-steps so far; 0 after the k-th."""


def multi_steps(
    tx: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.Array],
    *,
    use_grad_mean: bool = True,
    should_skip_update_fn: optax.transforms.ShouldSkipUpdateFunction | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""``optax.MultiSteps`` that accumulates the loss ``value`` with the gradients.

    Each call takes one micro-batch's gradients and loss; the k-th call hands ``tx`` the
    mean of the k gradients (as ``optax.MultiSteps``) **and the mean of the k losses**
    (their sums with ``use_grad_mean=False``), so that for equal micro-batches whose loss
    is a mean over their items, k micro-batches equal one step on their union:

    .. math::

        \bar g = \frac1k \sum_{i=1}^k g_i, \qquad \bar l = \frac1k \sum_{i=1}^k l_i,
        \qquad \text{then } \texttt{tx.update}(\bar g, \ldots, \texttt{value}=\bar l).

    ``optax.MultiSteps(alig(...))`` alone hands ``alig`` the *last* micro-batch's loss
    with the mean gradient: a wrong step size (use this instead). Between the k-th calls
    the updates are zeros, as in ``optax.MultiSteps``. Everything is ``jnp.where`` and
    ``lax.cond``, so a jitted step compiles once; the state is a tree of arrays (save its
    leaves, restore them into ``tx.init(params)``'s structure).

    Args:
      tx: the transformation to step with the accumulated gradients and loss, typically
        :func:`alig_jax.alig`; it gets ``value=`` the accumulated loss (other extra
        arguments are those of the k-th call).
      every_k_schedule: k, the number of mini-steps per step, or a function of the number
        of steps taken so far (as in ``optax.MultiSteps``).
      use_grad_mean: average the gradients and the losses (default) or sum them.
      should_skip_update_fn: as in ``optax.MultiSteps``: a mini-step it rejects changes
        neither the accumulated gradients nor the accumulated loss.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``value=``; its
      state is an :class:`AccumulationState`. The gradients are accumulated in float32
      (float64 for float64 params), as is the loss.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from alig_jax import alig, multi_steps
      >>> params = jnp.array([1.0, -2.0])
      >>> tx = multi_steps(alig(max_lr=0.1, momentum=0.9), every_k_schedule=2)
      >>> state = tx.init(params)
      >>> for batch in (jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])):
      ...     loss, grads = jax.value_and_grad(lambda w: jnp.sum((w * batch) ** 2))(params)
      ...     updates, state = tx.update(grads, state, params, value=loss)
      ...     params = optax.apply_updates(params, updates)
      >>> int(state.multi_steps.gradient_step)
      1
    """
    by_dtype = {  # one per accumulation dtype: MultiSteps fixes it at construction
        dtype: optax.MultiSteps(
            tx,
            every_k_schedule,
            use_grad_mean=use_grad_mean,
            should_skip_update_fn=should_skip_update_fn,
            accumulator_dtype=dtype,
        )
        for dtype in ("float32", "float64")
    }

    def init_fn(params: optax.Params) -> AccumulationState:
        dtype = str(accumulation_dtype(jax.tree.leaves(params)))
        return AccumulationState(
            multi_steps=by_dtype[dtype].init(params), value=jnp.zeros((), dtype)
        )

    def update_fn(
        updates: optax.Updates,
        state: AccumulationState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AccumulationState]:
        dtype = state.value.dtype
        loss = loss_value(
            extra_args.pop("value", None),
            dtype,
            who="alig_jax.multi_steps",
            missing="alig_jax.multi_steps accumulates the loss with the gradients, and got no "
            f"value=. {_VALUE_HELP}",
            value_help=_VALUE_HELP,
        )
        inner = state.multi_steps
        if use_grad_mean:  # Welford's running mean, as optax.MultiSteps does for the grads
            accumulated = state.value + (loss - state.value) / (inner.mini_step + 1).astype(dtype)
        else:
            accumulated = state.value + loss
        new_updates, new_inner = by_dtype[str(dtype)].update(
            updates, inner, params, value=accumulated, **extra_args
        )
        # MultiSteps' own counters say what happened: a rejected mini-step moves neither,
        # the k-th one resets mini_step to 0 and moves gradient_step.
        rejected = jnp.logical_and(
            new_inner.mini_step == inner.mini_step, new_inner.gradient_step == inner.gradient_step
        )
        emitted = new_inner.gradient_step != inner.gradient_step
        new_value = jnp.where(rejected, state.value, jnp.where(emitted, 0.0, accumulated))
        return new_updates, AccumulationState(multi_steps=new_inner, value=new_value.astype(dtype))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
