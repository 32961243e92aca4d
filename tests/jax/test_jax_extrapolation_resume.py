"""Stop, save the leaves (NumPy .npz), resume in a new process: bitwise the uninterrupted run.

The cut falls where the params hold w~ (the stored anchor in use), in every mode; the
checkpoint holds the anchor, the phase, the counters, the noise key and the base's state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker_scripts import import_script, run_script

WORKER = Path(__file__).with_name("extrapolation_worker.py")


@pytest.mark.parametrize(
    "case_name",
    [
        "gradient-alig_adjusted_projected-alternating",
        "past-sgd_nesterov-alternating",  # the learning rate read from inject_hyperparams
        "past-alig_standard_projected-alternating-schedule",
        "noise-alig_standard-alternating",  # the key in the state
    ],
)
def test_resume_in_a_new_process_is_the_uninterrupted_run(case_name: str, tmp_path: Path) -> None:
    worker = import_script(WORKER)
    tx, params, state = worker.build(case_name)
    uninterrupted = worker.run(tx, params, state, worker.problem_at(0), 0, worker.TOTAL)
    worker.save(*uninterrupted, str(tmp_path / "uninterrupted.npz"))

    tx, params, state = worker.build(case_name)
    params, state = worker.run(tx, params, state, worker.problem_at(0), 0, worker.SPLIT)
    assert int(state.phase) == 1  # the params hold w~: the anchor comes from the checkpoint
    assert int(state.skipped) >= 1
    worker.save(params, state, str(tmp_path / "checkpoint.npz"))
    run_script(
        WORKER,
        case_name,
        tmp_path / "checkpoint.npz",
        tmp_path / "resumed.npz",
        env={"XLA_FLAGS": ""},  # one device is enough here
    )
    expected, resumed = np.load(tmp_path / "uninterrupted.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(resumed.files) == sorted(expected.files)
    for name in expected.files:
        assert resumed[name].dtype == expected[name].dtype, name
        assert resumed[name].tobytes() == expected[name].tobytes(), name
