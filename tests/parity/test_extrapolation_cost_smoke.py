"""Smoke run of the extrapolation-cost benchmark: ``python -m benchmarks.extrapolation_cost``.

Runs the module as a user would (a subprocess, 3 timed rounds, torch, JAX and Keras on
TensorFlow) and checks its tables, never its timings: every framework prints its eight
rows (two bases, each base's floor, ``"past"`` and ``"gradient"`` around each), each row
divided by its own base (the bases at 1.00x, by the median and by the 10th percentile),
the targets on the wrapper rows, and that every row trained: its last loss is finite and
below that of a uniform guess over the 10 classes (ln 10; the Glorot start is near it).
"""

from __future__ import annotations

import math
import re

import pytest

from benchmark_runs import run_benchmark

FRAMEWORKS = ("torch", "jax", "keras")
ROW = re.compile(
    r"^(?P<name>\S.*?)\s+(?P<ms>\d+\.\d+)\s+(?P<ratio>\d+\.\d+)x\s+(?P<low_ms>\d+\.\d+)\s+"
    r"(?P<low_ratio>\d+\.\d+)x\s+(?:(?P<target>\d\.\d)x\s+)?(?P<loss>\S+)$"
)


@pytest.fixture(scope="module")
def tables() -> dict[str, list[re.Match[str]]]:
    stdout = run_benchmark(
        "extrapolation_cost", "--frameworks", ",".join(FRAMEWORKS), "--rounds", "3"
    ).stdout
    found: dict[str, list[re.Match[str]]] = {}
    current: list[re.Match[str]] | None = None
    for line in stdout.splitlines():
        framework = line.split(":", 1)[0]
        if framework in FRAMEWORKS:
            current = found.setdefault(framework, [])
        elif line.startswith("row ") or not line.strip():
            continue
        elif current is not None and (match := ROW.match(line)):
            current.append(match)
    return found


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_framework_prints_its_rows_against_its_own_base(
    tables: dict[str, list[re.Match[str]]], framework: str
) -> None:
    rows = tables[framework]
    assert len(rows) == 8, [row.group(0) for row in rows]
    bases = rows[0::4]
    assert [(row["ratio"], row["low_ratio"]) for row in bases] == [("1.00", "1.00")] * 2
    floors = [row["name"] for row in rows[1::4]]
    assert all(name.startswith("floor: ") for name in floors), floors
    wrappers = rows[2::4] + rows[3::4]
    assert sorted(row["target"] for row in wrappers) == ["1.3", "1.3", "2.3", "2.3"]
    assert all(row["target"] is None for row in bases + rows[1::4])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_row_trained(tables: dict[str, list[re.Match[str]]], framework: str) -> None:
    for row in tables[framework]:
        loss = float(row["loss"])
        assert math.isfinite(loss), row.group(0)
        assert loss < math.log(10), row.group(0)
