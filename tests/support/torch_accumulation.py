"""Gradient accumulation against one step on the union of the micro-batches (torch).

One small float64 classifier, one data set and the reference run: each step takes one
"union" batch of ``BATCH`` rows with ``AliG.step(loss=mean loss)``. A loop that splits
each union batch into k micro-batches and accumulates must land on the same parameters
and gammas (docs/specification.md, "The loss and the gradient belong together"): relative 1e-10 in
float64, with gamma moving and below the cap (asserted, so that a wrong loss shows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alig_cases import max_relative_deviation
from alig_torch import AliG

__all__ = [
    "BATCH",
    "KWARGS",
    "STEPS",
    "Run",
    "assert_same_run",
    "data",
    "net",
    "reference_run",
]

STEPS = 5
"""Optimizer steps of every run."""

BATCH = 16
"""Rows of one union batch (divisible by every k tested: 1, 2, 4)."""

KWARGS = {"max_lr": 50.0, "momentum": 0.9}
"""AliG's arguments: the cap is far above the gammas of this problem, which move."""


@dataclass
class Run:
    """The parameters after the last step, and gamma after each step."""

    params: list[np.ndarray]
    gammas: list[float]


def data(steps: int = STEPS, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps * batch`` rows: inputs (float64, 5 features) and class labels (3 classes)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (steps * batch,), generator=generator)
    return x, y


def net() -> torch.nn.Module:
    """The classifier, always from the same initial weights."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def snapshot(model: torch.nn.Module, gammas: Sequence[float]) -> Run:
    return Run([p.detach().numpy().copy() for p in model.parameters()], list(gammas))


def reference_run(
    model: torch.nn.Module | None = None, steps: int = STEPS, batch: int = BATCH
) -> Run:
    """One ``step(loss=...)`` per union batch of ``batch`` consecutive rows."""
    model = net() if model is None else model
    opt = AliG(model.parameters(), **KWARGS)
    x, y = data(steps, batch)
    gammas = []
    for t in range(steps):
        rows = slice(t * batch, (t + 1) * batch)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
        loss.backward()
        opt.step(loss=loss)
        gammas.append(float(opt.gamma))
    return snapshot(model, gammas)


def assert_same_run(actual: Run, expected: Run, max_lr: float = KWARGS["max_lr"]) -> None:
    """Same parameters (relative 1e-10) and gammas, with gamma moving below the cap."""
    assert len(actual.gammas) == len(expected.gammas)
    assert len(set(expected.gammas)) == len(expected.gammas), "gamma must move every step"
    assert all(0 < g < max_lr for g in expected.gammas), "gamma must not be pinned"
    gamma_gap = max(abs(a - b) / b for a, b in zip(actual.gammas, expected.gammas, strict=True))
    assert gamma_gap <= 1e-10, (actual.gammas, expected.gammas)
    assert max_relative_deviation(actual.params, expected.params) <= 1e-10
