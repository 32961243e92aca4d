"""The tables of the convergence benchmark and the files it writes.

Per task: the selected grid point of every method (:func:`summary_table`), the mean best
validation accuracy per learning rate (:func:`sensitivity_table`) and every grid point
(:func:`grid_table`); :func:`write_results` writes them to ``results.md`` and the
summaries and curves to ``results.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.convergence.methods import METHODS_BY_NAME
from benchmarks.convergence.tasks import BATCH_SIZE, Task
from benchmarks.convergence.training import GridPoint, nanmax, select_best

__all__ = [
    "Summary",
    "finite_or",
    "grid_table",
    "sensitivity_table",
    "summarize",
    "summary_table",
    "write_results",
]

PointsByTask = dict[str, dict[str, list[GridPoint]]]
"""Task name -> method name -> the method's grid points on the task."""


@dataclass
class Summary:
    """The reported numbers of one method on one task (its selected grid point)."""

    task: str
    method: str
    grid_points: int
    selected: str
    best_test_accuracy: tuple[float, float]
    """Mean and standard deviation over seeds of the best test accuracy over epochs."""
    test_accuracy_at_best_val: tuple[float, float]
    """Test accuracy at each seed's epoch of best validation accuracy (mean, std)."""
    final_train_loss: tuple[float, float]
    epochs_to_99: tuple[float, int]
    """Mean over seeds of the first epoch with test accuracy >= 99% of that seed's best;
    and the number of seeds in the mean."""
    seconds_per_run: float
    first_epoch_train_loss: float
    """Mean over seeds of the training loss after the first epoch (for the smoke test)."""
    last_epoch_train_loss: float
    diverged_grid_points: int


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(np.mean(array)), float(np.std(array))


def finite_or(value: float, default: float) -> float:
    """``value``, or ``default`` where it is not finite."""
    return value if math.isfinite(value) else default


def summarize(task: Task, method: str, points: Sequence[GridPoint]) -> Summary:
    """Selects the best grid point of ``method`` and computes its reported numbers."""
    best = select_best(points)
    best_tests, tests_at_val, epochs_to_99 = [], [], []
    for run in best.runs:
        test = np.asarray(run.test_accuracy, dtype=np.float64)
        val = np.asarray(run.val_accuracy, dtype=np.float64)
        best_test = float(np.nanmax(test[1:]))
        best_tests.append(best_test)
        tests_at_val.append(float(test[1 + int(np.nanargmax(val[1:]))]))
        reached = np.flatnonzero(np.nan_to_num(test[1:], nan=-1.0) >= 0.99 * best_test)
        epochs_to_99.append(float(reached[0] + 1))
    final_losses = [run.train_loss[-1] for run in best.runs]
    return Summary(
        task=task.name,
        method=method,
        grid_points=len(points),
        selected=best.describe(),
        best_test_accuracy=_mean_std(best_tests),
        test_accuracy_at_best_val=_mean_std(tests_at_val),
        final_train_loss=_mean_std(final_losses),
        epochs_to_99=(float(np.mean(epochs_to_99)), len(epochs_to_99)),
        seconds_per_run=float(np.mean([run.seconds for p in points for run in p.runs])),
        first_epoch_train_loss=float(np.mean([run.train_loss[1] for run in best.runs])),
        last_epoch_train_loss=float(np.mean(final_losses)),
        diverged_grid_points=sum(p.any_diverged for p in points),
    )


