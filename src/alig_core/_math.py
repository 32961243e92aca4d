"""The ALI-G step, written once and generic over a framework's array namespace.

Design: every function that needs more than arithmetic takes the array namespace ``xp``
as its first argument: ``numpy``, ``jax.numpy``, ``torch``, ``keras.ops`` or
:data:`alig_core._scalars.python_scalars`. Only these members of ``xp`` are used, and all of them
provide them with the same meaning: ``where``, ``isfinite``, ``logical_and``,
``logical_not`` and ``sqrt``. Everything else is Python arithmetic
(``+ - * /`` and comparisons) on the framework's own arrays, so the same lines run
eagerly, under ``torch.compile``, ``jax.jit`` and ``tf.function``: there is no Python
branch on an array value, no ``float()``, no host synchronisation.

The adapters gather tensors, cast and write results back; every number and every state
transition comes from here (``docs/specification.md``, "One step"):

1. :func:`accumulation_dtype` names the dtype of the norms and of gamma, over all the
   parameters' dtypes;
2. :func:`step_size` turns the loss and the squared global gradient norm into ``gamma``
   (with the clamp at 0, the cap, the zero-denominator guard and the non-finite test that
   marks a skipped step);
3. :func:`momentum_coefficients` turns ``gamma`` into the four coefficients of the
   parameter/buffer update for either momentum convention, and
   :func:`momentum_update` / :func:`sgd_update` apply them out of place (in-place
   adapters apply the same coefficients with their own fused kernels);
4. :func:`projection_scale` gives the factor that puts the parameters back on the
   ``max_norm`` ball (1 on a skipped step);
5. :func:`record_step` gives the records (:class:`Records`: gamma, gamma_hat, capped and
   the two counters) after a step, taken or skipped;
6. :func:`keep_if_skipped` is the one selection of an old value on a skipped step (the
   parameters, the buffers, the records, the extrapolation state).

``alig_core.oracle`` is an independent, deliberately plain float64 implementation of the
same contract, used to check these functions and every adapter.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

__all__ = [
    "MomentumCoefficients",
    "Records",
    "StepSize",
    "accumulation_dtype",
    "keep_if_skipped",
    "momentum_buffer_update",
    "momentum_coefficients",
    "momentum_param_update",
    "momentum_update",
    "projection_scale",
    "record_step",
    "sgd_update",
    "step_size",
]

Array = Any
"""An array or scalar of the framework in use (NumPy, JAX, torch, Keras tensors)."""


class StepSize(NamedTuple):
    """The step size of one ALI-G step and what to record about it (all 0-d arrays)."""

    gamma: Array
    """The step size to apply: ``min(max(gamma_hat, 0), max_lr)``; 0 on a skipped step."""
    gamma_hat: Array
    """The Polyak step ``(loss - f_star) / (S + eps)`` before clamp and cap (0 if S+eps=0)."""
    capped: Array
    """bool: the cap was hit (``gamma_hat >= max_lr``, so ``gamma == max_lr``)."""
    skipped: Array
    """bool: the loss or the squared gradient norm is not finite: skip this step."""


class MomentumCoefficients(NamedTuple):
    """The four coefficients of one momentum update.

    The update is ``b <- buffer_decay*b + buffer_grad*g``, then
    ``p <- p + param_grad*g + param_buffer*b`` (``b`` being the new buffer).
    """

    buffer_decay: Array
    buffer_grad: Array
    param_grad: Array
    param_buffer: Array


class Records(NamedTuple):
    """What an optimizer records about its steps (0-d arrays, or Python numbers).

    Each adapter keeps these in its own way (torch: in each param group; optax: in the
    state; Keras: optimizer variables) and moves them with :func:`record_step`.
    """

    gamma: Array
    """The step size of the last step taken."""
    gamma_hat: Array
    """The Polyak step before clamp and cap, of the last step taken."""
    capped: Array
    """bool: whether the last step taken hit the cap."""
    steps_taken: Array
    """integer: the steps taken (a ``max_lr`` schedule is evaluated at this count)."""
    steps_skipped: Array
    """integer: the steps skipped (a non-finite loss or gradient norm)."""


def accumulation_dtype(*param_dtypes: Any) -> str:
    """The dtype in which to accumulate norms and compute gamma for parameters of these dtypes.

    docs/specification.md, "One step" 1: at least float32; float64 when any parameter is
    float64. Give every parameter's dtype (names such as ``"bfloat16"``, or a framework's
    dtype objects: ``torch.float64``, ``jnp.float32``, whose ``str`` ends in the name).

    >>> accumulation_dtype("bfloat16"), accumulation_dtype("float32", "float64")
    ('float32', 'float64')
    """
    for dtype in param_dtypes:
        if str(dtype).rsplit(".", 1)[-1] in ("float64", "double"):
            return "float64"
    return "float32"


def step_size(
    xp: Any,
    loss: Array,
    sq_grad_norm: Array,
    *,
    max_lr: Array | float | None,
    eps: Array | float,
    f_star: Array | float,
) -> StepSize:
    r"""Computes ALI-G's step size from the loss and the squared global gradient norm.

    .. math::

        \hat\gamma = \frac{l - f_\star}{S + \delta}, \qquad
        \gamma = \min(\max(\hat\gamma, 0), \eta)

    with :math:`\hat\gamma = 0` where :math:`S + \delta = 0`, :math:`\gamma = 0` (never an
    ascent step) where a cap reached at step time is below 0, no upper clip where
    ``max_lr`` is ``None`` or infinite, and :math:`\gamma = 0` plus ``skipped = True`` where
    ``loss`` or ``sq_grad_norm`` is not finite, or where, with no cap, :math:`\hat\gamma`
    overflows to infinity (finite values over a denominator near zero).

    Args:
      xp: the array namespace (``numpy``, ``jax.numpy``, ``torch``, ``keras.ops``).
      loss: 0-d array, the minibatch loss ``l``, in the accumulation dtype.
      sq_grad_norm: 0-d array, ``S``, the sum of squared gradient entries over every
        parameter that has a gradient, in the accumulation dtype.
      max_lr: the cap ``eta`` (a number or a 0-d array); ``None`` or an infinite value for
        no cap (the same step: adapters that store "no cap" as ``inf``, as torch's group
        ``lr`` and Keras' learning rate do, pass it as it is).
      eps: ``delta``, added to ``S``.
      f_star: the lower bound of the loss.

    Returns:
      A :class:`StepSize` of 0-d arrays.

    Example:
      >>> import numpy as np
      >>> s = step_size(np, np.float64(1.0), np.float64(4.0), max_lr=0.1, eps=0.0, f_star=0.0)
      >>> float(s.gamma), float(s.gamma_hat), bool(s.capped), bool(s.skipped)
      (0.1, 0.25, True, False)
    """
    finite = xp.logical_and(xp.isfinite(loss), xp.isfinite(sq_grad_norm))
    denominator = sq_grad_norm + eps
    has_denominator = denominator > 0
    safe_denominator = xp.where(has_denominator, denominator, 1.0)
    gamma_hat = xp.where(has_denominator, (loss - f_star) / safe_denominator, 0.0)
    clamped = xp.where(gamma_hat > 0, gamma_hat, 0.0)  # also maps NaN to 0
    cap = math.inf if max_lr is None else max_lr  # the one rule: None and inf are no cap
    hits_cap = clamped >= cap
    gamma = xp.where(hits_cap, cap, clamped)
    # A cap below 0 (a schedule, or a group's lr set by hand, gone negative) must never give
    # an ascent step: the clamp at 0 comes after the cap too (SPEC, "One step" 3).
    gamma = xp.where(gamma > 0, gamma, 0.0)
    # Finite loss and norm whose quotient overflows (a denominator near zero, e.g. zero
    # gradients with a subnormal eps) give, with no cap, an infinite step: skipped.
    finite = xp.logical_and(finite, xp.isfinite(gamma))
    return StepSize(
        gamma=xp.where(finite, gamma, 0.0),
        gamma_hat=gamma_hat,
        capped=xp.logical_and(hits_cap, finite),
        skipped=xp.logical_not(finite),
    )


def momentum_coefficients(
    gamma: Array, *, momentum: Array | float, adjusted_momentum: bool
) -> MomentumCoefficients:
    r"""Returns the coefficients of the momentum update for either convention.

    Standard (``adjusted_momentum=False``, the paper's PyTorch code):

    .. math::  b \leftarrow \mu b - \gamma g, \qquad p \leftarrow p - \gamma g + \mu b

    Adjusted (``adjusted_momentum=True``, ``torch.optim.SGD(nesterov=True)`` driven with
    lr = gamma):

    .. math::  b \leftarrow \mu b - g, \qquad p \leftarrow p - \gamma g + \gamma \mu b

    Args:
      gamma: the step size from :func:`step_size` (0-d array).
      momentum: ``mu``.
      adjusted_momentum: which convention (a Python bool: it picks the formula).

    Returns:
      :class:`MomentumCoefficients` for :func:`momentum_update`.

    Example:
      >>> momentum_coefficients(0.5, momentum=0.9, adjusted_momentum=True)
      MomentumCoefficients(buffer_decay=0.9, buffer_grad=-1.0, param_grad=-0.5, param_buffer=0.45)
    """
    if adjusted_momentum:
        return MomentumCoefficients(
            buffer_decay=momentum,
            buffer_grad=-1.0,
            param_grad=-gamma,
            param_buffer=gamma * momentum,
        )
    return MomentumCoefficients(
        buffer_decay=momentum, buffer_grad=-gamma, param_grad=-gamma, param_buffer=momentum
    )


def momentum_update(
    param: Array, grad: Array, buffer: Array, coefficients: MomentumCoefficients
) -> tuple[Array, Array]:
    """Applies :class:`MomentumCoefficients` out of place; returns ``(param, buffer)``.

    The two halves, :func:`momentum_buffer_update` then :func:`momentum_param_update`.

    Example:
      >>> c = momentum_coefficients(0.5, momentum=0.9, adjusted_momentum=False)
      >>> momentum_update(1.0, 2.0, 0.0, c)
      (-0.9, -1.0)
    """
    new_buffer = momentum_buffer_update(grad, buffer, coefficients)
    return momentum_param_update(param, grad, new_buffer, coefficients), new_buffer


def momentum_buffer_update(grad: Array, buffer: Array, coefficients: MomentumCoefficients) -> Array:
    """The new momentum buffer: ``buffer_decay*b + buffer_grad*g``.

    Example:
      >>> c = momentum_coefficients(0.5, momentum=0.9, adjusted_momentum=False)
      >>> momentum_buffer_update(2.0, 0.0, c)
      -1.0
    """
    return coefficients.buffer_decay * buffer + coefficients.buffer_grad * grad


def momentum_param_update(
    param: Array, grad: Array, new_buffer: Array, coefficients: MomentumCoefficients
) -> Array:
    """The new parameter from the *new* buffer: ``p + param_grad*g + param_buffer*b``.

    An adapter that has already written the buffer can read it back for this (on XLA,
    recomputing the buffer from its old value would need a copy of it).

    Example:
      >>> c = momentum_coefficients(0.5, momentum=0.9, adjusted_momentum=False)
      >>> momentum_param_update(1.0, 2.0, -1.0, c)
      -0.9
    """
    return param + coefficients.param_grad * grad + coefficients.param_buffer * new_buffer


def sgd_update(param: Array, grad: Array, gamma: Array) -> Array:
    """Applies the step without momentum: ``p <- p - gamma * g``."""
    return param - gamma * grad


def projection_scale(
    xp: Any, sq_param_norm: Array, max_norm: Array | float, *, skipped: Array | None = None
) -> Array:
    r"""Returns the factor that projects the parameters onto the l2 ball of radius ``max_norm``.

    .. math::  N = \sqrt{\textstyle\sum_p \|p\|^2}, \qquad
               s = \max\_norm / N \text{ if } N > \max\_norm \text{ else } 1

    Multiply every managed parameter by ``s`` (a multiplication by exactly 1 leaves a
    parameter bit-for-bit unchanged).

    Args:
      xp: the array namespace.
      sq_param_norm: ``N**2``, over every managed parameter (after the update).
      max_norm: the radius.
      skipped: the step's :attr:`StepSize.skipped`: a skipped step projects nothing
        (``s = 1``). ``None`` outside a step (the initial projection).

    Example:
      >>> import numpy as np
      >>> float(projection_scale(np, np.float64(25.0), 2.5))
      0.5
      >>> float(projection_scale(np, np.float64(1.0), 2.5))
      1.0
      >>> float(projection_scale(np, np.float64(25.0), 2.5, skipped=np.bool_(True)))
      1.0
    """
    norm = xp.sqrt(sq_param_norm)
    outside = norm > max_norm
    if skipped is not None:
        outside = xp.logical_and(outside, xp.logical_not(skipped))
    return xp.where(outside, max_norm / xp.where(outside, norm, 1.0), 1.0)


def record_step(xp: Any, records: Records, size: StepSize) -> Records:
    """The records after a step: this step's numbers where it was taken, the counters moved.

    docs/specification.md, "One step" 6: a skipped step keeps ``gamma``, ``gamma_hat``
    and ``capped`` of the last step taken and counts one more in ``steps_skipped``; a
    taken step records its own and counts one more in ``steps_taken``. The counters keep
    their dtype (``counter + 1``), so the adapter only casts the three numbers to its
    records' dtypes and writes the five back. Where a value is kept, it is the very object
    given (with :data:`alig_core._scalars.python_scalars` too): an adapter may skip writing it.

    Args:
      xp: the array namespace (:data:`alig_core._scalars.python_scalars` with Python numbers).
      records: the records before the step.
      size: the step's :class:`StepSize`.

    Example:
      >>> from alig_core import step_size
      >>> from alig_core._scalars import python_scalars
      >>> size = step_size(python_scalars, 1.0, 4.0, max_lr=0.1, eps=0.0, f_star=0.0)
      >>> record_step(python_scalars, Records(0.0, 0.0, False, 3, 1), size)
      Records(gamma=0.1, gamma_hat=0.25, capped=True, steps_taken=4, steps_skipped=1)
    """
    skipped = size.skipped
    taken, skips = records.steps_taken, records.steps_skipped
    return Records(
        gamma=keep_if_skipped(xp, skipped, records.gamma, size.gamma),
        gamma_hat=keep_if_skipped(xp, skipped, records.gamma_hat, size.gamma_hat),
        capped=keep_if_skipped(xp, skipped, records.capped, size.capped),
        steps_taken=keep_if_skipped(xp, skipped, taken, taken + 1),
        steps_skipped=xp.where(skipped, skips + 1, skips),
    )


def keep_if_skipped(xp: Any, skipped: Array, old: Array, new: Array) -> Array:
    """Returns ``old`` where the step is skipped, else ``new`` (bit-for-bit either way).

    The one selection every skipped-step rule makes: :func:`record_step`, the
    extrapolation state, and the adapters' parameters and buffers.
    """
    return xp.where(skipped, old, new)
