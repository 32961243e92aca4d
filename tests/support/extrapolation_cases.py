"""The extrapolation table (mode x base x call form) and the problem every suite runs it on.

docs/specification.md, section 8, numerical equality: every implementation of the wrapper is checked
against :mod:`alig_core.oracle_extrapolation` over 100 iterations for every mode, base (SGD
Nesterov, ALI-G in both conventions, with projection) and call form. ``CASES`` is that
table; :class:`Problem` gives the (loss, gradient)-at-a-point callbacks (NumPy float64), so a
framework's suite evaluates the same function at its own parameters.
:func:`wrapper_options` gives a row's options in a wrapper's keywords (the noise seeded
with :data:`SEED`); :data:`INVALID_OPTIONS`, what every wrapper refuses at construction.
The checks every adapter runs on the table are in ``extrapolation_checks``.

The problem is least squares with a linear teacher (every minibatch can be fitted exactly,
as ALI-G assumes), so the Polyak step ``l / ||g||^2`` moves within a range and, with the caps
below, gamma is capped on some iterations and not on others. Events, keyed by the count of
evaluations made (``EVENTS``, modulo 31, so that in the alternating form they hit the
evaluations at the anchor and at the extrapolated point alike): a parameter without a
gradient, all-zero gradients, a loss below ``f_star``, and the non-finite values that skip
an iteration (NaN and infinite losses, an infinite and a NaN gradient entry).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from alig_cases import apply_event
from alig_core import EXTRAPOLATION_MODES, AliGConfig, ExtrapolationConfig
from alig_core.oracle_extrapolation import (
    OracleCallRecord,
    SGDNesterov,
    run_extrapolation_oracle,
)

__all__ = [
    "BASES",
    "CALL_FORMS",
    "CASES",
    "EVENTS",
    "ITERATIONS",
    "NON_FINITE_EVENTS",
    "PARAM_SHAPES",
    "INVALID_OPTIONS",
    "SEED",
    "ExtrapolationCase",
    "Problem",
    "every_mode_base_and_form",
    "find_case",
    "initial_params",
    "invalid_options_for",
    "make_noise",
    "run_case_oracle",
    "wrapper_options",
    "zero_displacement",
]

ITERATIONS = 100
"""SPEC: every implementation within 1e-10 of the oracle over 100 iterations (float64)."""

FEATURES, OUTPUTS, ROWS, BATCH = 5, 3, 64, 8

PARAM_SHAPES: tuple[tuple[int, ...], ...] = ((FEATURES, OUTPUTS), (OUTPUTS,), ())
"""A weight matrix, a bias vector and a scalar offset added to every output."""

EVENTS: dict[int, str] = {
    3: "missing_grad",  # the bias has no gradient
    5: "zero_grads",  # every gradient exactly zero (the loss as it is)
    7: "nan_loss",
    9: "loss_below_f_star",  # loss -0.5 with the true gradients
    11: "inf_grad",
    13: "neg_inf_loss",
    17: "nan_grad",
}
"""What happens at an evaluation (the count of evaluations made, modulo 31)."""

NON_FINITE_EVENTS = frozenset({"nan_loss", "inf_grad", "neg_inf_loss", "nan_grad"})

BASES: dict[str, SGDNesterov | AliGConfig] = {
    "sgd_nesterov": SGDNesterov(lr=0.05, momentum=0.9),
    "alig_standard": AliGConfig(max_lr=0.8, momentum=0.9),
    "alig_adjusted": AliGConfig(max_lr=0.8, momentum=0.9, adjusted_momentum=True),
    "alig_standard_projected": AliGConfig(max_lr=0.8, momentum=0.9, max_norm=2.0),
    "alig_adjusted_projected": AliGConfig(
        max_lr=0.8, momentum=0.9, adjusted_momentum=True, max_norm=2.0
    ),
}
"""The bases of SPEC's table: SGD Nesterov, ALI-G in both conventions, with projection."""


def _schedule(t: Any) -> Any:
    """An lr_x schedule of the iteration (plain arithmetic: works on arrays too)."""
    return 0.2 / (1.0 + 0.05 * t)


@dataclass(frozen=True)
class ExtrapolationCase:
    """One row: a mode, a base, a call form and the wrapper's options."""

    mode: str
    base: str
    call_form: str
    lr_x: Any = None
    sigma: float | None = None
    linearized: bool = True
    label: str = ""

    @property
    def name(self) -> str:
        extra = f"-{self.label}" if self.label else ""
        return f"{self.mode}-{self.base}-{self.call_form}{extra}"

    @property
    def config(self) -> ExtrapolationConfig:
        return ExtrapolationConfig(
            mode=self.mode, lr_x=self.lr_x, sigma=self.sigma, linearized=self.linearized
        )

    @property
    def base_config(self) -> SGDNesterov | AliGConfig:
        return BASES[self.base]

    @property
    def is_alig(self) -> bool:
        return isinstance(self.base_config, AliGConfig)

    @property
    def calls(self) -> int:
        """Calls that make ``ITERATIONS`` iteration attempts (two per attempt where alternating)."""
        two = self.mode == "gradient" and self.call_form == "alternating"
        return ITERATIONS * (2 if two else 1)