def _percent(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    if not math.isfinite(mean):
        return "diverged"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _loss(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.3g} ± {std:.2g}"


SUMMARY_HEADER = (
    "| method | grid | selected (by validation) | best test acc % | test acc % at best val "
    "| final train loss | epochs to 99% | s/run |\n"
    "|---|---:|---|---:|---:|---:|---:|---:|"
)


def summary_table(task: Task, summaries: Sequence[Summary]) -> str:
    """The markdown table of one task."""
    lines = [f"**{task.title}** ({task.epochs} epochs, batch {BATCH_SIZE})", "", SUMMARY_HEADER]
    for s in summaries:
        diverged = f" ({s.diverged_grid_points} diverged)" if s.diverged_grid_points else ""
        lines.append(
            f"| {s.method} | {s.grid_points}{diverged} | {s.selected} "
            f"| {_percent(s.best_test_accuracy)} | {_percent(s.test_accuracy_at_best_val)} "
            f"| {_loss(s.final_train_loss)} | {s.epochs_to_99[0]:.1f} "
            f"| {s.seconds_per_run:.1f} |"
        )
    return "\n".join(lines)


def sensitivity_table(task: Task, points_by_method: dict[str, list[GridPoint]]) -> str:
    """Mean best validation accuracy per learning rate (best over the other hyperparameters)."""
    lr_key = {m: METHODS_BY_NAME[m].lr_key for m in points_by_method}
    rates = sorted({p.hyperparameters[lr_key[m]] for m, ps in points_by_method.items() for p in ps})
    header = "| method | " + " | ".join(f"{r:g}" for r in rates) + " |"
    lines = [
        f"**{task.title}**: mean best validation accuracy % per lr (max_lr for the Polyak "
        "methods), best over the other hyperparameters",
        "",
        header,
    ]
    lines.append("|---|" + "---:|" * len(rates))
    for method, points in points_by_method.items():
        cells = []
        for rate in rates:
            at_rate = [p for p in points if p.hyperparameters[lr_key[method]] == rate]
            if not at_rate:
                cells.append("")
                continue
            best = max(at_rate, key=lambda p: finite_or(p.mean_best_val_accuracy, -1.0))
            mark = "†" if best.any_diverged else ""
            cells.append(f"{100 * best.mean_best_val_accuracy:.1f}{mark}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(task: Task, points_by_method: dict[str, list[GridPoint]]) -> str:
    """Every grid point: mean best validation and test accuracy, mean final training loss."""
    lines = [
        f"**{task.title}**",
        "",
        "| method | hyperparameters | best val acc % | best test acc % | final train loss |",
        "|---|---|---:|---:|---:|",
    ]
    for method, points in points_by_method.items():
        for p in points:
            best_tests = [nanmax(run.test_accuracy[1:]) for run in p.runs]
            final = float(np.mean([run.train_loss[-1] for run in p.runs]))
            diverged = " (diverged)" if p.any_diverged else ""
            lines.append(
                f"| {method} | {p.describe()}{diverged} | {100 * p.mean_best_val_accuracy:.1f} "
                f"| {100 * float(np.mean(best_tests)):.1f} | {final:.3g} |"
            )
    return "\n".join(lines)


def write_results(
    out_dir: Path,
    tasks: Sequence[Task],
    points: PointsByTask,
    summaries: dict[str, list[Summary]],
    tables: str,
    command: str,
    wall_seconds: float,
) -> None:
    """Writes ``results.md`` (every table) and ``results.json`` (summaries and curves)."""
    skipped = {
        f"{t.name} / {p.method} / {p.describe()}": run.steps_skipped
        for t in tasks
        for ps in points[t.name].values()
        for p in ps
        for run in p.runs
        if run.steps_skipped
    }
    sections = [
        "# Convergence benchmark results",
        "",
        f"Command: `{command}`; wall time {wall_seconds:.0f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s).",
        "",
        "## Selected grid point per method",
        "",
        tables,
        "",
        "## Sensitivity to the learning rate",
        "",
        "† : a seed diverged at that setting.",
        "",
        "\n\n".join(sensitivity_table(t, points[t.name]) for t in tasks),
        "",
        "## Every grid point",
        "",
        "\n\n".join(grid_table(t, points[t.name]) for t in tasks),
        "",
        f"ALI-G steps skipped (non-finite loss or gradient): {skipped or 'none'}",
        "",
    ]
    (out_dir / "results.md").write_text("\n".join(sections), encoding="utf-8")
    payload = {
        "command": command,
        "wall_seconds": wall_seconds,
        "summaries": {name: [asdict(s) for s in rows] for name, rows in summaries.items()},
        "curves": {
            task: {
                method: {
                    "selected": select_best(ps).describe(),
                    "train_loss": [run.train_loss for run in select_best(ps).runs],
                    "test_accuracy": [run.test_accuracy for run in select_best(ps).runs],
                }
                for method, ps in by_method.items()
            }
            for task, by_method in points.items()
        },
        "convex_tasks": [t.name for t in tasks if t.convex],
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
