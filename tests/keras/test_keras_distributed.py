"""tf.distribute: model.fit under MirroredStrategy on 2 CPUs equals the single-device run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

WORKER = Path(__file__).with_name("mirrored_worker.py")


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute exists on TensorFlow only"
)
def test_mirrored_strategy_on_two_replicas_equals_one_device(tmp_path: Path) -> None:
    runs = {}
    for mode in ("single", "mirrored"):
        out = tmp_path / f"{mode}.npz"
        result = subprocess.run(
            [sys.executable, str(WORKER), str(out), mode],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mode] = np.load(out)
    single, mirrored = runs["single"], runs["mirrored"]
    assert int(single["replicas"]) == 1
    assert int(mirrored["replicas"]) == 2
    assert int(mirrored["taken"]) == int(single["taken"]) == len(single["gammas"])
    assert len(set(single["gammas"].tolist())) > 2  # gamma moves: the loss matters
    np.testing.assert_allclose(mirrored["gammas"], single["gammas"], rtol=1e-10)
    weights = [k for k in single.files if k.startswith("w")]
    scale = max(float(np.max(np.abs(single[k]))) for k in weights)
    worst = max(float(np.max(np.abs(mirrored[k] - single[k]))) for k in weights)
    assert worst / scale <= 1e-10
