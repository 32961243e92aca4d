"""flax.nnx.Optimizer drives alig_jax.alig, the loss passed as value=."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alig_jax import alig

STEPS = 12


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(5, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def _data():
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.standard_normal((STEPS, 16, 5)), jnp.float32),
        jnp.asarray(rng.integers(0, 3, (STEPS, 16))),
    )


def _loss(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_optimizer_update_with_value_equals_plain_optax() -> None:
    x, y = _data()
    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    initial = jax.tree.map(lambda a: jnp.array(a, copy=True), nnx.to_pure_dict(state))
    optimizer = nnx.Optimizer(model, alig(max_lr=0.5, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads, value=loss)
        return loss

    gammas = []
    for t in range(STEPS):
        train_step(model, optimizer, x[t], y[t])
        gammas.append(float(optimizer.opt_state.gamma_hat[...]))
    assert len(set(gammas)) == STEPS  # the loss reached the optimizer: gamma_hat follows it

    # The same run with optax alone, on the same initial parameters.
    tx = alig(max_lr=0.5, momentum=0.9)
    params = initial
    state = tx.init(params)

    def loss_of(params, x, y):
        template = nnx.split(MLP(nnx.Rngs(1)), nnx.Param)[1]
        nnx.replace_by_pure_dict(template, params)
        return _loss(nnx.merge(graphdef, template), x, y)

    @jax.jit
    def optax_step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_of)(params, x, y)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    for t in range(STEPS):
        params, state = optax_step(params, state, x[t], y[t])
    trained = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
