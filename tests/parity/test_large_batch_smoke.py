"""Smoke run of the large-batch benchmark: ``python -m benchmarks.large_batch --quick``.

Runs the module as a user would (a subprocess, outputs to a temporary folder) and checks
that it writes the tables, the JSON and the plot, that the gradient evaluations it
reports are what each method costs (two per iteration for extrapolation in ``"gradient"``
mode, as many as SGD for the half-epoch rows), that every method learns at the base batch,
and that a second run gives the same numbers. The recipe (scaling, warm-up, decay) and the
selection on the validation split are checked on the module's functions (``benchmarks`` is a
package; pytest puts the repository root on the path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmark_runs import run_benchmark
from benchmarks import large_batch
from benchmarks.large_batch import BASE_BATCH, METHODS, Candidate, Run, select, step_size_at

TASKS = ("mnist1d", "digits")
QUICK_BATCHES = ("32", "256")
GRADIENT_MODE = ("EXTRAP-SGD", "ALI-G + extrap. (linearised)", "ALI-G + extrap. (plain)")
"""Extrapolation in "gradient" mode at the full epoch budget: two evaluations an iteration."""
HALF_EPOCHS = ("EXTRAP-SGD, half epochs", "ALI-G + extrap. (linearised), half epochs")
ONE_EVALUATION = (
    "SGD",
    "SGD + noise",
    "SGD at EXTRAP-SGD's lr",
    "ALI-G",
    "ALI-G at the linearised row's cap",
)


def _run(out_dir: Path, *extra: str) -> dict[str, Any]:
    completed = run_benchmark("large_batch", "--quick", "--out-dir", str(out_dir), *extra)
    return {
        "stdout": completed.stdout,
        "json": json.loads((out_dir / "results.json").read_text(encoding="utf-8")),
    }


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out_dir = tmp_path_factory.mktemp("large_batch")
    return _run(out_dir), out_dir


def _runs(results: dict[str, Any], task: str, method: str, batch: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = results["tasks"][task]["methods"][method]["runs"][batch]
    return runs


def test_writes_the_tables_the_json_and_the_plot(quick_run: tuple[dict[str, Any], Path]) -> None:
    output, out_dir = quick_run
    report = (out_dir / "results.md").read_text(encoding="utf-8")
    header = "| method | selected at B=32 (validation) | grad evals (passes) | B=32 | B=256 |"
    for text in (output["stdout"], report):
        assert text.count(header) == 2 * len(TASKS)  # best-val and final tables per task
        for method in METHODS:
            assert f"| {method.name} |" in text, method.name
    assert (out_dir / "accuracy_vs_batch.png").stat().st_size > 10_000
    timing_header = "| method | ms/iteration B=32 | x base | ms/iteration B=256 | x base |"
    timed = [m.name for m in METHODS if m.role == "tuned"]
    sections = report.split(timing_header)[1:]
    assert len(sections) == len(TASKS)
    for section in sections:  # the separator line, then a row per timed method
        rows = section.strip().splitlines()[1 : 1 + len(timed)]
        assert [row.split(" | ")[0] for row in rows] == [f"| {name}" for name in timed]
    for task in TASKS:
        methods = output["json"]["tasks"][task]["methods"]
        assert list(methods) == [m.name for m in METHODS]
        for method, record in methods.items():
            assert sorted(record["runs"]) == sorted(QUICK_BATCHES), (task, method)
            for runs in record["runs"].values():
                assert len(runs) == 1  # one seed in quick mode
                for run in runs:
                    for accuracy in run["val_accuracy"] + run["test_accuracy"]:
                        assert 0.0 <= accuracy <= 1.0, (task, method, run)


def test_the_gradient_evaluations_are_what_each_method_costs(
    quick_run: tuple[dict[str, Any], Path],
) -> None:
    results = quick_run[0]["json"]
    for task, batch in ((t, b) for t in TASKS for b in QUICK_BATCHES):
        (sgd,) = _runs(results, task, "SGD", batch)
        assert sgd["backward_passes"] == sgd["updates"] > 0
        for method in ONE_EVALUATION:
            (run,) = _runs(results, task, method, batch)
            assert (run["backward_passes"], run["updates"]) == (sgd["backward_passes"],
                                                                sgd["updates"])  # fmt: skip
        for method in GRADIENT_MODE:
            (run,) = _runs(results, task, method, batch)
            assert run["updates"] == sgd["updates"], (task, method, batch)
            assert run["backward_passes"] == 2 * sgd["backward_passes"], (task, method, batch)
            assert run["examples"] == 2 * sgd["examples"], (task, method, batch)
        for method in HALF_EPOCHS:
            (run,) = _runs(results, task, method, batch)
            assert 2 * run["updates"] == sgd["updates"], (task, method, batch)
            assert run["examples"] == sgd["examples"], (task, method, batch)


def test_every_method_lowers_the_training_loss_at_the_base_batch(
    quick_run: tuple[dict[str, Any], Path],
) -> None:
    results = quick_run[0]["json"]
    for task in TASKS:
        for method in METHODS:
            (run,) = _runs(results, task, method.name, str(BASE_BATCH))
            assert not run["diverged"], (task, method.name)
            assert run["train_loss"][-1] < 0.95 * run["train_loss"][0], (task, method.name, run)


def test_a_second_run_gives_the_same_numbers(
    quick_run: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    first = quick_run[0]["json"]["tasks"]["digits"]["methods"]
    second = _run(tmp_path, "--tasks", "digits")["json"]["tasks"]["digits"]["methods"]
    for method, record in first.items():
        again = second[method]
        assert again["selected"] == record["selected"], method
        for batch, runs in record["runs"].items():
            for run, rerun in zip(runs, again["runs"][batch], strict=True):
                for key in ("train_loss", "val_accuracy", "test_accuracy", "examples"):
                    assert rerun[key] == run[key], (method, batch, key)


def test_the_recipe_scales_warms_up_and_decays() -> None:
    total, base, scale = 200, 0.1, 8.0
    warmup = round(large_batch.WARMUP_FRACTION * total)
    assert step_size_at(0, total, base, scale, decay=True) == pytest.approx(base)
    assert step_size_at(warmup // 2, total, base, scale, decay=True) == pytest.approx(
        base + (base * scale - base) * (warmup // 2) / warmup
    )
    assert step_size_at(warmup, total, base, scale, decay=True) == pytest.approx(base * scale)
    assert step_size_at(99, total, base, scale, decay=True) == pytest.approx(base * scale)
    assert step_size_at(100, total, base, scale, decay=True) == pytest.approx(base * scale * 0.1)
    assert step_size_at(150, total, base, scale, decay=True) == pytest.approx(base * scale * 0.01)
    assert step_size_at(199, total, base, scale, decay=False) == pytest.approx(base * scale)
    assert {step_size_at(s, total, base, 1.0, decay=False) for s in range(total)} == {base}


def _run_record(val: list[float], test: list[float], diverged: bool = False) -> Run:
    return Run(
        train_loss=[2.3] * len(val), val_accuracy=val, test_accuracy=test, seconds=0.0,
        backward_passes=1, examples=1, updates=1, diverged=diverged,
    )  # fmt: skip


def test_the_selection_reads_the_validation_split_not_the_test_split() -> None:
    better_on_test = Candidate({"lr": 0.1}, _run_record([0.1, 0.5, 0.6], [0.1, 0.9, 0.95]))
    better_on_val = Candidate({"lr": 0.03}, _run_record([0.1, 0.7, 0.65], [0.1, 0.5, 0.55]))
    diverged = Candidate({"lr": 1.0}, _run_record([0.1, 0.9, 0.1], [0.1, 0.9, 0.1], True))
    assert select([better_on_test, better_on_val, diverged]) is better_on_val
    assert better_on_val.run.best_val_epoch == 1
    assert better_on_val.run.test_at_best_val == 0.5
