"""Stop, save (NumPy), resume in a new process: bitwise the uninterrupted run (float64)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from worker_scripts import import_script, run_script

WORKER = Path(__file__).with_name("resume_worker.py")


@pytest.mark.parametrize("case_name", ["standard_projected", "adjusted_projected", "sgd_capped"])
def test_resume_in_a_new_process_is_the_uninterrupted_run(case_name: str, tmp_path: Path) -> None:
    worker = import_script(WORKER)
    tx, params, state = worker.build(case_name)
    uninterrupted, _ = worker.run(tx, params, state, 0, worker.TOTAL)

    tx, params, state = worker.build(case_name)
    params, state = worker.run(tx, params, state, 0, worker.SPLIT)
    worker.save(params, state, str(tmp_path / "checkpoint.npz"))
    run_script(
        WORKER,
        case_name,
        tmp_path / "checkpoint.npz",
        tmp_path / "resumed.npz",
        env={"XLA_FLAGS": ""},  # one device is enough here
    )
    resumed = np.load(tmp_path / "resumed.npz")
    for i, expected in enumerate(uninterrupted):
        assert resumed[f"arr_{i}"].tobytes() == np.asarray(expected).tobytes(), f"parameter {i}"


def test_a_checkpoint_of_the_other_convention_is_refused_even_under_jit(tmp_path: Path) -> None:
    worker = import_script(WORKER)
    tx, params, state = worker.build("standard_projected")
    params, state = worker.run(tx, params, state, 0, 5)
    worker.save(params, state, str(tmp_path / "checkpoint.npz"))

    other, fresh, _ = worker.build("adjusted_projected", fresh=True)
    params, restored = worker.load(other, fresh, str(tmp_path / "checkpoint.npz"))
    grads = [np.ones_like(p) for p in params]
    with pytest.raises(ValueError, match="adjusted_momentum=False, and this alig has adjusted"):
        jax.jit(other.update)(grads, restored, params, value=1.0)
