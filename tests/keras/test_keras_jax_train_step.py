"""alig_tf's JAX train step is a copy of Keras' private ``JAXTrainer.train_step``: guarded.

``alig_tf._train_step._jax_train_step`` repeats Keras' JAX train step with one change (the
unscaled loss handed to ``stateless_apply``). Keras may change its own at any release;
the first test then fails and says what to do. It only reads source, so it runs on every
backend (it needs JAX installed, for the module to import). The second checks, on the JAX
backend, that the copy still does what Keras' step does for an optimizer that takes no
loss.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest

from alig_tf import AliGTrainStep

KERAS_JAX_TRAIN_STEP_SHA256 = "4357f27c06a1d806b1a71eb80865d2383ef345263f5b14bb8cb072c3ad29c7ca"
"""The hash of Keras 3.15's ``JAXTrainer.train_step``, as :func:`_normalized_hash` takes it."""


def _normalized_hash(function: Callable[..., Any]) -> str:
    """SHA-256 of the function's source as ``ast.unparse`` writes it back.

    So a reformatting or a comment does not count, and every change of the code does.
    """
    source = textwrap.dedent(inspect.getsource(function))
    return hashlib.sha256(ast.unparse(ast.parse(source)).encode()).hexdigest()


def test_keras_jax_train_step_is_the_one_alig_tf_copies() -> None:
    pytest.importorskip("jax", reason="Keras' JAX trainer module imports jax")
    from keras.src.backend.jax.trainer import JAXTrainer

    found = _normalized_hash(JAXTrainer.train_step)
    assert found == KERAS_JAX_TRAIN_STEP_SHA256, (
        f"keras.src.backend.jax.trainer.JAXTrainer.train_step changed (Keras "
        f"{keras.__version__}): its normalized source hash is {found}, recorded "
        f"{KERAS_JAX_TRAIN_STEP_SHA256}. alig_tf/_train_step.py::_jax_train_step is a copy "
        "of it with one change (the unscaled loss passed to optimizer.stateless_apply(..., "
        "loss=unscaled_loss)). Re-derive _jax_train_step from the new source, keeping that "
        "one change, run the Keras tests on the JAX backend, then record the new hash in "
        "KERAS_JAX_TRAIN_STEP_SHA256 (tests/keras/test_keras_jax_train_step.py)."
    )


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the JAX trainer's train step")
def test_the_copied_train_step_equals_keras_for_an_optimizer_without_loss() -> None:
    """With SGD (no loss taken) the mixin's train step is Keras' own: same weights, logs."""

    class WithMixin(AliGTrainStep, keras.Sequential):
        pass

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 5))
    y = rng.standard_normal((32, 2))
    results = []
    for cls in (keras.Sequential, WithMixin):
        keras.utils.set_random_seed(0)
        model = cls([keras.Input((5,)), keras.layers.Dense(4, "tanh"), keras.layers.Dense(2)])
        sgd = keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True)
        model.compile(optimizer=sgd, loss="mse", metrics=["mae"])
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append((model.get_weights(), history.history))
    (plain_weights, plain_logs), (mixin_weights, mixin_logs) = results
    assert plain_logs == mixin_logs
    assert plain_logs["loss"][1] < plain_logs["loss"][0]  # it trained
    for plain, mixin in zip(plain_weights, mixin_weights, strict=True):
        np.testing.assert_array_equal(mixin, plain)
