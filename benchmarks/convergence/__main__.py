"""``python -m benchmarks.convergence``: runs the benchmark (see the package's docstring)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import benchmarks.convergence
from benchmarks.convergence.methods import METHODS
from benchmarks.convergence.plots import plot_curves, plot_gammas, plot_sensitivity
from benchmarks.convergence.report import (
    PointsByTask,
    Summary,
    summarize,
    summary_table,
    write_results,
)
from benchmarks.convergence.tasks import TASKS, quick_task
from benchmarks.convergence.training import run_method, select_best

DEFAULT_OUT_DIR = Path(__file__).parent
"""The results live next to the code: ``benchmarks/convergence/results.md`` etc."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = benchmarks.convergence.__doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid, 1 seed, 4 epochs (CI)")
    parser.add_argument("--with-jax", action="store_true", help="add optax.polyak_sgd rows")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick: 1)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: these models are too small to gain from more, "
        "and 2 threads on a busy 2-core machine ran several times slower)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the process exit code."""
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    num_seeds = args.seeds or (1 if args.quick else 3)
    seeds = list(range(num_seeds))
    tasks = [TASKS[name] for name in args.tasks.split(",") if name]
    if args.quick:
        tasks = [quick_task(task) for task in tasks]
    methods = [m for m in METHODS if m.framework != "jax" or args.with_jax]
    args.out_dir.mkdir(parents=True, exist_ok=True)

    points: PointsByTask = {}
    summaries: dict[str, list[Summary]] = {}
    for task in tasks:
        split = task.load()
        points[task.name] = {}
        for method in methods:
            if not method.runs_on(task):
                continue
            method_start = time.perf_counter()
            points[task.name][method.name] = run_method(task, split, method, seeds, args.quick)
            print(
                f"{task.name:22s} {method.name:24s} {len(points[task.name][method.name])} grid "
                f"points x {num_seeds} seeds: {time.perf_counter() - method_start:6.1f} s",
                flush=True,
            )
        summaries[task.name] = [summarize(task, m, ps) for m, ps in points[task.name].items()]
        selected = {m: select_best(ps) for m, ps in points[task.name].items()}
        plot_curves(task, selected, args.out_dir / f"{task.name}.png")
    plot_gammas(tasks, points, args.out_dir / "gamma.png")
    plot_sensitivity(tasks, points, args.out_dir / "sensitivity.png")
    wall_seconds = time.perf_counter() - start

    command = "python -m benchmarks.convergence " + " ".join(argv or sys.argv[1:])
    tables = "\n\n".join(summary_table(t, summaries[t.name]) for t in tasks)
    print("\n" + tables + f"\n\nwall time: {wall_seconds:.0f} s")
    write_results(args.out_dir, tasks, points, summaries, tables, command.strip(), wall_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
