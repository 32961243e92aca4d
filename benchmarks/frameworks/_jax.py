"""JAX in the benchmarks (``benchmarks.frameworks``' shape): ``alig_jax.alig`` under ``jax.jit``."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alig_jax import AliGState, alig, extrapolation
from benchmarks import extrapolation_cost as cost
from benchmarks._parity_runners import StepRecord, as_numpy, split_extrapolation
from benchmarks.long_run import MAX_LR, MOMENTUM, WARM_UP, Problem, Result, finish, rss_bytes

__all__ = ["ParityRunner", "extrapolation_cost_rows", "long_run", "step_time_rows"]


class ParityRunner:
    """alig_jax.alig, the whole training step under jax.jit."""

    name = "jax"

    def __init__(self, weights: Sequence[np.ndarray], alig_kwargs: dict[str, Any], dtype: str):
        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        alig_kwargs, extrapolation_kwargs = split_extrapolation(alig_kwargs)
        tx = alig(**alig_kwargs)
        if extrapolation_kwargs is not None:
            tx = extrapolation(tx, **extrapolation_kwargs)
        self.alig_state_of: Callable[[Any], AliGState] = (
            (lambda state: state) if extrapolation_kwargs is None else _base_state
        )
        self.params = [jnp.asarray(w, dtype=dtype) for w in weights]
        self.state = tx.init(self.params)

        def loss_fn(params: list[Any], x: Any, y: Any) -> Any:
            w1, b1, w2, b2 = params
            logits = jnp.tanh(x @ w1 + b1) @ w2 + b2
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        @jax.jit
        def train_step(params: list[Any], state: Any, x: Any, y: Any) -> Any:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params, value=loss)
            return optax.apply_updates(params, updates), state, loss

        self.train_step = train_step
        self.dtype = dtype

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord:
        self.params, self.state, loss = self.train_step(
            self.params, self.state, x.astype(self.dtype), y
        )
        alig_state = self.alig_state_of(self.state)
        buffers = (
            None if alig_state.momentum_buffer is None else as_numpy(alig_state.momentum_buffer)
        )
        return StepRecord(
            float(loss),
            float(alig_state.gamma),
            bool(alig_state.capped),
            as_numpy(self.params),
            buffers,
        )


def _base_state(state: Any) -> Any:
    """ALI-G's state inside an ``alig_jax.extrapolation`` state."""
    return state.base_state


def long_run(problem: Problem) -> Result:
    """The long run with ``alig_jax.alig``, the step under ``jax.jit``."""
    tx = alig(max_lr=MAX_LR, momentum=MOMENTUM)
    x, y = jnp.asarray(problem.x), jnp.asarray(problem.y)

    def loss_fn(w: jax.Array, rows: jax.Array) -> jax.Array:
        return 0.5 * jnp.mean((x[rows] @ w - y[rows]) ** 2)

    @jax.jit
    def train_step(carry, rows):
        w, state, gamma_min, gamma_max, any_nan = carry
        loss, grad = jax.value_and_grad(loss_fn)(w, rows)
        updates, state = tx.update(grad, state, w, value=loss)
        w = optax.apply_updates(w, updates)
        any_nan = any_nan | jnp.isnan(loss) | jnp.isnan(w).any()
        return (
            w,
            state,
            jnp.minimum(gamma_min, state.gamma),
            jnp.maximum(gamma_max, state.gamma),
            any_nan,
        )

    w = jnp.asarray(problem.w0)
    carry = (w, tx.init(w), jnp.inf, -jnp.inf, jnp.zeros((), bool))
    batches = jnp.asarray(problem.batches)
    start, rss_warm = time.perf_counter(), 0
    for t in range(len(problem.batches)):
        carry = train_step(carry, batches[t])
        if t + 1 == WARM_UP:
            jax.block_until_ready(carry)
            rss_warm = rss_bytes()
    w, _, gamma_min, gamma_max, any_nan = jax.block_until_ready(carry)
    return finish("jax", problem, (any_nan, gamma_min, gamma_max), np.asarray(w), rss_warm, start)


