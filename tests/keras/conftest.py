"""Keras tests run once per backend (nox sessions tf, keras_jax, keras_torch)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras
import pytest

if keras.backend.backend() == "jax":
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 parity needs it on JAX


@pytest.fixture
def floatx():
    """Sets keras.config.floatx for one test and restores it."""
    previous = keras.config.floatx()

    def set_floatx(name: str) -> None:
        keras.config.set_floatx(name)

    yield set_floatx
    keras.config.set_floatx(previous)


@pytest.fixture
def dtype_policy():
    """Sets keras.config.dtype_policy for one test and restores it."""
    previous = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(previous)
