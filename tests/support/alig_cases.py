"""The one table of configurations and the one (loss, gradient) sequence every adapter is tested on.

Every test suite (core, torch, keras, jax, parity) imports ``CASES`` from here and runs
its adapter against :func:`run_oracle` on :func:`make_sequence`, so a configuration added
here is checked in every framework.

The sequence covers, at fixed steps (``EVENTS``): a parameter without a gradient, all-zero
gradients, a NaN loss, an inf gradient element, a loss below ``f_star`` (negative loss),
a -inf loss, a NaN gradient element, and, from ``FROZEN_FROM`` on, a frozen parameter
(never a gradient again). Gradient magnitudes vary over several orders so that, with the
caps in ``CASES``, gamma is capped on some steps and not on others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alig_core import AliGConfig
from alig_core.oracle import OracleState, oracle_step

__all__ = [
    "CASES",
    "EVENTS",
    "FROZEN_FROM",
    "LARGE_PARAM_SHAPES",
    "PARAM_SHAPES",
    "Case",
    "Step",
    "apply_event",
    "initial_params",
    "make_sequence",
    "max_relative_deviation",
    "run_oracle",
    "tolerance",
]

PARAM_SHAPES: tuple[tuple[int, ...], ...] = ((4, 3), (3,), (2, 2, 2), ())
"""Shapes of the test parameters: a matrix, a vector, a 3-d tensor and a scalar."""

FROZEN_FROM = 50
"""From this step on, parameter 2 never has a gradient (a layer frozen mid-run)."""

EVENTS: dict[int, str] = {
    3: "missing_grad",  # parameter 1 has no gradient this step
    5: "zero_grads",  # every gradient is exactly zero
    7: "nan_loss",  # skipped
    9: "loss_below_f_star",  # gamma_hat < 0 -> gamma = 0
    11: "inf_grad",  # skipped
    13: "neg_inf_loss",  # skipped
    17: "nan_grad",  # skipped
}
"""What happens at a step (taken modulo 20, so every 20 steps)."""


@dataclass(frozen=True)
class Case:
    """One row of the configuration table: a name and the ALI-G hyperparameters."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    pinned_at_cap: bool = False
    """True when gamma stays at max_lr on the ordinary steps of the sequence: such a case
    must also equal the framework's own Nesterov SGD with lr = max_lr."""

    @property
    def config(self) -> AliGConfig:
        return AliGConfig(**self.kwargs)


CASES: tuple[Case, ...] = (
    Case("sgd_uncapped", {"max_lr": None}),
    Case("sgd_capped", {"max_lr": 0.05}),
    Case("standard_momentum", {"max_lr": 0.05, "momentum": 0.9}),
    Case("adjusted_momentum", {"max_lr": 0.05, "momentum": 0.9, "adjusted_momentum": True}),
    Case("standard_projected", {"max_lr": 0.05, "momentum": 0.9, "max_norm": 3.0}),
    Case(
        "adjusted_projected",
        {"max_lr": 0.05, "momentum": 0.9, "adjusted_momentum": True, "max_norm": 3.0},
    ),
    Case("f_star_eps0", {"max_lr": 0.2, "momentum": 0.5, "eps": 0.0, "f_star": 0.3}),
    Case("pinned_standard", {"max_lr": 1e-3, "momentum": 0.9}, pinned_at_cap=True),
    Case(
        "pinned_adjusted",
        {"max_lr": 1e-3, "momentum": 0.9, "adjusted_momentum": True},
        pinned_at_cap=True,
    ),
)


@dataclass(frozen=True)
class Step:
    """One step of the sequence: the loss and one gradient per parameter (``None``: none)."""

    loss: float
    grads: tuple[np.ndarray | None, ...]
    event: str | None


LARGE_PARAM_SHAPES: tuple[tuple[int, ...], ...] = ((256, 256), *PARAM_SHAPES[1:])
"""``PARAM_SHAPES`` with a matrix of 65,536 entries first: an adapter whose step takes
another path from some tensor size on (torch's host path, one tensor at a time from
``2**16`` entries) runs the table on these shapes too (``shapes=`` below)."""