def _stepper(
    tx: optax.GradientTransformationExtraArgs, shapes: list[tuple[int, ...]]
) -> Callable[[], None]:
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(shapes))
    params = [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys[::2], shapes, strict=True)]
    grads = [
        1e-2 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys[1::2], shapes, strict=True)
    ]
    loss = jnp.asarray(1.0, jnp.float32)

    @jax.jit
    def step(params, state):  # the same function for every row: update + apply
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    carry = [params, tx.init(params)]

    def run() -> None:
        carry[0], carry[1] = step(carry[0], carry[1])
        jax.block_until_ready(carry[0])

    for _ in range(3):  # compile and warm up
        run()
    return run


def step_time_rows(shapes: list[tuple[int, ...]]) -> tuple[str, dict[str, Callable[[], None]]]:
    baseline = "optax.sgd nesterov momentum=0.9"
    rows = {
        baseline: _stepper(
            optax.with_extra_args_support(optax.sgd(0.1, momentum=0.9, nesterov=True)), shapes
        ),
        "alig_jax.alig momentum=0.9": _stepper(alig(max_lr=0.1, momentum=0.9), shapes),
        "optax.polyak_sgd": _stepper(optax.polyak_sgd(max_learning_rate=0.1), shapes),
    }
    return baseline, rows


def _cost_row(
    problem: cost.CostProblem,
    name: str,
    base: str,
    mode: str | None,
    tx: optax.GradientTransformation,
    takes_value: bool,
    calls: int,
) -> cost.CostRow:
    """``calls`` jitted train steps (value_and_grad, update, apply) per iteration, each on
    the next minibatch."""

    def loss_fn(params: list[jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
        w1, b1, w2, b2 = params
        logits = jax.nn.relu(x @ w1 + b1) @ w2 + b2
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params: list[jax.Array], state: Any, x: jax.Array, y: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        if takes_value:
            updates, state = tx.update(grads, state, params, value=loss)
        else:
            updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    xs = [jnp.asarray(x) for x in problem.x]
    ys = [jnp.asarray(y) for y in problem.y]
    params = [jnp.asarray(w) for w in problem.weights]
    carry: list[Any] = [params, tx.init(params), jnp.zeros(())]
    batches = itertools.cycle(range(len(xs)))

    def run() -> None:
        for _ in range(calls):
            i = next(batches)
            carry[0], carry[1], carry[2] = train_step(carry[0], carry[1], xs[i], ys[i])
        jax.block_until_ready(carry)

    return cost.CostRow(name, base, mode, run, lambda: float(carry[2]))


def extrapolation_cost_rows(problem: cost.CostProblem) -> tuple[str, list[cost.CostRow]]:
    """The rows of ``benchmarks.extrapolation_cost``: each call one ``jax.jit`` train step.

    ``"gradient"`` mode alternates (one evaluation per call), so its iteration is two calls
    on two minibatches, as a loop makes them; its floor: two calls of the bare base.
    """

    def sgd() -> optax.GradientTransformation:
        return optax.sgd(cost.LR, momentum=cost.MOMENTUM, nesterov=True)

    def alig_base() -> optax.GradientTransformation:
        return alig(max_lr=cost.LR, momentum=cost.MOMENTUM)

    rows = []
    # lr_x: optax.sgd keeps its learning rate in a closure, so it is given (torch's default)
    for base, short, make_base, takes_value, lr_x in (
        ("optax.sgd nesterov", "sgd", sgd, False, cost.LR),
        ("alig_jax.alig", "alig", alig_base, True, None),
    ):
        rows.append(_cost_row(problem, base, base, None, make_base(), takes_value, 1))
        floor = f"floor: {short}, 2 calls"
        rows.append(_cost_row(problem, floor, base, "floor", make_base(), takes_value, 2))
        for mode, calls in (("past", 1), ("gradient", 2)):
            name = f"extrapolation({short}, {mode!r}) {calls} call{'s' * (calls > 1)}"
            tx = extrapolation(make_base(), mode=mode, lr_x=lr_x)
            rows.append(_cost_row(problem, name, base, mode, tx, True, calls))
    info = (
        f"jax {jax.__version__}, optax {optax.__version__}, jit; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, devices {jax.devices()}"
    )
    return info, rows
