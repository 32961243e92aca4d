"""The ground truth of the extrapolation wrapper, in plain NumPy float64, from the docs alone.

``docs/extrapolation.md`` (seed: Lin, Kong, Stich, Jaggi, "Extrapolation for Large-batch
Training in Deep Learning", ICML 2020, arXiv:2006.05720), written out call by call as a
driver of (loss, gradient)-at-a-point callbacks. Like :mod:`alig_core.oracle`, it is
deliberately naive and shares no code with the generic functions of
:mod:`alig_core._extrapolation`: Python ``if`` statements on Python floats, a list of
float64 arrays for the anchor and another (or ``None``) for the extrapolated point. ALI-G
as the base is :func:`alig_core.oracle.oracle_step` (its momentum conventions, projection
and records), handed the linearised loss; SGD with Nesterov momentum as the base is
written here in ``torch.optim.SGD(nesterov=True)``'s convention
(``b <- mu*b + g; p <- p - lr*(g + mu*b)``).

Call forms (``call_form``):

- ``"alternating"``: each call makes one evaluation. In ``"gradient"`` mode the calls
  alternate: at the anchor (the displacement), then at the extrapolated point (the
  update); consecutive batches give ``g(w_t)`` and ``g(w~_t)``.
- ``"same_batch"``: in ``"gradient"`` mode one call evaluates at the anchor, then at
  ``w~_t``, on the same batch (torch's ``step(closure)``); where the anchor's evaluation is
  not finite the iteration is skipped and the second evaluation is not made.

``"past"`` and ``"noise"`` modes update on every call, with one evaluation at the point the
parameters hold, and place the next point in the same call; both call forms are the same
loop for them. Their first call, and the first call after a skipped iteration, is at the
anchor itself (``d = 0``).

Example (``l(w) = w^2 / 2``, SGD without momentum, lr 0.1, EXTRAP-SGD with lr_x 0.5:
``w~ = 1 - 0.5 * 1 = 0.5``, then ``w_1 = 1 - 0.1 * 0.5``):

  >>> import numpy as np
  >>> from alig_core import ExtrapolationConfig
  >>> from alig_core.oracle_extrapolation import SGDNesterov, run_extrapolation_oracle
  >>> def evaluate(point, batch):
  ...     return 0.5 * float(point[0] @ point[0]), [point[0].copy()]
  >>> records = run_extrapolation_oracle([np.array([1.0])], evaluate, 2,
  ...     ExtrapolationConfig(mode="gradient", lr_x=0.5), SGDNesterov(lr=0.1))
  >>> [(r.params[0].tolist(), r.anchor[0].tolist(), r.extrapolated) for r in records]
  [([0.5], [1.0], True), ([0.95], [0.95], False)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from alig_core._config import AliGConfig
from alig_core.oracle import OracleState, oracle_step, oracle_step_size

if TYPE_CHECKING:
    import numpy as np

    from alig_core._extrapolation_config import ExtrapolationConfig

__all__ = [
    "CALL_FORMS",
    "ExtrapolationOracle",
    "OracleCallRecord",
    "SGDNesterov",
    "run_extrapolation_oracle",
]

CALL_FORMS: tuple[str, ...] = ("alternating", "same_batch")
"""How a loop hands the wrapper its evaluations (see the module docstring)."""

Evaluate = Callable[[list["np.ndarray"], int], tuple[float, Sequence["np.ndarray | None"]]]
"""``evaluate(point, batch) -> (loss, grads)``: the minibatch ``batch``'s loss and gradients
at ``point`` (a gradient ``None``: that parameter has none)."""

Noise = Callable[[int], Sequence["np.ndarray"]]
"""``noise(t) -> xi_t``: one standard normal array per parameter, for iteration ``t``."""


@dataclass(frozen=True)
class SGDNesterov:
    """SGD with Nesterov momentum as the base, in ``torch.optim.SGD(nesterov=True)``'s form.

    ``b <- mu*b + g; p <- p - lr*(g + mu*b)`` (``b`` zero at the start); with
    ``momentum == 0``, ``p <- p - lr*g``. Parameters without a gradient are not touched.
    """

    lr: float
    momentum: float = 0.0


@dataclass(frozen=True)
class OracleCallRecord:
    """The oracle after one call."""

    params: list[np.ndarray]
    """What the parameters hold: ``w~_t`` where ``extrapolated``, else the anchor."""
    anchor: list[np.ndarray]
    """The anchor ``w_t`` (the weights to evaluate and save)."""
    extrapolated: bool
    """The parameters hold the extrapolated point (the wrapper's phase 1)."""
    iterations: int
    """Iterations completed (base steps taken)."""
    skipped: int
    """Iterations skipped."""
    evaluations: int
    """(loss, gradient) evaluations made so far."""
    lr_x: float | None
    """The ``lr_x`` of the displacement this call made (``None``: it made none)."""
    alig_state: OracleState | None
    """ALI-G as the base: its state (buffers, gamma, counters); else ``None``."""
    sgd_buffers: tuple[np.ndarray | None, ...]
    """SGD as the base: its momentum buffers (``None`` before a gradient, or without momentum)."""


class ExtrapolationOracle:
    """The extrapolation wrapper around a base, one :meth:`call` per call of the loop.

    Args:
      params: the initial parameters.
      config: the wrapper's options (an ``lr_x`` schedule is called with the iteration).
      base: :class:`SGDNesterov`, or an :class:`alig_core.AliGConfig` for ALI-G (its
        ``max_lr`` a number or ``None``).
      call_form: one of :data:`CALL_FORMS`.
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        config: ExtrapolationConfig,
        base: SGDNesterov | AliGConfig,
        call_form: str = "alternating",
    ) -> None:
        import numpy as np

        if call_form not in CALL_FORMS:
            raise ValueError(
                f"Invalid call_form: got {call_form!r}; expected one of {CALL_FORMS}. Pass "
                "'alternating' (one evaluation per call) or 'same_batch' (the closure form)."
            )
        if not isinstance(base, SGDNesterov | AliGConfig):
            raise ValueError(
                f"Invalid base: got {base!r}; expected SGDNesterov(lr=..., momentum=...) or an "
                "AliGConfig. Pass one of those."
            )
        self.config = config
        self.base = base
        self.call_form = call_form
        self.w = [np.array(p, dtype=np.float64) for p in params]
        self.tilde: list[np.ndarray] | None = None
        self.alig_state = OracleState.zeros(len(self.w)) if isinstance(base, AliGConfig) else None
        self.sgd_buffers: list[np.ndarray | None] = [None] * len(self.w)
        self.iterations = 0
        self.skipped = 0
        self.evaluations = 0
        self.last_lr_x: float | None = None

    # ------------------------------------------------------------------ one call

    def call(self, evaluate: Evaluate, batch: int, noise: Noise | None = None) -> OracleCallRecord:
        """One call of the loop on minibatch ``batch``; returns the record after it."""
        self.last_lr_x = None
        if self.config.mode == "gradient":
            if self.call_form == "same_batch":
                if self._extrapolate(evaluate, batch):
                    self._update(evaluate, batch, noise)
            elif self.tilde is None:
                self._extrapolate(evaluate, batch)
            else:
                self._update(evaluate, batch, noise)
        else:
            self._update(evaluate, batch, noise)
        return self.record()

    def record(self) -> OracleCallRecord:
        """The state now, as copies."""
        held = self.tilde if self.tilde is not None else self.w
        return OracleCallRecord(
            params=[p.copy() for p in held],
            anchor=[p.copy() for p in self.w],
            extrapolated=self.tilde is not None,
            iterations=self.iterations,
            skipped=self.skipped,
            evaluations=self.evaluations,
            lr_x=self.last_lr_x,
            alig_state=self.alig_state,
            sgd_buffers=tuple(None if b is None else b.copy() for b in self.sgd_buffers),
        )

    # ------------------------------------------------------------------ the steps

    def _extrapolate(self, evaluate: Evaluate, batch: int) -> bool:
        """At the anchor: d_t = -lr_x * g(w_t), w~_t = w_t + d_t. False where skipped."""
        loss, grads = self._evaluate(evaluate, self.w, batch)
        sq_norm = _sum_of_squares(grads)
        if not (math.isfinite(loss) and math.isfinite(sq_norm)):
            self.skipped += 1  # a skip is the whole iteration; nothing else moves
            return False
        if isinstance(self.base, AliGConfig):
            default = self._alig_gamma_at_anchor(loss, sq_norm)  # no record moves
        else:
            default = float(self.base.lr)
        lr_x = self._lr_x(self.iterations, default)
        self.tilde = [
            w.copy() if g is None else w - lr_x * g for w, g in zip(self.w, grads, strict=True)
        ]
        self.last_lr_x = lr_x
        return True

    def _update(self, evaluate: Evaluate, batch: int, noise: Noise | None) -> None:
        """At w~_t (or at w_t where no point is held): the base steps from w_t with g(w~_t)."""
        point = self.tilde if self.tilde is not None else self.w
        loss, grads = self._evaluate(evaluate, point, batch)
        sq_norm = _sum_of_squares(grads)
        if not (math.isfinite(loss) and math.isfinite(sq_norm)) or not self._base_step(
            grads, loss, point
        ):
            self.skipped += 1  # skipped: base untouched, the parameters back at the anchor
            self.tilde = None
            return
        self.iterations += 1
        if self.config.mode == "gradient":
            self.tilde = None
        elif self.config.mode == "past":  # d_{t+1} = -lr_x * g(w~_t)
            if isinstance(self.base, SGDNesterov):
                default = float(self.base.lr)
            else:
                assert self.alig_state is not None
                default = self.alig_state.gamma  # the gamma of the update just taken
            lr_x = self._lr_x(self.iterations, default)
            self.tilde = [
                w.copy() if g is None else w - lr_x * g for w, g in zip(self.w, grads, strict=True)
            ]
            self.last_lr_x = lr_x
        else:  # "noise": d_{t+1} = sigma * xi_{t+1}
            if noise is None:
                raise ValueError("mode='noise' needs noise=callable(t) -> xi_t per parameter.")
            import numpy as np

            xi = [np.asarray(x, dtype=np.float64) for x in noise(self.iterations)]
            sigma = float(self.config.sigma)  # type: ignore[arg-type]
            self.tilde = [w + sigma * x for w, x in zip(self.w, xi, strict=True)]

    def _base_step(
        self, grads: list[np.ndarray | None], loss: float, point: list[np.ndarray]
    ) -> bool:
        """The base steps from the anchor ``self.w`` with ``g(w~)``; False where skipped."""
        import numpy as np

        if isinstance(self.base, AliGConfig) and self.alig_state is not None:
            if self.config.linearized:  # the linearised loss: l(w~) + <g(w~), w_t - w~>
                loss = loss + sum(
                    float(np.sum(g * (w - p)))
                    for w, g, p in zip(self.w, grads, point, strict=True)
                    if g is not None
                )
            if not math.isfinite(loss):
                return False
            self.w, self.alig_state = oracle_step(self.w, grads, loss, self.alig_state, self.base)
            return True
        assert isinstance(self.base, SGDNesterov)
        lr, mu = float(self.base.lr), float(self.base.momentum)
        new_w = [w.copy() for w in self.w]
        for i, g in enumerate(grads):
            if g is None:
                continue
            if mu == 0.0:
                new_w[i] = self.w[i] - lr * g
                continue
            old = self.sgd_buffers[i]
            b = mu * (old if old is not None else np.zeros_like(g)) + g
            new_w[i] = self.w[i] - lr * (g + mu * b)
            self.sgd_buffers[i] = b
        self.w = new_w
        return True

    # ------------------------------------------------------------------ helpers

    def _evaluate(
        self, evaluate: Evaluate, point: list[np.ndarray], batch: int
    ) -> tuple[float, list[np.ndarray | None]]:
        import numpy as np

        loss, grads = evaluate([p.copy() for p in point], batch)
        self.evaluations += 1
        return float(loss), [None if g is None else np.asarray(g, dtype=np.float64) for g in grads]

    def _alig_gamma_at_anchor(self, loss: float, sq_norm: float) -> float:
        """ALI-G's step size (:func:`alig_core.oracle.oracle_step_size`) from l(w_t), g(w_t).

        0 where it is not finite (no cap and an overflowing quotient): ALI-G would skip.
        """
        assert isinstance(self.base, AliGConfig)
        size = oracle_step_size(loss, sq_norm, self.base)
        return 0.0 if size is None else size[0]

    def _lr_x(self, iteration: int, default: float) -> float:
        lr_x: Any = self.config.lr_x
        if lr_x is None:
            return default
        if callable(lr_x):
            return float(lr_x(iteration))
        return float(lr_x)


def _sum_of_squares(grads: Sequence[np.ndarray | None]) -> float:
    import numpy as np

    return float(sum(float(np.sum(g * g)) for g in grads if g is not None))


def run_extrapolation_oracle(
    params: Sequence[np.ndarray],
    evaluate: Evaluate,
    calls: int,
    config: ExtrapolationConfig,
    base: SGDNesterov | AliGConfig,
    *,
    call_form: str = "alternating",
    noise: Noise | None = None,
) -> list[OracleCallRecord]:
    """Runs ``calls`` calls of the loop (call ``k`` on minibatch ``k``); one record per call.

    Args:
      params: the initial parameters.
      evaluate: ``evaluate(point, batch) -> (loss, grads)``.
      calls: how many calls the loop makes (an iteration takes two in ``"gradient"`` mode
        with ``call_form="alternating"``, one otherwise).
      config: the wrapper's options.
      base: :class:`SGDNesterov` or an :class:`alig_core.AliGConfig`.
      call_form: one of :data:`CALL_FORMS`.
      noise: ``"noise"`` mode: ``noise(t) -> xi_t``.

    Returns:
      The :class:`OracleCallRecord` after every call.
    """
    oracle = ExtrapolationOracle(params, config, base, call_form)
    return [oracle.call(evaluate, batch, noise) for batch in range(calls)]
