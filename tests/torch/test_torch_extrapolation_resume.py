"""Extrapolation: stop, save, resume in a new process: bitwise the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker_scripts import import_script, run_script

WORKER = Path(__file__).with_name("extrapolation_worker.py")

RESUMED = [
    # cut between the two calls of an iteration: the parameters hold w~, the anchor is saved
    "gradient-alig_adjusted_projected-alternating",
    # the anchor and w~ after every update; lr_x is ALI-G's previous gamma
    "past-alig_standard-same_batch",
    # the noise continues from the iteration count (the generator's position)
    "noise-sgd_nesterov-alternating",
    # the lr_x schedule's argument continues
    "gradient-sgd_nesterov-same_batch-schedule",
]


@pytest.mark.parametrize("case_name", RESUMED)
def test_resume_in_a_new_process_is_the_uninterrupted_run(case_name: str, tmp_path: Path) -> None:
    worker = import_script(WORKER)
    case = worker.find_case(case_name)
    uninterrupted = worker.TorchRun(case)
    uninterrupted.run(0, worker.TOTAL)
    expected = uninterrupted.arrays()

    first = worker.TorchRun(case)
    first.run(0, worker.SPLIT)
    if case.mode != "gradient" or case.call_form == "alternating":
        assert first.opt.is_extrapolated  # the cut falls where the parameters hold w~
    assert first.opt.iterations_skipped > 0  # skips before the cut are carried over too
    first.save(str(tmp_path / "checkpoint.pt"))
    run_script(WORKER, case_name, tmp_path / "checkpoint.pt", tmp_path / "resumed.npz")
    resumed = np.load(tmp_path / "resumed.npz")
    assert sorted(resumed.files) == sorted(expected)
    for key, value in expected.items():
        assert resumed[key].tobytes() == value.tobytes(), key
    assert expected["counters"][1] > first.opt.iteration  # the resumed run did go on
