"""What one extrapolated training iteration costs against its bare base, in each framework.

The problem (issue #22): an MLP 64-128-10 (ReLU), float32, on scikit-learn's digits
(standardised), mean softmax cross-entropy, minibatches of ``--batch`` (32) rows taken in
a fixed shuffled order and cycled, one CPU thread. One *iteration* is everything a
training loop does per optimizer iteration on a fresh minibatch: forward, backward and
the optimizer call(s), blocking. Rows per framework, for each of two bare bases (Nesterov
SGD, lr 0.1, momentum 0.9; ALI-G, ``max_lr=0.1, momentum=0.9``):

- the bare base (1.00x by definition);
- the extrapolation wrapper around it in ``"past"`` mode (one gradient per iteration, so
  its floor is the base itself) and in ``"gradient"`` mode (two gradients per iteration);
- a floor for ``"gradient"`` mode: the bare base making two gradients per iteration (torch:
  two forward and backward passes, one step; JAX and Keras, where ``"gradient"`` mode
  alternates one evaluation per call: two calls of the base).

Each row is divided by ITS bare base, measured in the same process; the targets of issue
#22: ``"past"`` at most 1.3x, ``"gradient"`` at most 2.3x. What a wrapper row costs above
its floor is the wrapper's own (Python and small tensor operations).

Each framework runs in its own process (a fresh interpreter, the thread settings in its
environment before anything is imported: :data:`THREAD_ENV`), its rows built by
``extrapolation_cost_rows(problem)`` in ``benchmarks.frameworks._<framework>`` and timed
interleaved as ``benchmarks.step_time`` times its rows (every round runs each row once,
in a new shuffled order; each row warmed up first). The table gives the median and its
ratio, and the 10th percentile and its ratio: on a loaded machine a longer row is more
often preempted during a run than a short one, which inflates its median more than the
base's; the 10th percentile keeps the runs that were not. ``keras`` is Keras on
TensorFlow, ``keras_jax`` on its JAX backend, both through ``model.train_on_batch``.

Run: ``python -m benchmarks.extrapolation_cost [--frameworks torch,jax,keras,keras_jax]
[--rounds N] [--batch 32] [--profile]`` (``--profile``: a cProfile of the ``"past"`` rows
afterwards, the top Python costs per row).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks import frameworks
from benchmarks.step_time import _samples_interleaved

if TYPE_CHECKING:
    import numpy as np

THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_ENABLE_ONEDNN_OPTS": "0",
}
"""Set in each framework's process before it starts (torch and TensorFlow also set their
thread counts to 1 in code: ``torch.set_num_threads``, ``tf.config.threading``)."""

ROW_SETS = {
    "torch": ("torch", "torch"),
    "jax": ("jax", "jax"),
    "keras": ("keras", "tensorflow"),
    "keras_jax": ("keras", "jax"),
}
"""Row set -> (framework module of ``benchmarks.frameworks``, ``KERAS_BACKEND``)."""
DEFAULT_FRAMEWORKS = ("torch", "jax", "keras", "keras_jax")
DEFAULT_ROUNDS = {"torch": 3000, "jax": 3000, "keras": 600, "keras_jax": 600}
"""Rounds per row set, for a default run of about 2-3 minutes on 2 shared cores."""
WARM_UP = 20
"""Iterations of every row before the timing (compilation, state, both phases)."""
TARGETS = {"past": 1.3, "gradient": 2.3}
"""The most an extrapolated iteration may cost over its bare base (issue #22, B = 32)."""
HIDDEN = 128
LR, MOMENTUM = 0.1, 0.9


@dataclass(frozen=True)
class CostProblem:
    """The data and the start, the same for every framework and row.

    ``x`` is ``(batches, B, 64)`` float32, ``y`` is ``(batches, B)`` int64; the weights
    are ``w1 (64, 128), b1 (128,), w2 (128, 10), b2 (10,)`` float32, with
    ``logits = relu(x @ w1 + b1) @ w2 + b2`` (a framework that stores ``(out, in)``
    transposes them).
    """

    x: np.ndarray
    y: np.ndarray
    weights: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class CostRow:
    """One row: ``run()`` makes one training iteration and blocks until it is done.

    ``base`` names the bare-base row it is divided by (a bare base: itself); ``mode`` is
    the extrapolation mode, ``None`` for a bare base, ``"floor"`` for the bare base making
    what ``"gradient"`` mode makes at the least (two gradients; see the module doc);
    ``loss()`` reads the last loss (a sanity check that the training ran, read after the
    timing).
    """

    name: str
    base: str
    mode: str | None
    run: Callable[[], None]
    loss: Callable[[], float]


def make_problem(batch: int, seed: int = 0) -> CostProblem:
    """Digits, standardised per feature (constant pixels left at 0), in batches of ``batch``
    rows (a fixed shuffle; the incomplete last batch dropped); Glorot-uniform weights."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float64)
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    count = len(x) // batch
    if count == 0:
        raise ValueError(f"--batch {batch} is larger than the data set ({len(x)} rows)")
    rows = order[: count * batch].reshape(count, batch)
    weights = []
    for fan_in, fan_out in ((x.shape[1], HIDDEN), (HIDDEN, 10)):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights.append(rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32))
        weights.append(np.zeros(fan_out, np.float32))
    return CostProblem(
        x[rows].astype(np.float32), digits.target[rows].astype(np.int64), tuple(weights)
    )


def _low_quantile(times: list[float]) -> float:
    """The 10th percentile (the lowest time of the fastest tenth of the runs)."""
    return sorted(times)[len(times) // 10]


def _print_table(
    framework: str, info: str, rows: list[CostRow], samples: dict[str, list[float]]
) -> None:
    medians = {name: statistics.median(times) for name, times in samples.items()}
    lows = {name: _low_quantile(times) for name, times in samples.items()}
    print(f"{framework}: {info}")
    print(
        f"{'row':<44} {'ms/iter':>8} {'vs base':>8} {'p10 ms':>7} {'vs base':>8} "
        f"{'target':>7} {'last loss':>10}"
    )
    for row in rows:
        target = f"{TARGETS[row.mode]:.1f}x" if row.mode in TARGETS else ""
        print(
            f"{row.name:<44} {medians[row.name] * 1e3:>8.3f} "
            f"{medians[row.name] / medians[row.base]:>7.2f}x {lows[row.name] * 1e3:>7.3f} "
            f"{lows[row.name] / lows[row.base]:>7.2f}x {target:>7} {row.loss():>10.2e}"
        )


def _profile(rows: list[CostRow], iterations: int, top: int = 15) -> None:
    for row in rows:
        if row.mode != "past":
            continue
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(iterations):
            row.run()
        profiler.disable()
        for order in ("tottime", "cumulative"):
            print(f"\ncProfile of {iterations} iterations of {row.name!r}, top {top} by {order}:")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats(order).print_stats(top)


def run_framework(framework: str, rounds: int, batch: int, profile: bool) -> None:
    """Builds, warms up and times one row set in this process, then prints its table."""
    os.environ.update(THREAD_ENV)
    os.environ["KERAS_BACKEND"] = ROW_SETS[framework][1]
    module = frameworks.load(ROW_SETS[framework][0])
    print(f"building and warming up the {framework} rows ...", flush=True)
    info, rows = module.extrapolation_cost_rows(make_problem(batch))
    for row in rows:
        for _ in range(WARM_UP):
            row.run()
    samples = _samples_interleaved({row.name: row.run for row in rows}, rounds)
    _print_table(framework, info, rows, samples)
    if profile:
        _profile(rows, min(rounds, 1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default=",".join(DEFAULT_FRAMEWORKS))
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"rounds per row set (default {DEFAULT_ROUNDS})"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="cProfile the 'past' rows")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    unknown = set(names) - set(ROW_SETS)
    if unknown:
        parser.error(f"unknown frameworks {sorted(unknown)}; choose from {tuple(ROW_SETS)}")
    if args.batch < 1 or (args.rounds is not None and args.rounds < 1):
        parser.error(f"--batch and --rounds must be >= 1, got {args.batch} and {args.rounds}")

    if args.in_process:  # one row set, in this (fresh) process
        (framework,) = names
        run_framework(framework, args.rounds or DEFAULT_ROUNDS[framework], args.batch, args.profile)
        return
    print(f"python {sys.version.split()[0]}; thread settings of each process: {THREAD_ENV}")
    for framework in names:
        command = [sys.executable, "-m", "benchmarks.extrapolation_cost", "--in-process"]
        command += ["--frameworks", framework, "--batch", str(args.batch)]
        command += [] if args.rounds is None else ["--rounds", str(args.rounds)]
        command += ["--profile"] if args.profile else []
        print(flush=True)
        completed = subprocess.run(command, env={**os.environ, **THREAD_ENV}, check=False)
        if completed.returncode:
            sys.exit(f"the {framework} rows failed (exit status {completed.returncode})")


if __name__ == "__main__":
    main()