def initial_params(
    dtype: Any = np.float64, seed: int = 0, *, shapes: Sequence[tuple[int, ...]] = PARAM_SHAPES
) -> list[np.ndarray]:
    """The initial parameters (global norm about 5, outside the ``max_norm=3`` ball)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape in shapes]


def make_sequence(
    steps: int,
    dtype: Any = np.float64,
    seed: int = 1,
    *,
    pinned: bool = False,
    shapes: Sequence[tuple[int, ...]] = PARAM_SHAPES,
) -> list[Step]:
    """The (loss, gradients) sequence, already rounded to ``dtype``.

    Losses lie in [0.05, 2]; gradient scales are log-uniform in [0.03, 30], so the Polyak
    step ranges from far below to far above the caps of ``CASES``.

    With ``pinned=True``: no ``EVENTS``, no frozen parameter, and gradient scales in
    [0.03, 0.3], so that gamma_hat > 1e-2 and the cap of the ``pinned_at_cap`` cases is
    hit on every step (the sequence on which ALI-G equals Nesterov SGD).

    ``shapes`` replaces ``PARAM_SHAPES`` (e.g. ``LARGE_PARAM_SHAPES``; the first must be a
    matrix and the second a vector, as ``apply_event`` needs).
    """
    rng = np.random.default_rng(seed)
    sequence = []
    for t in range(steps):
        event = None if pinned else EVENTS.get(t % 20)
        loss = float(rng.uniform(0.05, 2.0))
        scale = float(10.0 ** rng.uniform(-1.5, -0.5 if pinned else 1.5))
        grads: list[np.ndarray | None] = [
            (scale * rng.standard_normal(shape)).astype(dtype) for shape in shapes
        ]
        if t >= FROZEN_FROM and not pinned:
            grads[2] = None
        loss, grads = apply_event(event, loss, grads)
        loss = float(np.asarray(loss, dtype=dtype))
        sequence.append(Step(loss=loss, grads=tuple(grads), event=event))
    return sequence


def apply_event(
    event: str | None, loss: float, grads: list[np.ndarray | None]
) -> tuple[float, list[np.ndarray | None]]:
    """The loss and gradients of a step at which ``event`` (a value of ``EVENTS``) happens.

    Parameter 0 must be a matrix of at least 2 x 3 and parameter 1 a vector (as in
    ``PARAM_SHAPES``, and in the extrapolation table's problem); ``grads`` is not changed.
    """
    grads = list(grads)
    if event == "missing_grad":
        grads[1] = None
    elif event == "zero_grads":
        grads = [None if g is None else np.zeros_like(g) for g in grads]
    elif event == "nan_loss":
        loss = float("nan")
    elif event == "loss_below_f_star":
        loss = -0.5
    elif event == "inf_grad":
        grads[0] = np.array(grads[0])
        grads[0][1, 2] = np.inf
    elif event == "neg_inf_loss":
        loss = float("-inf")
    elif event == "nan_grad":
        grads[1] = np.array(grads[1])
        grads[1][0] = np.nan
    else:
        assert event is None, f"unknown event {event!r}"
    return loss, grads


def run_oracle(
    config: AliGConfig,
    params: Sequence[np.ndarray],
    sequence: Sequence[Step],
) -> list[tuple[list[np.ndarray], OracleState]]:
    """Runs the oracle over ``sequence``; returns (params, state) after every step."""
    state = OracleState.zeros(len(params))
    current = [np.asarray(p, dtype=np.float64) for p in params]
    history = []
    for step in sequence:
        current, state = oracle_step(current, step.grads, step.loss, state, config)
        history.append((current, state))
    return history


def max_relative_deviation(actual: Sequence[Any], expected: Sequence[np.ndarray]) -> float:
    """``max |actual - expected|`` over all entries, relative to the largest ``|expected|``."""
    actual = [np.asarray(a, dtype=np.float64) for a in actual]
    expected = [np.asarray(e, dtype=np.float64) for e in expected]
    scale = max(float(np.max(np.abs(e), initial=0.0)) for e in expected) or 1.0
    return (
        max(
            float(np.max(np.abs(a - e), initial=0.0)) for a, e in zip(actual, expected, strict=True)
        )
        / scale
    )


def tolerance(dtype: Any) -> tuple[int, float]:
    """SPEC.md's parity target for ``dtype``: (number of steps, relative tolerance)."""
    if np.dtype(dtype) == np.float64:
        return 100, 1e-10
    return 20, 1e-5
