"""Stop, save a .keras file, resume in a new process: bitwise the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from worker_scripts import import_script, run_script

WORKER = Path(__file__).with_name("resume_worker.py")


@pytest.fixture
def worker(floatx):
    floatx(keras.config.floatx())  # restored after the test: the worker sets float64
    return import_script(WORKER)


def test_resume_in_a_new_process_is_the_uninterrupted_run(worker, tmp_path: Path) -> None:
    uninterrupted = worker.build()
    worker.fit(uninterrupted, worker.EPOCHS)
    expected = worker.weights(uninterrupted)

    first = worker.build()
    worker.fit(first, worker.SPLIT)
    first.save(tmp_path / "model.keras")
    run_script(
        WORKER,
        tmp_path / "model.keras",
        tmp_path / "out.npz",
        env={"KERAS_BACKEND": keras.backend.backend()},
    )
    resumed = np.load(tmp_path / "out.npz")
    assert len(resumed.files) == len(expected)
    for i, value in enumerate(expected):
        assert resumed[f"arr_{i}"].tobytes() == value.tobytes(), f"weight {i}"


def test_weights_of_the_other_convention_are_refused(worker, tmp_path: Path) -> None:
    first = worker.build(adjusted=True)
    worker.fit(first, 1)
    first.save_weights(tmp_path / "model.weights.h5")

    other = worker.build(adjusted=False)
    other.optimizer.build(other.trainable_variables)
    with pytest.raises(ValueError, match="adjusted_momentum=True, and this AliG has adjusted"):
        other.load_weights(tmp_path / "model.weights.h5")