CALL_FORMS = ("alternating", "same_batch")
"""How the loss reaches the wrapper: a fresh batch per call, or a closure that evaluates
the same batch at the anchor and at the extrapolated point."""


def _table() -> tuple[ExtrapolationCase, ...]:
    cases = []
    for mode in EXTRAPOLATION_MODES:
        for base in BASES:
            for call_form in CALL_FORMS:
                sigma = 0.05 if mode == "noise" else None
                cases.append(ExtrapolationCase(mode, base, call_form, sigma=sigma))
    cases += [
        ExtrapolationCase(
            "gradient", "alig_standard", "alternating", linearized=False, label="plain"
        ),
        ExtrapolationCase(
            "gradient", "alig_adjusted", "same_batch", linearized=False, label="plain"
        ),
        ExtrapolationCase("past", "alig_standard", "alternating", linearized=False, label="plain"),
        ExtrapolationCase(
            "noise", "alig_adjusted", "alternating", sigma=0.05, linearized=False, label="plain"
        ),
        ExtrapolationCase(
            "gradient", "alig_adjusted_projected", "alternating", lr_x=0.1, label="lr_x"
        ),
        ExtrapolationCase(
            "gradient", "sgd_nesterov", "same_batch", lr_x=_schedule, label="schedule"
        ),
        ExtrapolationCase(
            "past", "alig_standard_projected", "alternating", lr_x=_schedule, label="schedule"
        ),
        ExtrapolationCase("past", "sgd_nesterov", "alternating", lr_x=0.1, label="lr_x"),
    ]
    return tuple(cases)


CASES: tuple[ExtrapolationCase, ...] = _table()
"""Every mode x base x call form with the default lr_x, then linearised-off, fixed-lr_x and
schedule variants."""


def find_case(name: str) -> ExtrapolationCase:
    """The row of ``CASES`` named ``name``."""
    return next(c for c in CASES if c.name == name)


SEED = 11
"""The seed of the noise of every wrapper the suites build."""


def wrapper_options(config: ExtrapolationConfig) -> dict[str, Any]:
    """``config`` as the keyword arguments of an adapter's wrapper, with the noise's
    ``seed`` (:data:`SEED` in "noise" mode, else ``None``)."""
    return {
        "mode": config.mode,
        "lr_x": config.lr_x,
        "sigma": config.sigma,
        "linearized": config.linearized,
        "seed": SEED if config.mode == "noise" else None,
    }


_ALL = frozenset({"torch", "keras", "jax"})

INVALID_OPTIONS: tuple[tuple[dict[str, Any], str, frozenset[str]], ...] = (
    ({"mode": "extragradient"}, r"Invalid mode: got 'extragradient'.*'gradient', 'past'", _ALL),
    ({"mode": None}, "Invalid mode: got None", _ALL),
    ({"lr_x": -0.1}, r"Invalid lr_x: got -0\.1.*>= 0", _ALL),
    ({"lr_x": float("nan")}, "Invalid lr_x: got nan", _ALL),
    ({"lr_x": "0.1"}, "Invalid lr_x: got '0.1'", _ALL),
    ({"mode": "noise", "sigma": 0.1, "lr_x": 0.1}, "Invalid lr_x.*mode='noise'", _ALL),
    ({"mode": "noise"}, "Invalid sigma: got None.*sigma=0.01", _ALL),
    ({"mode": "noise", "sigma": -1.0}, r"Invalid sigma: got -1\.0", _ALL),
    ({"sigma": 0.1}, r"Invalid sigma: got 0\.1 .*mode='gradient'.*sigma=None", _ALL),
    ({"linearized": "yes"}, "Invalid linearized: got 'yes'", _ALL),
    ({"seed": 3}, "Invalid {seed}: got 3 .*mode='gradient'.*{seed}=None", _ALL),
    ({"mode": "noise", "sigma": 0.1, "seed": 1.5}, r"Invalid {seed}: got 1\.5", _ALL),
    ({"mode": "noise", "sigma": 0.1, "seed": True}, "Invalid {seed}: got True", _ALL),
    ({"mode": "noise", "sigma": 0.1, "seed": "seed"}, "Invalid {seed}: got 'seed'", _ALL),
    # every seed is an int >= 0 (optax also takes a JAX key); Keras' below 2**31.
    ({"mode": "noise", "sigma": 0.1, "seed": -2}, "Invalid seed: got -2", _ALL),
    ({"mode": "noise", "sigma": 0.1, "seed": 2**31}, r"Invalid seed.*\[0, 2\*\*31\)", {"keras"}),
    ({"alternate": "no"}, "Invalid alternate", {"torch"}),
    ({"anchor_gradient": "global"}, "Invalid anchor_gradient: got 'global'", {"torch"}),
)
"""(options, the error's pattern, the adapters it applies to): what every wrapper refuses
at construction, with a message that says the fix. ``seed`` is the noise's seed, the same
name in every adapter."""


