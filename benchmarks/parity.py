"""The main job: the same ALI-G training run in PyTorch, Keras/TensorFlow, JAX and NumPy.

Trains the MLP 64-32-10 on scikit-learn's digits (no download) from the same initial
weights (drawn once with NumPy) on the same minibatches, with ALI-G in every framework and
in the NumPy float64 oracle, then prints one table (final training loss, test accuracy,
largest parameter deviation from the oracle, median milliseconds per training step, mean
gamma, share of steps at the cap) and writes a plot: the loss and gamma curves of every
run overlaid, and their deviation from the oracle on a log scale.

Then the same run with ALI-G inside each framework's extrapolation wrapper
(``--extrapolation past``, the default; ``none`` to leave it out): "past" mode, one
gradient per step, the previous update's gradient as the displacement and ALI-G's
linearised step, against ``alig_core.oracle_extrapolation``; a second table.

Run (from the repository root): ``python -m benchmarks.parity [--dtype float64|float32]
[--steps 200] [--max-lr 1.0 --momentum 0.9 --adjusted-momentum --max-norm R] [--frameworks ...]
[--extrapolation past|none]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

from benchmarks._parity_runners import RUNNERS, StepRecord
from benchmarks._parity_setup import (
    accuracy,
    batches,
    initial_weights,
    load_digits_split,
)


def deviation(params: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Largest absolute difference, relative to the largest reference parameter."""
    scale = max(float(np.max(np.abs(r))) for r in reference) or 1.0
    return max(float(np.max(np.abs(p - r))) for p, r in zip(params, reference, strict=True)) / (
        scale
    )


def train(
    name: str, alig_kwargs: dict, dtype: str, steps: int, batch_size: int
) -> tuple[list[StepRecord], list[float]]:
    """Runs one framework; returns its step records and wall time per step (seconds)."""
    data = load_digits_split()
    runner = RUNNERS[name](initial_weights(), alig_kwargs, dtype)
    records, seconds = [], []
    for index in batches(len(data.x_train), batch_size, steps):
        x, y = data.x_train[index].astype(dtype), data.y_train[index]
        start = time.perf_counter()
        records.append(runner.step(x, y))
        seconds.append(time.perf_counter() - start)
        if len(records) % 50 == 0 or len(records) == steps:
            print(
                f"  {name:<7} step {len(records):>4}/{steps}  loss {records[-1].loss:.4f}  "
                f"gamma {records[-1].gamma:.4g}",
                flush=True,
            )
    return records, seconds


def plot(runs: dict[str, list[StepRecord]], path: Path) -> None:
    """Loss and gamma curves overlaid, and the deviation from the oracle (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    styles = {"oracle": ("k", "-", 3.0), "torch": ("C0", "--", 1.5)}
    styles |= {"keras": ("C1", ":", 1.5), "jax": ("C2", "-.", 1.5)}
    oracle = runs["oracle"]
    for name, records in runs.items():
        color, style, width = styles.get(name, ("C3", "-", 1.0))
        steps = np.arange(1, len(records) + 1)
        kwargs = {"color": color, "linestyle": style, "linewidth": width, "label": name}
        axes[0].plot(steps, [r.loss for r in records], **kwargs)
        axes[1].plot(steps, [r.gamma for r in records], **kwargs)
        if name != "oracle":
            gaps = [
                max(deviation(r.params, o.params), 1e-17)
                for r, o in zip(records, oracle, strict=True)
            ]
            axes[2].semilogy(steps, gaps, **kwargs)
    axes[0].set(title="training loss (minibatch)", xlabel="step", yscale="log")
    axes[1].set(title="ALI-G step size gamma_t", xlabel="step")
    axes[2].set(title="parameter deviation from the oracle", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-lr", type=float, default=1.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--adjusted-momentum", action="store_true")
    parser.add_argument("--max-norm", type=float, default=None)
    parser.add_argument("--frameworks", default=",".join(n for n in RUNNERS if n != "oracle"))
    parser.add_argument("--plot", type=Path, default=Path("parity.png"))
    parser.add_argument("--extrapolation", choices=["past", "none"], default="past")
    args = parser.parse_args()
    alig_kwargs = {
        "max_lr": args.max_lr,
        "momentum": args.momentum,
        "adjusted_momentum": args.adjusted_momentum,
        "max_norm": args.max_norm,
    }
    names = ["oracle"] + [n.strip() for n in args.frameworks.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        parser.error(f"unknown frameworks {unknown}; available: {sorted(RUNNERS)}")

    print(f"ALI-G {alig_kwargs}, MLP 64-32-10 on digits, {args.steps} steps, {args.dtype}")
    runs = run_table(names, alig_kwargs, args)
    plot(runs, args.plot)
    if args.extrapolation != "none":
        extrapolation = {"mode": args.extrapolation}
        print(f"\nThe same run, ALI-G inside the extrapolation wrapper {extrapolation}")
        run_table(names, alig_kwargs | {"extrapolation": extrapolation}, args)
    print(f"\nwrote {args.plot}")


def run_table(
    names: list[str], alig_kwargs: dict, args: argparse.Namespace
) -> dict[str, list[StepRecord]]:
    """Trains every framework in ``names`` with ``alig_kwargs``; prints the table."""
    runs, times = {}, {}
    for name in names:
        runs[name], times[name] = train(name, alig_kwargs, args.dtype, args.steps, args.batch_size)

    data = load_digits_split()
    oracle = runs["oracle"]
    print()
    header = (
        f"{'framework':<9} {'final loss':>10} {'test acc':>8} {'max dev vs oracle':>17} "
        f"{'ms/step':>8} {'mean gamma':>10} {'at cap':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, records in runs.items():
        worst = max(deviation(r.params, o.params) for r, o in zip(records, oracle, strict=True))
        print(
            f"{name:<9} {records[-1].loss:>10.5f} "
            f"{accuracy(records[-1].params, data.x_test, data.y_test):>8.3f} "
            f"{worst:>17.2e} {statistics.median(times[name]) * 1e3:>8.3f} "
            f"{np.mean([r.gamma for r in records]):>10.4f} "
            f"{np.mean([r.capped for r in records]):>6.0%}"
        )
    return runs


if __name__ == "__main__":
    main()
