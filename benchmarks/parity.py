"""The main job: the same ALI-G training run in PyTorch, Keras/TensorFlow, JAX and NumPy.

Trains the MLP 64-32-10 on scikit-learn's digits (no download) from the same initial
weights (drawn once with NumPy) on the same minibatches, with ALI-G in every framework and
in the NumPy float64 oracle, then prints one table (final training loss, test accuracy,
largest parameter deviation from the oracle, median milliseconds per training step, mean
gamma, share of steps at the cap).

Then the same run with ALI-G inside each framework's extrapolation wrapper
(``--extrapolation past``, the default; ``none`` to leave it out): "past" mode, one
gradient per step, the previous update's gradient as the displacement and ALI-G's
linearised step, against ``alig_core.oracle_extrapolation``; a second table.

The plot (``--plot``, ``parity.png``) has one row per table: the loss and gamma curves of
every run overlaid (each run with its own line style and staggered markers, since the curves
coincide), and their deviation from the oracle on a log scale.

Run (from the repository root): ``python -m benchmarks.parity --help`` lists every option.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

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


# One look per run: the curves coincide to rounding, so each run also gets its own markers,
# placed at staggered steps, to stay visible where the lines lie on top of each other.
STYLES: dict[str, dict[str, Any]] = {
    "oracle": {"color": "0.6", "linestyle": "-", "linewidth": 4.0, "marker": None},
    "torch": {"color": "C0", "linestyle": "--", "linewidth": 1.2, "marker": "o"},
    "keras": {"color": "C1", "linestyle": ":", "linewidth": 1.2, "marker": "s"},
    "jax": {"color": "C2", "linestyle": "-.", "linewidth": 1.2, "marker": "^"},
}


def _style(name: str, index: int, steps: int) -> dict[str, Any]:
    """Line style of one run; its markers every ``steps // 10`` steps, offset by run."""
    style = dict(STYLES.get(name, {"color": f"C{3 + index}", "linestyle": "-", "marker": "x"}))
    every = max(steps // 10, 1)
    if style.get("marker"):
        style |= {"markevery": (index * every // 4 % every, every), "markersize": 5}
        style |= {"markerfacecolor": "none"}
    return style | {"label": name}


def plot(tables: dict[str, dict[str, list[StepRecord]]], path: Path) -> None:
    """One row per table (the plain run, the extrapolated run): the loss, gamma and the
    deviation from the oracle (log scales for the loss and the deviation) of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 3, figsize=(15, 3.6 * len(tables)), squeeze=False)
    for row, (title, runs) in zip(axes, tables.items(), strict=True):
        oracle = runs["oracle"]
        for index, (name, records) in enumerate(runs.items()):
            steps = np.arange(1, len(records) + 1)
            style = _style(name, index, len(records))
            row[0].plot(steps, [r.loss for r in records], **style)
            row[1].plot(steps, [r.gamma for r in records], **style)
            if name != "oracle":  # the oracle's own deviation is 0
                gaps = [
                    max(deviation(r.params, o.params), 1e-17)
                    for r, o in zip(records, oracle, strict=True)
                ]
                row[2].plot(steps, gaps, **style)
        row[0].set(title=f"{title}: training loss", ylabel="minibatch loss", yscale="log")
        row[1].set(title=f"{title}: ALI-G step size", ylabel="gamma_t")
        row[2].set(title=f"{title}: deviation from the oracle", yscale="log")
        row[2].set(ylabel="max |p - p_oracle| / max |p_oracle|")
        for ax in row:
            ax.set(xlabel="step")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    # above the panels, outside every axis: the legend covers no data
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.savefig(path, dpi=80)


def parse_args(
    argv: list[str] | None = None,
) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The command line (``python -m benchmarks.parity --help``, ``nox -s demo -- --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.parity",
        description=(
            "The main job: the same ALI-G training run (an MLP 64-32-10 on scikit-learn's "
            "digits) in PyTorch, Keras/TensorFlow, JAX and the NumPy float64 oracle, from the "
            "same initial weights on the same minibatches; then the same run inside each "
            "framework's extrapolation wrapper. Prints a table per run and writes a plot."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dtype",
        choices=["float64", "float32"],
        default="float64",
        help="dtype of the parameters and the data in every framework (the oracle: float64)",
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps of each run")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="minibatch size (the same batches everywhere)"
    )
    parser.add_argument(
        "--max-lr", type=float, default=1.0, help="ALI-G's cap on the step size, max_lr"
    )
    parser.add_argument(
        "--momentum", type=float, default=0.9, help="ALI-G's momentum mu, 0 <= mu < 1"
    )
    parser.add_argument(
        "--adjusted-momentum",
        action="store_true",
        help="the adjusted momentum convention (b <- mu*b - g) instead of the standard one "
        "(b <- mu*b - gamma*g): docs/update-rule.md",
    )
    parser.add_argument(
        "--max-norm",
        type=float,
        default=None,
        help="radius of ALI-G's l2-ball constraint on the parameters; None: no constraint",
    )
    parser.add_argument(
        "--frameworks",
        default=",".join(n for n in RUNNERS if n != "oracle"),
        help="comma-separated frameworks to run beside the oracle "
        f"(any of {', '.join(n for n in RUNNERS if n != 'oracle')})",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path("parity.png"),
        help="where to write the figure (PNG): loss, gamma and deviation from the oracle of "
        "every run, one row per table",
    )
    parser.add_argument(
        "--extrapolation",
        choices=["past", "none"],
        default="past",
        help="the second run: ALI-G inside each framework's extrapolation wrapper in 'past' "
        "mode (docs/extrapolation.md), or 'none' to leave it out",
    )
    return parser.parse_args(argv), parser


def main(argv: list[str] | None = None) -> None:
    args, parser = parse_args(argv)
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
    tables = {"ALI-G": run_table(names, alig_kwargs, args)}
    if args.extrapolation != "none":
        extrapolation = {"mode": args.extrapolation}
        print(f"\nThe same run, ALI-G inside the extrapolation wrapper {extrapolation}")
        tables[f"extrapolation ({args.extrapolation})"] = run_table(
            names, alig_kwargs | {"extrapolation": extrapolation}, args
        )
    plot(tables, args.plot)
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
