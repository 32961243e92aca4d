"""Keras rows of step_time.py without XLA: AliG vs SGD(nesterov) under plain tf.function.

What a custom training loop gets by default (``tf.function`` without ``jit_compile``), and
``model.fit`` with ``jit_compile=False``: each operation is its own TensorFlow kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from alig_tf import AliG
from benchmarks._step_time_keras import _stepper


def candidates(shapes: list[tuple[int, ...]]) -> tuple[str, dict[str, Callable[[], None]]]:
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("the Keras rows run on the TensorFlow backend: KERAS_BACKEND=tensorflow")
    baseline = "keras SGD nesterov momentum=0.9 (graph)"
    sgd = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True)
    rows = {
        baseline: _stepper(sgd, shapes, False, jit_compile=False),
        "alig_tf.AliG momentum=0.9 (graph)": _stepper(
            AliG(max_lr=0.1, momentum=0.9), shapes, True, jit_compile=False
        ),
    }
    return baseline, rows
