"""Stop, save (NumPy), resume in a new process: bitwise the uninterrupted run (float64), the
parameters and the state."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from jax_checkpoints import assert_bitwise_equal, leaves, load, resume_in_a_new_process, save
from worker_scripts import import_script

WORKER = Path(__file__).with_name("resume_worker.py")


@pytest.mark.parametrize("case_name", ["standard_projected", "adjusted_projected", "sgd_capped"])
def test_resume_in_a_new_process_is_the_uninterrupted_run(case_name: str, tmp_path: Path) -> None:
    """The parameters and every leaf of the state, bit for bit."""
    worker = import_script(WORKER)
    tx, params, state = worker.build(case_name)
    uninterrupted = leaves(*worker.run(tx, params, state, 0, worker.TOTAL))

    tx, params, state = worker.build(case_name)
    params, state = worker.run(tx, params, state, 0, worker.SPLIT)
    resumed = resume_in_a_new_process(WORKER, case_name, params, state, tmp_path)
    assert_bitwise_equal(resumed, uninterrupted)


def test_a_checkpoint_of_the_other_convention_is_refused_even_under_jit(tmp_path: Path) -> None:
    worker = import_script(WORKER)
    tx, params, state = worker.build("standard_projected")
    params, state = worker.run(tx, params, state, 0, 5)
    save(params, state, tmp_path / "checkpoint.npz")

    other, fresh, _ = worker.build("adjusted_projected", fresh=True)
    params, restored = load(other, fresh, tmp_path / "checkpoint.npz")
    grads = [np.ones_like(p) for p in params]
    with pytest.raises(ValueError, match="adjusted_momentum=False, and this alig has adjusted"):
        jax.jit(other.update)(grads, restored, params, value=1.0)
