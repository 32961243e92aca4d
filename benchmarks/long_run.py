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

The script exits with status 1 if any framework breaks one of these. The parity nox
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

FRAMEWORKS = ("torch", "jax", "keras")
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


def run_torch(problem: Problem) -> Result:
    import torch

    from alig_torch import AliG

    torch.manual_seed(0)
    x, y = torch.from_numpy(problem.x), torch.from_numpy(problem.y)
    w = torch.nn.Parameter(torch.from_numpy(problem.w0.copy()))
    opt = AliG([w], max_lr=MAX_LR, momentum=MOMENTUM)
    gamma_min = torch.full((), torch.inf)
    gamma_max = torch.full((), -torch.inf)
    any_nan = torch.zeros((), dtype=torch.bool)
    batches = torch.from_numpy(problem.batches)
    start, rss_warm = time.perf_counter(), 0
    for t in range(len(batches)):
        rows = batches[t]

        def closure(rows: torch.Tensor = rows) -> torch.Tensor:
            opt.zero_grad()
            loss = 0.5 * ((x[rows] @ w - y[rows]) ** 2).mean()
            loss.backward()
            return loss

        loss = opt.step(closure)
        gamma_min = torch.minimum(gamma_min, opt.gamma)
        gamma_max = torch.maximum(gamma_max, opt.gamma)
        any_nan |= loss.isnan() | w.isnan().any()
        if t + 1 == WARM_UP:
            rss_warm = rss_bytes()
    return Result(
        "torch",
        bool(any_nan),
        float(gamma_min),
        float(gamma_max),
        problem.loss(problem.w0),
        problem.loss(w.detach().numpy()),
        rss_warm,
        rss_bytes(),
        time.perf_counter() - start,
    )


def run_jax(problem: Problem) -> Result:
    import jax
    import jax.numpy as jnp
    import optax

    from alig_jax import alig

    tx = alig(max_lr=MAX_LR, momentum=MOMENTUM)
    x, y = jnp.asarray(problem.x), jnp.asarray(problem.y)

    def loss_fn(w: jax.Array, rows: jax.Array) -> jax.Array:
        return 0.5 * jnp.mean((x[rows] @ w - y[rows]) ** 2)

    @jax.jit
    def train_step(carry, rows):
        w, state, gamma_min, gamma_max, any_nan = carry
        loss, grad = jax.value_and_grad(loss_fn)(w, rows)
        updates, state = tx.update(grad, state, w, value=loss)
        w = optax.apply_updates(w, updates)
        any_nan = any_nan | jnp.isnan(loss) | jnp.isnan(w).any()
        return (
            w,
            state,
            jnp.minimum(gamma_min, state.gamma),
            jnp.maximum(gamma_max, state.gamma),
            any_nan,
        )

    w = jnp.asarray(problem.w0)
    carry = (w, tx.init(w), jnp.inf, -jnp.inf, jnp.zeros((), bool))
    batches = jnp.asarray(problem.batches)
    start, rss_warm = time.perf_counter(), 0
    for t in range(len(problem.batches)):
        carry = train_step(carry, batches[t])
        if t + 1 == WARM_UP:
            jax.block_until_ready(carry)
            rss_warm = rss_bytes()
    w, _, gamma_min, gamma_max, any_nan = jax.block_until_ready(carry)
    return Result(
        "jax",
        bool(any_nan),
        float(gamma_min),
        float(gamma_max),
        problem.loss(problem.w0),
        problem.loss(np.asarray(w)),
        rss_warm,
        rss_bytes(),
        time.perf_counter() - start,
    )


def run_keras(problem: Problem) -> Result:
    import keras

    from alig_tf import AliG, AliGTrainStep

    class Linear(AliGTrainStep, keras.Sequential):
        pass

    model = Linear([keras.Input((FEATURES,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(problem.w0[:, None])
    model.compile(optimizer=AliG(max_lr=MAX_LR, momentum=MOMENTUM), loss=_half_mse)
    rows = problem.batches.reshape(-1)
    x, y = problem.x[rows], problem.y[rows, None]

    class Watch(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.gamma_min, self.gamma_max, self.any_nan, self.rss_warm = np.inf, -np.inf, False, 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            gamma = float(keras.ops.convert_to_numpy(model.optimizer.gamma.value))
            self.gamma_min, self.gamma_max = min(self.gamma_min, gamma), max(self.gamma_max, gamma)
            self.any_nan |= bool(np.isnan((logs or {}).get("loss", 0.0)))
            if batch + 1 == WARM_UP:
                self.rss_warm = rss_bytes()

    watch = Watch()
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[watch])
    w = keras.ops.convert_to_numpy(model.layers[0].kernel.value)[:, 0]
    return Result(
        f"keras ({keras.backend.backend()})",
        watch.any_nan or bool(np.isnan(w).any()),
        watch.gamma_min,
        watch.gamma_max,
        problem.loss(problem.w0),
        problem.loss(w),
        watch.rss_warm,
        rss_bytes(),
        time.perf_counter() - start,
    )


def _half_mse(y_true, y_pred):
    import keras

    return 0.5 * keras.ops.mean(keras.ops.square(y_pred - y_true))


RUNNERS: dict[str, Callable[[Problem], Result]] = {
    "torch": run_torch,
    "jax": run_jax,
    "keras": run_keras,
}


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
