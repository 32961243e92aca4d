"""flax.nnx.Optimizer drives alig_jax.extrapolation(alig(...)): it trains, equals plain optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alig_jax import alig, anchor_params, extrapolation
from flax_models import MLP, cross_entropy

ITERATIONS = 15
CALLS = 2 * ITERATIONS  # "gradient" mode: an extrapolating call, then an updating one


def _data() -> tuple[jax.Array, jax.Array]:
    """Minibatches of a problem the MLP can fit: labels from a linear teacher."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((CALLS, 16, 5))
    y = np.argmax(x @ rng.standard_normal((5, 3)), axis=-1)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def _tx() -> optax.GradientTransformationExtraArgs:
    return extrapolation(alig(max_lr=0.5, momentum=0.9))


def test_nnx_optimizer_trains_with_extrapolation_and_equals_plain_optax() -> None:
    x, y = _data()
    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    initial = jax.tree.map(lambda a: jnp.array(a, copy=True), nnx.to_pure_dict(state))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)

    @nnx.jit
    def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
        loss, grads = nnx.value_and_grad(cross_entropy)(model, x, y)
        optimizer.update(model, grads, value=loss)
        return loss

    def anchor_of(model: MLP, optimizer: nnx.Optimizer) -> dict:
        """The documented way to evaluate and save at the anchor with flax.nnx."""
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        return nnx.to_pure_dict(anchor_params(nnx.as_pure(optimizer.opt_state), params))

    def loss_at(params: dict) -> float:
        evaluated = nnx.merge(graphdef, nnx.split(MLP(nnx.Rngs(1)), nnx.Param)[1])
        nnx.update(evaluated, params)
        return float(cross_entropy(evaluated, x.reshape(-1, 5), y.reshape(-1)))

    phases, gammas, anchors, held = [], [], [], []
    for t in range(CALLS):
        train_step(model, optimizer, x[t], y[t])
        opt_state = nnx.as_pure(optimizer.opt_state)
        phases.append(int(opt_state.phase))
        gammas.append(float(opt_state.base_state.gamma_hat))
        anchors.append(anchor_of(model, optimizer))
        held.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert phases == [1, 0] * ITERATIONS  # it alternated, and no call was skipped
    assert int(nnx.as_pure(optimizer.opt_state).iteration) == ITERATIONS
    assert len(set(gammas[1::2])) == ITERATIONS  # the loss reached ALI-G: gamma_hat follows it
    assert loss_at(anchors[-1]) < 0.7 * loss_at(initial)  # it trains
    for t, phase in enumerate(phases):  # the model holds w~ in phase 1, the anchor in phase 0
        same = all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(anchors[t]), jax.tree.leaves(held[t]), strict=True)
        )
        assert same == (phase == 0), f"call {t}"

    # The same run with optax alone, on the same initial parameters.
    tx = _tx()
    params = initial
    state = tx.init(params)

    def loss_of(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        template = nnx.split(MLP(nnx.Rngs(1)), nnx.Param)[1]
        nnx.replace_by_pure_dict(template, params)
        return cross_entropy(nnx.merge(graphdef, template), x, y)

    @jax.jit
    def optax_step(params: dict, state, x: jax.Array, y: jax.Array):
        loss, grads = jax.value_and_grad(loss_of)(params, x, y)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    for t in range(CALLS):
        params, state = optax_step(params, state, x[t], y[t])
        expected = jax.tree.leaves(anchor_params(state, params))
        for a, b in zip(jax.tree.leaves(anchors[t]), expected, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
