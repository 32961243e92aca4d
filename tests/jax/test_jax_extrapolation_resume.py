"""Stop, save the leaves (NumPy .npz), resume in a new process: bitwise the uninterrupted run.

The cut falls where the params hold w~ (the stored anchor in use), in every mode; the
checkpoint holds the anchor, the phase, the counters, the noise key and the base's state.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jax_checkpoints import assert_bitwise_equal, leaves, resume_in_a_new_process
from worker_scripts import import_script

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
    uninterrupted = leaves(*worker.run(tx, params, state, worker.problem_at(0), 0, worker.TOTAL))

    tx, params, state = worker.build(case_name)
    params, state = worker.run(tx, params, state, worker.problem_at(0), 0, worker.SPLIT)
    assert int(state.phase) == 1  # the params hold w~: the anchor comes from the checkpoint
    assert int(state.skipped) >= 1
    resumed = resume_in_a_new_process(WORKER, case_name, params, state, tmp_path)
    assert_bitwise_equal(resumed, uninterrupted)
