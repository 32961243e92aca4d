"""Keras in the benchmarks (``benchmarks.frameworks``' shape): ``alig_tf.AliG``.

The parity run needs the TensorFlow backend; the step-time rows are in
``benchmarks._step_time_keras`` and ``benchmarks._step_time_keras_graph``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from alig_tf import AliG, AliGTrainStep, Extrapolation
from benchmarks._parity_runners import StepRecord, as_numpy, split_extrapolation
from benchmarks.long_run import (
    BATCH,
    FEATURES,
    MAX_LR,
    MOMENTUM,
    WARM_UP,
    Problem,
    Result,
    finish,
    rss_bytes,
)

__all__ = ["ParityRunner", "long_run", "step_time_rows", "step_time_rows_graph"]

StepTimeRows = tuple[str, dict[str, Callable[[], None]]]


class ParityRunner:
    """alig_tf.AliG on the TensorFlow backend, the training step under tf.function."""

    name = "keras"

    def __init__(self, weights: Sequence[np.ndarray], alig_kwargs: dict[str, Any], dtype: str):
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError("the keras parity runner needs KERAS_BACKEND=tensorflow")
        import tensorflow as tf

        alig_kwargs, extrapolation = split_extrapolation(alig_kwargs)
        self.variables = [keras.Variable(w, dtype=dtype) for w in weights]
        self.alig = AliG(**alig_kwargs)
        opt: Any = self.alig if extrapolation is None else Extrapolation(self.alig, **extrapolation)
        opt.build(self.variables)
        variables = self.variables

        @tf.function
        def train_step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                w1, b1, w2, b2 = (v.value for v in variables)
                logits = tf.tanh(x @ w1 + b1) @ w2 + b2
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                )
            grads = tape.gradient(loss, [v.value for v in variables])
            opt.apply(grads, variables, loss=loss)
            return loss

        self.train_step = train_step
        self.dtype = dtype

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord:
        loss = self.train_step(x.astype(self.dtype), y)
        buffers = [m.value.numpy() for m in self.alig.momentums] or None
        return StepRecord(
            float(loss),
            float(self.alig.gamma.value.numpy()),
            bool(self.alig.capped.value.numpy()),
            as_numpy([v.value.numpy() for v in self.variables]),
            None if buffers is None else as_numpy(buffers),
        )


def long_run(problem: Problem) -> Result:
    """The long run with ``alig_tf.AliG`` in ``model.fit`` (Keras' configured backend)."""

    class Linear(AliGTrainStep, keras.Sequential):
        pass

    model = Linear([keras.Input((FEATURES,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(problem.w0[:, None])
    model.compile(optimizer=AliG(max_lr=MAX_LR, momentum=MOMENTUM), loss=_half_mse)
    rows = problem.batches.reshape(-1)
    x, y = problem.x[rows], problem.y[rows, None]

    class Watch(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.gamma_min, self.gamma_max, self.any_nan, self.rss_warm = np.inf, -np.inf, False, 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            gamma = float(keras.ops.convert_to_numpy(model.optimizer.gamma.value))
            self.gamma_min, self.gamma_max = min(self.gamma_min, gamma), max(self.gamma_max, gamma)
            self.any_nan |= bool(np.isnan((logs or {}).get("loss", 0.0)))
            if batch + 1 == WARM_UP:
                self.rss_warm = rss_bytes()

    watch = Watch()
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[watch])
    w = keras.ops.convert_to_numpy(model.layers[0].kernel.value)[:, 0]
    watched = (watch.any_nan or bool(np.isnan(w).any()), watch.gamma_min, watch.gamma_max)
    return finish(f"keras ({keras.backend.backend()})", problem, watched, w, watch.rss_warm, start)


def _half_mse(y_true, y_pred):
    return 0.5 * keras.ops.mean(keras.ops.square(y_pred - y_true))


def step_time_rows(shapes: list[tuple[int, ...]]) -> StepTimeRows:
    """AliG against SGD under ``tf.function(jit_compile=True)`` (TensorFlow backend)."""
    from benchmarks._step_time_keras import candidates

    return candidates(shapes)


def step_time_rows_graph(shapes: list[tuple[int, ...]]) -> StepTimeRows:
    """The same under plain ``tf.function`` (no XLA)."""
    from benchmarks._step_time_keras_graph import candidates

    return candidates(shapes)
