"""20,000 ALI-G steps on a noisy convex problem, in each framework: stable, bounded, lean.

The problem: least squares ``0.5 * mean((X w - y)**2)`` with ``y = X w_true`` exactly (the
interpolation regime ALI-G is made for), ``X`` with features of very different scales,
and a fresh random minibatch of 16 rows at every step (the noise). Each framework trains
the same model from the same start on the same minibatches (float32), with
``AliG(max_lr=1.0, momentum=0.9)``, and reports:

- whether any parameter or loss was ever NaN (tracked on the device, no host sync);
- the smallest and largest gamma over all steps (must lie in ``[0, max_lr]``);
- the full-data loss at the start and at the end (must fall below 1e-6 of the start:
  the interpolation regime);
- the resident memory (RSS) after the first 1,000 steps and at the end: it must not grow
  (at most 16 MiB, the allocator's noise).

Each framework's run is ``long_run`` in ``benchmarks.frameworks._<name>``. The script exits
with status 1 if any framework breaks one of these. The parity nox
session runs it in full as a test (tests/parity/test_long_run.py).

Run: ``python -m benchmarks.long_run [--frameworks torch,jax,keras] [--steps 20000]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

from benchmarks import frameworks

FRAMEWORKS = frameworks.FRAMEWORKS
MAX_LR, MOMENTUM = 1.0, 0.9
ROWS, FEATURES, BATCH = 512, 20, 16
WARM_UP = 1_000
RSS_SLACK = 16 * 2**20
LOSS_DROP = 1e-6


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


@dataclass
class Problem:
    x: np.ndarray
    y: np.ndarray
    w0: np.ndarray
    batches: np.ndarray
    """(steps, BATCH) row indices: the minibatch of every step."""

    def loss(self, w: np.ndarray) -> float:
        residual = self.x.astype(np.float64) @ w.astype(np.float64) - self.y
        return float(0.5 * np.mean(residual**2))


def make_problem(steps: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    scales = np.logspace(-1, 0.5, FEATURES)  # condition number ~ 1e3 for the Hessian
    x = (rng.standard_normal((ROWS, FEATURES)) * scales).astype(np.float32)
    w_true = rng.standard_normal(FEATURES).astype(np.float32)
    y = x.astype(np.float64) @ w_true.astype(np.float64)
    return Problem(
        x=x,
        y=y.astype(np.float32),
        w0=np.zeros(FEATURES, np.float32),
        batches=rng.integers(0, ROWS, (steps, BATCH)),
    )


@dataclass
class Result:
    framework: str
    any_nan: bool
    gamma_min: float
    gamma_max: float
    loss_start: float
    loss_end: float
    rss_after_warm_up: int
    rss_end: int
    seconds: float

    def failures(self) -> list[str]:
        problems = []
        if self.any_nan:
            problems.append("a NaN appeared")
        if not 0.0 <= self.gamma_min <= self.gamma_max <= MAX_LR:
            problems.append(f"gamma left [0, {MAX_LR}]: [{self.gamma_min}, {self.gamma_max}]")
        if not self.loss_end <= LOSS_DROP * self.loss_start:
            problems.append(f"loss {self.loss_start:.3g} -> {self.loss_end:.3g}")
        if self.rss_end - self.rss_after_warm_up > RSS_SLACK:
            growth = (self.rss_end - self.rss_after_warm_up) / 2**20
            problems.append(f"RSS grew by {growth:.1f} MiB")
        return problems


def finish(
    framework: str,
    problem: Problem,
    watched: tuple[Any, Any, Any],
    w_end: np.ndarray,
    rss_after_warm_up: int,
    start: float,
) -> Result:
    """The result of a run that ends now: ``watched`` is (any NaN, gamma min, gamma max), as
    the framework tracked them; the loss is computed here, in float64, at the start and at
    ``w_end``."""
    any_nan, gamma_min, gamma_max = watched
    return Result(
        framework,
        bool(any_nan),
        float(gamma_min),
        float(gamma_max),
        problem.loss(problem.w0),
        problem.loss(w_end),
        rss_after_warm_up,
        rss_bytes(),
        time.perf_counter() - start,
    )


def _framework_run(name: str) -> Callable[[Problem], Result]:
    """``long_run`` of ``benchmarks.frameworks._<name>`` (imported when called)."""

    def run(problem: Problem) -> Result:
        result: Result = frameworks.load(name).long_run(problem)
        return result

    return run


RUNNERS: dict[str, Callable[[Problem], Result]] = {n: _framework_run(n) for n in FRAMEWORKS}
"""Each framework's run (``long_run`` in ``benchmarks.frameworks._<name>``)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--steps", type=int, default=20_000)
    args = parser.parse_args(argv)
    problem = make_problem(args.steps)
    failed = False
    print(
        f"{'framework':<18}{'steps':>7}{'gamma min':>11}{'gamma max':>11}{'loss start':>12}"
        f"{'loss end':>11}{'RSS@1k MiB':>12}{'RSS end':>9}{'s':>7}  verdict"
    )
    for name in args.frameworks.split(","):
        result = RUNNERS[name.strip()](problem)
        problems = result.failures()
        failed |= bool(problems)
        print(
            f"{result.framework:<18}{args.steps:>7}{result.gamma_min:>11.3g}"
            f"{result.gamma_max:>11.3g}{result.loss_start:>12.3g}{result.loss_end:>11.3g}"
            f"{result.rss_after_warm_up / 2**20:>12.1f}{result.rss_end / 2**20:>9.1f}"
            f"{result.seconds:>7.1f}  {'; '.join(problems) or 'ok'}",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
