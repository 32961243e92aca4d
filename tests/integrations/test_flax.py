"""flax.nnx.Optimizer drives alig_jax.alig (and multi_steps), the loss passed as value=."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alig_cases import max_relative_deviation
from alig_jax import alig, multi_steps
from flax_models import MLP, cross_entropy

STEPS = 12


def _data():
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.standard_normal((STEPS, 16, 5)), jnp.float32),
        jnp.asarray(rng.integers(0, 3, (STEPS, 16))),
    )


def test_nnx_optimizer_update_with_value_equals_plain_optax() -> None:
    x, y = _data()
    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    initial = jax.tree.map(lambda a: jnp.array(a, copy=True), nnx.to_pure_dict(state))
    optimizer = nnx.Optimizer(model, alig(max_lr=0.5, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
        loss, grads = nnx.value_and_grad(cross_entropy)(model, x, y)
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
        return cross_entropy(nnx.merge(graphdef, template), x, y)

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


@pytest.mark.parametrize("k", [2, 4])
def test_nnx_optimizer_with_multi_steps_equals_one_step_on_the_union(k: int) -> None:
    """``nnx.Optimizer(model, multi_steps(alig(...), k))`` fed k micro-batches, each with
    its own loss as ``value=``, equals ``nnx.Optimizer(model, alig(...))`` fed their union
    (float64, 1e-10, gamma moving)."""
    outer_steps = 6
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((outer_steps, 16, 5)))
        y = jnp.asarray(rng.integers(0, 3, (outer_steps, 16)))
        kwargs = {"max_lr": 2.0, "momentum": 0.9}

        big_model = MLP(nnx.Rngs(0), jnp.float64)
        big = nnx.Optimizer(big_model, alig(**kwargs), wrt=nnx.Param)
        model = MLP(nnx.Rngs(0), jnp.float64)
        accumulating = nnx.Optimizer(model, multi_steps(alig(**kwargs), k), wrt=nnx.Param)

        @nnx.jit
        def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
            loss, grads = nnx.value_and_grad(cross_entropy)(model, x, y)
            optimizer.update(model, grads, value=loss)

        gammas = []
        for t in range(outer_steps):
            train_step(big_model, big, x[t], y[t])
            gammas.append(float(big.opt_state.gamma[...]))
            for xs, ys in zip(jnp.split(x[t], k), jnp.split(y[t], k), strict=True):
                train_step(model, accumulating, xs, ys)
            ours = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
            theirs = jax.tree.leaves(nnx.to_pure_dict(nnx.state(big_model, nnx.Param)))
            assert max_relative_deviation(ours, theirs) <= 1e-10, f"outer step {t}"
        assert len(set(gammas)) >= 3  # gamma moves ...
        assert min(gammas) < kwargs["max_lr"]  # ... below the cap
        inner = accumulating.opt_state.multi_steps.inner_opt_state
        assert int(inner.steps_taken[...]) == outer_steps
