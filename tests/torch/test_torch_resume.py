"""Stop, save, resume in a new process: bitwise the uninterrupted run (float64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker_scripts import import_script, run_script

WORKER = Path(__file__).with_name("resume_worker.py")


@pytest.mark.parametrize("case_name", ["standard_projected", "adjusted_projected", "sgd_capped"])
def test_resume_in_a_new_process_is_the_uninterrupted_run(case_name: str, tmp_path: Path) -> None:
    worker = import_script(WORKER)
    params, opt = worker.build(case_name)
    worker.run(params, opt, 0, worker.TOTAL)
    uninterrupted = [p.detach().numpy() for p in params]

    params, opt = worker.build(case_name)
    worker.run(params, opt, 0, worker.SPLIT)
    worker.save(params, opt, str(tmp_path / "checkpoint.pt"))
    run_script(WORKER, case_name, tmp_path / "checkpoint.pt", tmp_path / "resumed.npz")
    resumed = np.load(tmp_path / "resumed.npz")
    for i, expected in enumerate(uninterrupted):
        assert resumed[f"arr_{i}"].tobytes() == expected.tobytes(), f"parameter {i}"
