"""Checkpoint and resume in a new process (run by test_keras_resume.py).

Usage: python resume_worker.py MODEL.keras OUT. Loads the model saved with ``model.save``
(architecture, weights, the AliG optimizer and its variables), trains it for the
remaining epochs of ``model.fit`` on the same data and writes its weights to OUT (.npz).
The Keras backend comes from KERAS_BACKEND, as in the test process.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras
import numpy as np

if keras.backend.backend() == "jax":
    import jax

    jax.config.update("jax_enable_x64", True)

from alig_tf import AliG, AliGTrainStep

EPOCHS, SPLIT = 6, 2
BATCH = 8


@keras.saving.register_keras_serializable(package="alig_tests")
class ResumeRegressor(AliGTrainStep, keras.Sequential):
    """A Sequential model that hands the loss to AliG on every backend."""


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 5)).astype(np.float32).astype(np.float64)
    y = rng.standard_normal((48, 2)).astype(np.float32).astype(np.float64)
    return x, y


def build(adjusted: bool = False) -> keras.Model:
    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(0)
    model = ResumeRegressor(
        [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)]
    )
    model.compile(
        optimizer=AliG(max_lr=0.5, momentum=0.9, adjusted_momentum=adjusted, max_norm=4.0),
        loss="mse",
    )
    return model


def fit(model: keras.Model, epochs: int) -> None:
    x, y = data()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)


def weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.trainable_variables]


if __name__ == "__main__":
    path, out = sys.argv[1:]
    keras.config.set_floatx("float64")
    model = keras.saving.load_model(path)
    fit(model, EPOCHS - SPLIT)
    np.savez(out, *weights(model))
