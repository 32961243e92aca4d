"""The ground truth: one ALI-G step in plain NumPy float64, written from docs/specification.md.

This module is deliberately naive and shares no code with :mod:`alig_core`'s generic
functions: Python ``if`` statements on Python floats, one loop over the parameters, every
array converted to float64. Every adapter and the generic functions are tested against it.

Example:
  >>> import numpy as np
  >>> from alig_core import AliGConfig
  >>> from alig_core.oracle import OracleState, oracle_step
  >>> params = [np.array([1.0, 2.0])]
  >>> state = OracleState.zeros(len(params))
  >>> params, state = oracle_step(
  ...     params, [np.array([1.0, 0.0])], 0.5, state, AliGConfig(max_lr=0.1, eps=0.0))
  >>> params[0].tolist(), state.gamma, state.capped
  ([0.9, 2.0], 0.1, True)

Reference: L. Berrada, A. Zisserman, M. P. Kumar, "Training Neural Networks for and by
Interpolation", ICML 2020, arXiv:1906.05661.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from alig_core._config import AliGConfig

__all__ = ["OracleState", "oracle_step", "oracle_step_size", "project_onto_ball"]


@dataclass(frozen=True)
class OracleState:
    """Everything the oracle carries from step to step."""

    buffers: tuple[np.ndarray | None, ...]
    """One momentum buffer per parameter (``None`` until the parameter first has a gradient,
    and always ``None`` when momentum is 0)."""
    gamma: float = 0.0
    """The step size of the last step taken."""
    gamma_hat: float = 0.0
    """The Polyak step before clamp and cap, of the last step taken."""
    capped: bool = False
    """Whether the last step taken hit the cap."""
    steps_taken: int = 0
    steps_skipped: int = 0

    @classmethod
    def zeros(cls, num_params: int) -> OracleState:
        """The state before the first step."""
        return cls(buffers=(None,) * num_params)


def _sum_of_squares(arrays: Sequence[np.ndarray]) -> float:
    import numpy as np

    return float(sum(np.sum(np.asarray(a, dtype=np.float64) ** 2) for a in arrays))


def project_onto_ball(params: Sequence[np.ndarray], max_norm: float) -> list[np.ndarray]:
    """Scales all ``params`` by ``max_norm / N`` if their global norm ``N`` exceeds it."""
    import numpy as np

    params = [np.asarray(p, dtype=np.float64) for p in params]
    norm = math.sqrt(_sum_of_squares(params))
    if norm > max_norm:
        return [p * (max_norm / norm) for p in params]
    return params


def oracle_step_size(
    loss: float, sq_norm: float, config: AliGConfig
) -> tuple[float, float, bool] | None:
    """ALI-G's step size from a finite loss and squared gradient norm, in Python floats.

    ``gamma_hat = (loss - f_star) / (sq_norm + eps)`` (0 where the denominator is 0),
    clamped at 0, then capped at ``max_lr``.

    Returns:
      ``(gamma, gamma_hat, capped)``, or ``None`` where ``gamma`` is not finite (no cap,
      and the quotient overflowed): the step is skipped.

    Example:
      >>> from alig_core import AliGConfig
      >>> oracle_step_size(0.5, 1.0, AliGConfig(max_lr=0.1, eps=0.0))
      (0.1, 0.5, True)
    """
    max_lr = None if config.max_lr is None else float(config.max_lr)  # type: ignore[arg-type]
    denominator = sq_norm + float(config.eps)
    gamma_hat = (loss - float(config.f_star)) / denominator if denominator != 0 else 0.0
    gamma = max(gamma_hat, 0.0)
    capped = False
    if max_lr is not None and gamma >= max_lr:
        gamma = max_lr
        capped = True
    if not math.isfinite(gamma):
        return None
    return gamma, gamma_hat, capped


def oracle_step(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray | None],
    loss: float,
    state: OracleState,
    config: AliGConfig,
) -> tuple[list[np.ndarray], OracleState]:
    """One ALI-G step, exactly as ``docs/specification.md`` states it, in float64.

    Args:
      params: every managed parameter.
      grads: the gradient of each parameter, ``None`` for a parameter without one.
      loss: the minibatch loss.
      state: the state after the previous step (:meth:`OracleState.zeros` at the start).
      config: the hyperparameters; ``max_lr`` must be a number or ``None``.

    Returns:
      The new parameters (float64 copies) and the new state.
    """
    import numpy as np

    params = [np.array(p, dtype=np.float64) for p in params]
    grads = [None if g is None else np.asarray(g, dtype=np.float64) for g in grads]
    loss = float(loss)
    mu = float(config.momentum)

    # 1. One global squared norm over every parameter that has a gradient.
    sq_norm = _sum_of_squares([g for g in grads if g is not None])

    # 2. A non-finite loss or norm skips the step: nothing changes but the counter.
    if not math.isfinite(loss) or not math.isfinite(sq_norm):
        return params, replace(state, steps_skipped=state.steps_skipped + 1)

    # 3. The step size.
    size = oracle_step_size(loss, sq_norm, config)
    if size is None:  # no cap, and the quotient overflowed: an infinite step
        return params, replace(state, steps_skipped=state.steps_skipped + 1)
    gamma, gamma_hat, capped = size

    # 4. The update of every parameter with a gradient.
    buffers = list(state.buffers)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if g is None:
            continue
        if mu == 0.0:
            params[i] = p - gamma * g
            continue
        previous = buffers[i]
        b = np.zeros_like(p) if previous is None else previous
        if config.adjusted_momentum:
            b = mu * b - g
            params[i] = p - gamma * g + gamma * mu * b
        else:
            b = mu * b - gamma * g
            params[i] = p - gamma * g + mu * b
        buffers[i] = b

    # 5. Projection onto the l2 ball, of all managed parameters.
    if config.max_norm is not None:
        params = project_onto_ball(params, float(config.max_norm))

    # 6. What is recorded.
    new_state = OracleState(
        buffers=tuple(buffers),
        gamma=gamma,
        gamma_hat=gamma_hat,
        capped=capped,
        steps_taken=state.steps_taken + 1,
        steps_skipped=state.steps_skipped,
    )
    return params, new_state
