"""JAX rows of step_time.py: jitted alig vs optax.sgd(nesterov) and optax.polyak_sgd."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from alig_jax import alig


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


def candidates(shapes: list[tuple[int, ...]]) -> tuple[str, dict[str, Callable[[], None]]]:
    baseline = "optax.sgd nesterov momentum=0.9"
    rows = {
        baseline: _stepper(
            optax.with_extra_args_support(optax.sgd(0.1, momentum=0.9, nesterov=True)), shapes
        ),
        "alig_jax.alig momentum=0.9": _stepper(alig(max_lr=0.1, momentum=0.9), shapes),
        "optax.polyak_sgd": _stepper(optax.polyak_sgd(max_learning_rate=0.1), shapes),
    }
    return baseline, rows
