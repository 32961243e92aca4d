"""Stop, save a .keras file, resume in a new process: bitwise the uninterrupted run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

WORKER = Path(__file__).with_name("resume_worker.py")


def _worker():
    spec = importlib.util.spec_from_file_location("keras_resume_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def worker(floatx):
    floatx(keras.config.floatx())  # restored after the test: the worker sets float64
    return _worker()


def test_resume_in_a_new_process_is_the_uninterrupted_run(worker, tmp_path: Path) -> None:
    uninterrupted = worker.build()
    worker.fit(uninterrupted, worker.EPOCHS)
    expected = worker.weights(uninterrupted)

    first = worker.build()
    worker.fit(first, worker.SPLIT)
    first.save(tmp_path / "model.keras")
    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "model.keras"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
    )
    assert result.returncode == 0, result.stderr[-3000:]
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
