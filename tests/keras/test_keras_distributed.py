"""Data parallel Keras equals the single-device run: tf.distribute's MirroredStrategy on 2
CPUs (TensorFlow backend), keras.distribution.DataParallel on 2 devices (JAX backend)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from worker_scripts import run_script

WORKER = Path(__file__).with_name("mirrored_worker.py")
DATA_PARALLEL_WORKER = Path(__file__).with_name("data_parallel_worker.py")


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute exists on TensorFlow only"
)
@pytest.mark.parametrize("merge_before_the_step", [False, True])
def test_mirrored_strategy_on_two_replicas_equals_one_device(
    merge_before_the_step: bool, tmp_path: Path
) -> None:
    """With a merge call between scale_loss and the step (``mirrored_merge``) the replicas
    take turns there: a loss slot shared by the replicas' threads gave the step another
    replica's loss, or none."""
    runs = {}
    for mode in ("single", "mirrored_merge" if merge_before_the_step else "mirrored"):
        out = tmp_path / f"{mode}.npz"
        run_script(WORKER, out, mode)
        runs[mode.split("_")[0]] = np.load(out)
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


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution runs on the JAX backend"
)
def test_data_parallel_on_two_jax_devices_equals_one_device(tmp_path: Path) -> None:
    run_script(DATA_PARALLEL_WORKER, tmp_path / "runs.npz")
    runs = np.load(tmp_path / "runs.npz")
    assert int(runs["single_devices"]) == 1
    assert int(runs["parallel_devices"]) == 2  # the batches really were sharded
    single_gammas = runs["single_gammas"]
    assert len(set(single_gammas.tolist())) > 2  # gamma moves: the loss matters
    np.testing.assert_allclose(runs["parallel_gammas"], single_gammas, rtol=1e-10)
    weights = [k[len("single_") :] for k in runs.files if k.startswith("single_w")]
    scale = max(float(np.max(np.abs(runs[f"single_{k}"]))) for k in weights)
    worst = max(float(np.max(np.abs(runs[f"parallel_{k}"] - runs[f"single_{k}"]))) for k in weights)
    assert worst / scale <= 1e-10
