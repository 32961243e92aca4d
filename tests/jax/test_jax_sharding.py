"""Data parallel JAX: a sharded batch gives the single-device step (jit, and shard_map)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alig_jax import alig


@pytest.fixture(autouse=True)
def _two_devices() -> None:
    assert jax.device_count() >= 2, "XLA_FLAGS must give 2 host devices (tests/jax/conftest.py)"


STEPS = 10


def _problem():
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.standard_normal((6, 16)) * 0.5),
        "b1": jnp.zeros(16),
        "w2": jnp.asarray(rng.standard_normal((16, 3)) * 0.5),
    }
    x = jnp.asarray(rng.standard_normal((STEPS, 16, 6)))
    y = jnp.asarray(rng.integers(0, 3, (STEPS, 16)))
    return params, x, y


def _loss(params, x, y):
    logits = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


TX = alig(max_lr=5.0, momentum=0.9, max_norm=6.0)


@jax.jit
def _step(params, state, x, y):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = TX.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state


def _train(params, x, y, step_fn):
    state = TX.init(params)
    gammas = []
    for t in range(STEPS):
        params, state = step_fn(params, state, x[t], y[t])
        gammas.append(float(state.gamma))
    return params, gammas


def _max_deviation(a, b) -> float:
    scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b))
    return (
        max(
            float(jnp.max(jnp.abs(u - v)))
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )
        / scale
    )


def test_jit_on_a_batch_sharded_over_two_devices_equals_one_device() -> None:
    params, x, y = _problem()
    single, single_gammas = _train(params, x, y, _step)
    assert len(set(single_gammas)) > 1  # gamma moves: the loss matters

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    batch_sharding = NamedSharding(mesh, P(None, "data"))  # (step, batch, ...) over batch
    replicated = NamedSharding(mesh, P())
    xs, ys = jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
    assert len(xs.sharding.device_set) == 2
    sharded, sharded_gammas = _train(jax.device_put(params, replicated), xs, ys, _step)
    assert _max_deviation(sharded, single) <= 1e-12
    np.testing.assert_allclose(sharded_gammas, single_gammas, rtol=1e-12)


def test_shard_map_with_pmean_of_loss_and_grads_equals_one_device() -> None:
    """The rule under shard_map/pmap: pmean the loss and the gradients, then update."""
    params, x, y = _problem()
    single, _ = _train(params, x, y, _step)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))

    @jax.jit
    @partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P(), P()),
        check_vma=False,
    )
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        loss, grads = jax.lax.pmean((loss, grads), "data")
        updates, state = TX.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    sharded, _ = _train(params, x, y, step)
    assert _max_deviation(sharded, single) <= 1e-12


def test_without_pmean_of_the_loss_replicas_would_disagree() -> None:
    """Guard: the local losses of the two halves differ, so the pmean above matters."""
    params, x, y = _problem()
    first, second = _loss(params, x[0, :8], y[0, :8]), _loss(params, x[0, 8:], y[0, 8:])
    assert abs(float(first) - float(second)) > 1e-3
