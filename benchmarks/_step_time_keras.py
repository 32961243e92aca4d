"""Keras rows of step_time.py: AliG vs SGD(nesterov), both under tf.function(jit_compile=True).

A third row is a floor, not an optimizer: the SGD step followed by one read of every
gradient at the machine's memory bandwidth (a NumPy dot product of each with itself). An
ALI-G step must read all gradients once for the norm before it can update anything, and
then makes the same update as SGD (XLA's CPU backend has no multi-output fusion that would
make AliG's update cheaper than SGD's), so no XLA implementation of ALI-G can beat it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from alig_tf import AliG


def _stepper(
    optimizer: keras.optimizers.Optimizer,
    shapes: list[tuple[int, ...]],
    with_loss: bool,
    jit_compile: bool = True,
) -> Callable[[], None]:
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.standard_normal(s).astype("float32")) for s in shapes]
    grads = [tf.constant(1e-2 * rng.standard_normal(s).astype("float32")) for s in shapes]
    optimizer.build(variables)
    loss = tf.constant(1.0)

    @tf.function(jit_compile=jit_compile)
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
    sgd = _stepper(
        keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True), shapes, False
    )
    rows = {
        baseline: sgd,
        "alig_tf.AliG momentum=0.9 (XLA)": _stepper(AliG(max_lr=0.1, momentum=0.9), shapes, True),
        "floor: SGD + one read of the gradients": _sgd_then_read(sgd, shapes),
    }
    return baseline, rows


def _sgd_then_read(sgd: Callable[[], None], shapes: list[tuple[int, ...]]) -> Callable[[], None]:
    """The SGD step, then every gradient read once at memory speed (see the module doc)."""
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(math.prod(s)).astype("float32") for s in shapes]

    def run() -> None:
        sgd()
        for g in grads:
            np.dot(g, g)

    return run
