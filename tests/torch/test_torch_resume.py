"""Stop, save, resume in a new process: bitwise the uninterrupted run (float64)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("resume_worker.py")
SUPPORT = Path(__file__).parents[1] / "support"


def _worker():
    spec = importlib.util.spec_from_file_location("torch_resume_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case_name", ["standard_projected", "adjusted_projected", "sgd_capped"])
def test_resume_in_a_new_process_is_the_uninterrupted_run(case_name: str, tmp_path: Path) -> None:
    worker = _worker()
    params, opt = worker.build(case_name)
    worker.run(params, opt, 0, worker.TOTAL)
    uninterrupted = [p.detach().numpy() for p in params]

    params, opt = worker.build(case_name)
    worker.run(params, opt, 0, worker.SPLIT)
    worker.save(params, opt, str(tmp_path / "checkpoint.pt"))
    result = subprocess.run(
        [sys.executable, str(WORKER), case_name, str(tmp_path / "checkpoint.pt"),
         str(tmp_path / "resumed.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SUPPORT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = np.load(tmp_path / "resumed.npz")
    for i, expected in enumerate(uninterrupted):
        assert resumed[f"arr_{i}"].tobytes() == expected.tobytes(), f"parameter {i}"
