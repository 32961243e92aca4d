"""The figures of the convergence benchmark (matplotlib, imported when a figure is drawn).

Per task, ``<task>.png``: the curves of every method's selected grid point; over all
tasks, ``gamma.png``: ALI-G's step size per step, and ``sensitivity.png``: the mean best
validation accuracy against the learning rate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.convergence.methods import ALIG, METHODS_BY_NAME
from benchmarks.convergence.report import PointsByTask, finite_or
from benchmarks.convergence.tasks import Task
from benchmarks.convergence.training import GridPoint

__all__ = ["plot_curves", "plot_gammas", "plot_sensitivity"]


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _panel_per_task(tasks: Sequence[Task]) -> tuple[Any, Iterator[tuple[Any, Task]]]:
    """A figure with one panel per task, and its (panel, task) pairs."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    return figure, zip(axes[0], tasks, strict=True)


def plot_curves(task: Task, selected: dict[str, GridPoint], path: Path) -> None:
    """Training loss and test accuracy per epoch of each method's selected grid point."""
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for method, point in selected.items():
        losses = np.asarray([run.train_loss for run in point.runs])
        accuracies = 100 * np.asarray([run.test_accuracy for run in point.runs])
        epochs = np.arange(losses.shape[1])
        for axis, values in ((loss_axis, losses), (accuracy_axis, accuracies)):
            mean = np.nanmean(values, axis=0)
            (line,) = axis.plot(epochs, mean, label=f"{method} ({point.describe()})")
            if len(point.runs) > 1:
                axis.fill_between(
                    epochs,
                    np.nanmin(values, axis=0),
                    np.nanmax(values, axis=0),
                    color=line.get_color(),
                    alpha=0.15,
                )
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss (whole training split)")
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("test accuracy %")
    accuracy_axis.set_ylim(bottom=max(0.0, float(np.nanmin(
        [np.nanmax(100 * np.asarray(r.test_accuracy)) for p in selected.values() for r in p.runs]
    )) - 25.0))  # fmt: skip
    accuracy_axis.legend(fontsize=7, loc="lower right")
    figure.suptitle(f"{task.title}: selected grid point per method (mean over seeds, min-max)")
    _save(figure, path)


def plot_gammas(tasks: Sequence[Task], points: PointsByTask, path: Path) -> None:
    """ALI-G's step size gamma_t at every step (seed 0), one line per max_lr, per task."""
    figure, panels = _panel_per_task(tasks)
    for axis, task in panels:
        for point in points[task.name].get(ALIG, []):
            gammas = point.runs[0].gammas
            if not gammas:
                continue
            (line,) = axis.plot(np.asarray(gammas), linewidth=0.6, label=point.describe())
            axis.axhline(point.hyperparameters["max_lr"], color=line.get_color(), ls=":", lw=0.8)
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_ylabel("gamma_t")
        axis.set_title(task.title, fontsize=8)
        axis.legend(fontsize=7)
    figure.suptitle("ALI-G (momentum 0.9, no max_norm), seed 0: step size per step; dotted: cap")
    _save(figure, path)


def plot_sensitivity(tasks: Sequence[Task], points: PointsByTask, path: Path) -> None:
    """Mean best validation accuracy against the learning rate (or cap), per method."""
    figure, panels = _panel_per_task(tasks)
    first_axis = None
    for axis, task in panels:
        first_axis = first_axis if first_axis is not None else axis
        for method, method_points in points[task.name].items():
            key = METHODS_BY_NAME[method].lr_key
            rates = sorted({p.hyperparameters[key] for p in method_points})
            best = [
                max(
                    finite_or(p.mean_best_val_accuracy, 0.0)
                    for p in method_points
                    if p.hyperparameters[key] == rate
                )
                for rate in rates
            ]
            axis.plot(rates, 100 * np.asarray(best), marker="o", label=method)
        axis.set_xscale("log")
        axis.set_xlabel("lr (max_lr for the Polyak methods)")
        axis.set_ylabel("mean best validation accuracy %")
        axis.set_title(task.title, fontsize=8)
    if first_axis is not None:
        first_axis.legend(fontsize=7)
    _save(figure, path)
