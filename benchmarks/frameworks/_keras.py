"""Keras in the benchmarks (``benchmarks.frameworks``' shape): ``alig_tf.AliG``.

The parity run and the step-time rows need the TensorFlow backend. The step-time rows
time AliG against SGD(nesterov) under ``tf.function``, with XLA (``jit_compile=True``) and
without (what a custom loop gets by default, and ``model.fit(jit_compile=False)``: each
operation its own TensorFlow kernel). With XLA a third row is a floor, not an optimizer:
the SGD step followed by one read of every gradient at the machine's memory bandwidth (a
NumPy dot product of each with itself). An ALI-G step must read all gradients once for
the norm before it can update anything, and then makes the same update as SGD (XLA's CPU
backend has no multi-output fusion that would make AliG's update cheaper than SGD's), so
no XLA implementation of ALI-G can beat it.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from alig_tf import AliG, AliGTrainStep, Extrapolation
from benchmarks import extrapolation_cost as cost
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

__all__ = [
    "ParityRunner",
    "extrapolation_cost_rows",
    "long_run",
    "step_time_rows",
    "step_time_rows_graph",
]

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


def _stepper(
    optimizer: keras.optimizers.Optimizer,
    shapes: list[tuple[int, ...]],
    with_loss: bool,
    jit_compile: bool = True,
) -> Callable[[], None]:
    """One blocking step of ``optimizer`` on fixed random gradients, traced and warmed up."""
    import tensorflow as tf

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


def _sgd_then_read(sgd: Callable[[], None], shapes: list[tuple[int, ...]]) -> Callable[[], None]:
    """The SGD step, then every gradient read once at memory speed (see the module doc)."""
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(math.prod(s)).astype("float32") for s in shapes]

    def run() -> None:
        sgd()
        for g in grads:
            np.dot(g, g)

    return run


def _check_backend() -> None:
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("the Keras rows run on the TensorFlow backend: KERAS_BACKEND=tensorflow")


def _nesterov_sgd() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True)


def step_time_rows(shapes: list[tuple[int, ...]]) -> StepTimeRows:
    """AliG against SGD under ``tf.function(jit_compile=True)``, and the floor."""
    _check_backend()
    baseline = "keras SGD nesterov momentum=0.9 (XLA)"
    sgd = _stepper(_nesterov_sgd(), shapes, False)
    rows = {
        baseline: sgd,
        "alig_tf.AliG momentum=0.9 (XLA)": _stepper(AliG(max_lr=0.1, momentum=0.9), shapes, True),
        "floor: SGD + one read of the gradients": _sgd_then_read(sgd, shapes),
    }
    return baseline, rows


def step_time_rows_graph(shapes: list[tuple[int, ...]]) -> StepTimeRows:
    """The same under plain ``tf.function`` (no XLA), without the floor."""
    _check_backend()
    baseline = "keras SGD nesterov momentum=0.9 (graph)"
    rows = {
        baseline: _stepper(_nesterov_sgd(), shapes, False, jit_compile=False),
        "alig_tf.AliG momentum=0.9 (graph)": _stepper(
            AliG(max_lr=0.1, momentum=0.9), shapes, True, jit_compile=False
        ),
    }
    return baseline, rows


def _cost_row(
    problem: cost.CostProblem,
    name: str,
    base: str,
    mode: str | None,
    optimizer: keras.optimizers.Optimizer,
    calls: int,
) -> tuple[cost.CostRow, Any]:
    """``calls`` x ``model.train_on_batch`` (Keras' compiled train step, what ``fit`` runs
    per batch) per iteration, each on the next minibatch; the row and the model's
    ``jit_compile``."""

    class MLP(AliGTrainStep, keras.Sequential):  # the mixin: AliG's loss on the JAX backend
        pass

    w1, b1, w2, b2 = problem.weights
    model = MLP(
        [
            keras.Input((w1.shape[0],)),
            keras.layers.Dense(w1.shape[1], activation="relu"),
            keras.layers.Dense(w2.shape[1]),
        ]
    )
    model.set_weights([w1, b1, w2, b2])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    xs, ys = list(problem.x), list(problem.y)
    batches = itertools.cycle(range(len(xs)))
    last = [0.0]

    def run() -> None:
        for _ in range(calls):
            i = next(batches)
            last[0] = model.train_on_batch(xs[i], ys[i])  # returns numpy: blocks

    row = cost.CostRow(name, base, mode, run, lambda: float(last[0]))
    return row, model.jit_compile


def extrapolation_cost_rows(problem: cost.CostProblem) -> tuple[str, list[cost.CostRow]]:
    """The rows of ``benchmarks.extrapolation_cost``: ``train_on_batch``, Keras' backend.

    ``"gradient"`` mode alternates (one evaluation per call, as in ``fit``), so its
    iteration is two calls on two minibatches; its floor: two calls of the bare base.
    """
    backend = keras.backend.backend()
    threads = ""
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        threads = (
            f"tensorflow {tf.__version__}, intra_op threads "
            f"{tf.config.threading.get_intra_op_parallelism_threads()}, inter_op "
            f"{tf.config.threading.get_inter_op_parallelism_threads()}"
        )
    elif backend == "jax":
        import jax

        threads = f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"

    def alig() -> keras.optimizers.Optimizer:
        return AliG(max_lr=cost.LR, momentum=cost.MOMENTUM)

    built = []
    for base, short, make_base in (
        ("keras SGD nesterov", "SGD", _nesterov_sgd),
        ("alig_tf.AliG", "AliG", alig),
    ):
        built.append(_cost_row(problem, base, base, None, make_base(), 1))
        floor = f"floor: {short}, 2 steps"
        built.append(_cost_row(problem, floor, base, "floor", make_base(), 2))
        for mode, calls in (("past", 1), ("gradient", 2)):
            name = f"Extrapolation({short}, {mode!r}) {calls} step{'s' * (calls > 1)}"
            optimizer = Extrapolation(make_base(), mode=mode)
            built.append(_cost_row(problem, name, base, mode, optimizer, calls))
    rows = [row for row, _ in built]
    jit = "/".join(sorted({str(jit_compile) for _, jit_compile in built}))
    info = f"keras {keras.__version__} on {backend} (train_on_batch, jit_compile={jit}); {threads}"
    return info, rows