def invalid_options_for(framework: str) -> list[Any]:
    """The rows of :data:`INVALID_OPTIONS` that apply to ``framework``, as ``pytest.param``
    (``kwargs``, ``match``) in that adapter's words."""
    rows = []
    for i, (options, match, frameworks) in enumerate(INVALID_OPTIONS):
        if framework not in frameworks:
            continue
        rows.append(pytest.param(options, match.format(seed="seed"), id=f"{i}-{options}"))
    return rows


def initial_params(seed: int = 0) -> list[np.ndarray]:
    """The initial parameters (float64; global norm about 3, outside the ``max_norm=2`` ball)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in PARAM_SHAPES]


def make_noise(seed: int = 7) -> Callable[[int], list[np.ndarray]]:
    """``noise(t)``: standard normal ``xi_t`` per parameter, a function of ``(seed, t)`` only."""

    def noise(t: int) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, int(t)])
        return [rng.standard_normal(shape) for shape in PARAM_SHAPES]

    return noise


class Problem:
    """Least squares ``mean_i ||x_i W + b + s - y_i||^2 / 2`` over minibatches of 8 rows.

    ``evaluate(point, batch)`` gives the loss and gradients (NumPy float64) of minibatch
    ``batch`` at ``point``, with ``EVENTS`` applied by the count of evaluations made
    (``events=False``: none). Make a fresh one per run.
    """

    def __init__(self, *, events: bool = True, finite: bool = False, seed: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((ROWS, FEATURES))
        teacher = rng.standard_normal((FEATURES, OUTPUTS))
        self.y = self.x @ teacher + 0.5
        self.events = events
        self.finite = finite
        self.evaluations = 0
        self.points: list[list[np.ndarray]] = []

    def event(self, n: int) -> str | None:
        if not self.events:
            return None
        event = EVENTS.get(n % 31)
        if self.finite and event in NON_FINITE_EVENTS:
            return None
        return event

    def evaluate(self, point: Sequence[Any], batch: int) -> tuple[float, list[np.ndarray | None]]:
        w, b, s = (np.asarray(p, dtype=np.float64) for p in point)
        self.points.append([w.copy(), b.copy(), s.copy()])
        event = self.event(self.evaluations)
        self.evaluations += 1
        start = (BATCH * batch) % ROWS
        x, y = self.x[start : start + BATCH], self.y[start : start + BATCH]
        residual = x @ w + b + s - y
        loss = 0.5 * float(np.sum(residual * residual)) / BATCH
        grad_out = residual / BATCH
        grads: list[np.ndarray | None] = [x.T @ grad_out, grad_out.sum(axis=0), grad_out.sum()]
        return apply_event(event, loss, grads)


def run_case_oracle(
    case: ExtrapolationCase, problem: Problem | None = None
) -> list[OracleCallRecord]:
    """The oracle on ``case`` (``case.calls`` calls) from :func:`initial_params`."""
    problem = problem if problem is not None else Problem()
    return run_extrapolation_oracle(
        initial_params(),
        problem.evaluate,
        case.calls,
        case.config,
        case.base_config,
        call_form=case.call_form,
        noise=make_noise(),
    )


every_mode_base_and_form = pytest.mark.parametrize(
    ("mode", "base", "call_form"),
    [
        pytest.param(mode, base, call_form, id=f"{mode}-{base}-{call_form}")
        for mode in EXTRAPOLATION_MODES
        for base in BASES
        for call_form in CALL_FORMS
    ],
)
"""Parametrizes a test over every mode, base and call form (the table's plain rows)."""


def zero_displacement(mode: str) -> ExtrapolationConfig:
    """The wrapper that never leaves the anchor: ``lr_x=0`` (``sigma=0`` in "noise" mode)."""
    if mode == "noise":
        return ExtrapolationConfig(mode="noise", sigma=0.0)
    return ExtrapolationConfig(mode=mode, lr_x=0.0)
