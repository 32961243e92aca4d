"""Keras rows of step_time.py: AliG vs SGD(nesterov), both under tf.function(jit_compile=True)."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from alig_tf import AliG


def _stepper(
    optimizer: keras.optimizers.Optimizer, shapes: list[tuple[int, ...]], with_loss: bool
) -> Callable[[], None]:
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.standard_normal(s).astype("float32")) for s in shapes]
    grads = [tf.constant(1e-2 * rng.standard_normal(s).astype("float32")) for s in shapes]
    optimizer.build(variables)
    loss = tf.constant(1.0)

    @tf.function(jit_compile=True)
    def step() -> None:
        if with_loss:
            optimizer.apply(grads, variables, loss=loss)
        else:
            optimizer.apply(grads, variables)

    def run() -> None:
        step()
        variables[0].value.numpy()  # block until the step is done

    for _ in range(3):  # trace, compile, warm up
        run()
    return run


def candidates(shapes: list[tuple[int, ...]]) -> tuple[str, dict[str, Callable[[], None]]]:
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("the Keras rows run on the TensorFlow backend: KERAS_BACKEND=tensorflow")
    baseline = "keras SGD nesterov momentum=0.9 (XLA)"
    rows = {
        baseline: _stepper(
            keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True), shapes, False
        ),
        "alig_tf.AliG momentum=0.9 (XLA)": _stepper(AliG(max_lr=0.1, momentum=0.9), shapes, True),
    }
    return baseline, rows
