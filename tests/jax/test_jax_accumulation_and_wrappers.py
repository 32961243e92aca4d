"""alig with optax's wrappers: accumulation that equals the big batch, and which wrappers are safe.

docs/specification.md, section 6: k micro-batches then one step equal
one step on their union (float64, 1e-10, gamma moving). ``optax.MultiSteps(alig(...))``
does not (it hands alig the last micro-batch's loss): :func:`alig_jax.multi_steps` does.
The wrappers table of docs/guides/optax.md cites the tests below.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alig_cases import initial_params, make_sequence, max_relative_deviation
from alig_jax import AccumulationState, alig, multi_steps

OUTER_STEPS = 8
BATCH = 16
KWARGS = {"max_lr": 0.5, "momentum": 0.9}


def _problem(seed: int = 0) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """A small two-layer regression in float64: parameters and OUTER_STEPS batches."""
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.standard_normal((4, 6)) * 0.5),
        "b1": jnp.zeros(6),
        "w2": jnp.asarray(rng.standard_normal((6, 2)) * 0.5),
    }
    x = jnp.asarray(rng.standard_normal((OUTER_STEPS, BATCH, 4)))
    y = jnp.asarray(rng.standard_normal((OUTER_STEPS, BATCH, 2)))
    return params, x, y


def _loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean(jnp.sum((hidden @ params["w2"] - y) ** 2, axis=-1))


def _train_step(tx, scale: float = 1.0):
    """One jitted micro-batch (or batch) step: the loss (times ``scale``) and its gradient
    handed over together."""

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: scale * _loss(p, x, y))(params)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    return step


def _big_batch_run(tx, params, x, y) -> tuple[list[Any], list[float]]:
    state = tx.init(params)
    step = _train_step(tx)
    history, gammas = [], []
    for t in range(OUTER_STEPS):
        params, state = step(params, state, x[t], y[t])
        history.append(params)
        gammas.append(float(state.gamma))
    return history, gammas


def _accumulated_run(tx, params, x, y, k: int, scale: float = 1.0) -> tuple[list[Any], Any]:
    """k micro-batches per outer step, each handed over with its own loss."""
    state = tx.init(params)
    step = _train_step(tx, scale)
    history = []
    for t in range(OUTER_STEPS):
        for xs, ys in zip(jnp.split(x[t], k), jnp.split(y[t], k), strict=True):
            params, state = step(params, state, xs, ys)
        history.append(params)
    assert step._cache_size() == 1  # one compilation for every mini-step
    return history, state


def _deviation(a: Any, b: Any) -> float:
    return max_relative_deviation(jax.tree.leaves(a), jax.tree.leaves(b))


# ---------------------------------------------------------------- accumulation


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("adjusted", [False, True], ids=["standard", "adjusted"])
def test_multi_steps_over_k_micro_batches_equals_one_step_on_their_union(k, adjusted) -> None:
    params, x, y = _problem()
    big_tx = alig(**KWARGS, adjusted_momentum=adjusted)
    expected, gammas = _big_batch_run(big_tx, params, x, y)
    assert len(set(gammas)) >= 4  # gamma moves ...
    assert min(gammas) < KWARGS["max_lr"]  # ... and is not pinned at the cap
    assert max(gammas) == KWARGS["max_lr"]

    tx = multi_steps(alig(**KWARGS, adjusted_momentum=adjusted), every_k_schedule=k)
    history, state = _accumulated_run(tx, params, x, y, k)
    for t in range(OUTER_STEPS):
        assert _deviation(history[t], expected[t]) <= 1e-10, f"outer step {t}"
    assert isinstance(state, AccumulationState)
    assert int(state.multi_steps.inner_opt_state.steps_taken) == OUTER_STEPS
    assert float(state.multi_steps.inner_opt_state.gamma) == pytest.approx(gammas[-1], rel=1e-10)
    assert float(state.value) == 0.0  # reset after the k-th mini-step


@pytest.mark.parametrize("k", [2, 4])
def test_plain_optax_multi_steps_takes_the_wrong_step(k) -> None:
    """The pitfall docs/guides/optax.md warns about: ``optax.MultiSteps(alig(...))`` hands alig the
    mean gradient with the *last* micro-batch's loss; its gamma is that of the pair."""
    params, x, y = _problem()
    expected, _ = _big_batch_run(alig(**KWARGS), params, x, y)
    tx = optax.MultiSteps(alig(**KWARGS), every_k_schedule=k, accumulator_dtype=jnp.float64)
    history, _ = _accumulated_run(tx, params, x, y, k)
    assert _deviation(history[-1], expected[-1]) > 1e-3

    # What it computed on the first outer step: the last micro-batch's loss over the
    # norm of the mean gradient.
    state = tx.init(params)
    values, mean = [], None
    for xs, ys in zip(jnp.split(x[0], k), jnp.split(y[0], k), strict=True):
        loss, grads = jax.value_and_grad(_loss)(params, xs, ys)
        values.append(float(loss))
        mean = grads if mean is None else jax.tree.map(jnp.add, mean, grads)
        _, state = tx.update(grads, state, params, value=loss)
    sq_norm = sum(float(jnp.sum((g / k) ** 2)) for g in jax.tree.leaves(mean))
    gamma_hat = float(state.inner_opt_state.gamma_hat)
    assert gamma_hat == pytest.approx(values[-1] / (sq_norm + 1e-5), rel=1e-10)
    assert gamma_hat != pytest.approx(np.mean(values) / (sq_norm + 1e-5), rel=1e-3)


def test_multi_steps_with_summed_gradients_sums_the_losses() -> None:
    """``use_grad_mean=False``: the loop divides each micro-batch loss by k itself (as a
    torch loop does); gradients and losses are summed, and still equal the union."""
    params, x, y = _problem()
    expected, _ = _big_batch_run(alig(**KWARGS), params, x, y)
    k = 4
    tx = multi_steps(alig(**KWARGS), every_k_schedule=k, use_grad_mean=False)
    history, _ = _accumulated_run(tx, params, x, y, k, scale=1.0 / k)
    for t in range(OUTER_STEPS):
        assert _deviation(history[t], expected[t]) <= 1e-10, f"outer step {t}"


def test_multi_steps_state_restores_mid_accumulation() -> None:
    """The state's leaves, saved between two micro-batches and restored into a fresh
    state's structure, continue bit for bit."""
    params, x, y = _problem()
    k = 2
    tx = multi_steps(alig(**KWARGS), every_k_schedule=k)
    uninterrupted, _ = _accumulated_run(tx, params, x, y, k)
    step = _train_step(tx)

    state = tx.init(params)
    current = params
    micro = [
        (t, xs, ys)
        for t in range(OUTER_STEPS)
        for xs, ys in zip(jnp.split(x[t], k), jnp.split(y[t], k), strict=True)
    ]
    cut = 5  # inside the third accumulation
    for _, xs, ys in micro[:cut]:
        current, state = step(current, state, xs, ys)
    assert int(state.multi_steps.mini_step) == 1
    assert float(state.value) != 0.0
    saved = [np.array(leaf) for leaf in jax.tree.leaves((current, state))]

    fresh = (params, tx.init(params))
    current, state = jax.tree.unflatten(jax.tree.structure(fresh), [jnp.asarray(a) for a in saved])
    for _, xs, ys in micro[cut:]:
        current, state = step(current, state, xs, ys)
    for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(uninterrupted[-1]), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_multi_steps_rejected_mini_steps_leave_the_accumulated_loss() -> None:
    """With ``should_skip_update_fn=optax.skip_not_finite``, a micro-batch with a NaN
    gradient is as if it never happened: for the gradients (MultiSteps) and the loss."""
    params, x, y = _problem()
    k = 2
    expected, _ = _big_batch_run(alig(**KWARGS), params, x, y)
    tx = multi_steps(
        alig(**KWARGS), every_k_schedule=k, should_skip_update_fn=optax.skip_not_finite
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(OUTER_STEPS):
        for i, (xs, ys) in enumerate(zip(jnp.split(x[t], k), jnp.split(y[t], k), strict=True)):
            loss, grads = jax.value_and_grad(_loss)(params, xs, ys)
            if i == 1:  # a rejected micro-batch before the real one
                bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
                updates, state = update(bad, state, params, value=jnp.asarray(1e3))
                assert all(not jnp.any(u) for u in jax.tree.leaves(updates))
            updates, state = update(grads, state, params, value=loss)
            params = optax.apply_updates(params, updates)
        assert _deviation(params, expected[t]) <= 1e-10, f"outer step {t}"


def test_multi_steps_needs_the_value() -> None:
    params, x, y = _problem()
    tx = multi_steps(alig(**KWARGS), every_k_schedule=2)
    state = tx.init(params)
    grads = jax.grad(_loss)(params, x[0], y[0])
    with pytest.raises(ValueError, match="accumulates the loss with the gradients, and got no"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match=r"got an array of shape \(2,\)"):
        tx.update(grads, state, params, value=jnp.ones(2))


# ---------------------------------------------------------------- other wrappers


def _sequence_run(tx, sequence, params=None) -> tuple[list[jax.Array], Any]:
    params = [jnp.asarray(p) for p in initial_params()] if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in sequence:
        grads = [None if g is None else jnp.asarray(g) for g in step.grads]
        updates, state = update(grads, state, params, value=jnp.asarray(step.loss))
        params = [p if u is None else p + u for p, u in zip(params, updates, strict=True)]
    return params, state


def test_apply_if_finite_is_safe() -> None:
    """``apply_if_finite(alig(...), n)`` takes the same steps as alig on a sequence with
    NaN and inf losses and gradients (it rejects what alig would skip; past n rejections
    in a row it hands them to alig, which skips them)."""
    sequence = make_sequence(60)
    plain, plain_state = _sequence_run(alig(**KWARGS), sequence)
    for max_errors in (0, 3):
        wrapped, state = _sequence_run(optax.apply_if_finite(alig(**KWARGS), max_errors), sequence)
        assert max_relative_deviation(wrapped, plain) == 0.0
        assert int(state.inner_state.steps_taken) == int(plain_state.steps_taken)
        assert int(state.total_notfinite) > 0  # its checks did run


def test_masked_alig_steps_its_leaves_with_their_own_norm() -> None:
    """``multi_transform`` / ``masked``: alig sees only its leaves (the norm over that
    subset), which is right when the other leaves are frozen: it equals alig on the
    sub-tree alone."""
    params, x, y = _problem()
    labels = {"w1": "alig", "b1": "frozen", "w2": "alig"}
    tx = optax.multi_transform({"alig": alig(**KWARGS), "frozen": optax.set_to_zero()}, labels)
    state = tx.init(params)
    sub_tx = alig(**KWARGS)
    sub = {"w1": params["w1"], "w2": params["w2"]}
    sub_state = sub_tx.init(sub)
    current = params
    for t in range(OUTER_STEPS):
        loss, grads = jax.value_and_grad(_loss)(current, x[t], y[t])
        updates, state = tx.update(grads, state, current, value=loss)
        current = optax.apply_updates(current, updates)
        sub_updates, sub_state = sub_tx.update(
            {"w1": grads["w1"], "w2": grads["w2"]}, sub_state, sub, value=loss
        )
        sub = optax.apply_updates(sub, sub_updates)
    assert jnp.array_equal(current["b1"], params["b1"])
    assert _deviation([current["w1"], current["w2"]], [sub["w1"], sub["w2"]]) == 0.0


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: optax.lookahead(tx, sync_period=2, slow_step_size=0.5),
        lambda tx: optax.contrib.sam(tx, optax.sgd(0.1)),
    ],
    ids=["lookahead", "sam"],
)
def test_wrappers_that_do_not_forward_the_loss_fail_loudly(wrap) -> None:
    """lookahead and contrib.sam take no ``value=`` and call alig without it: both ways
    raise, neither steps with a missing loss."""
    params = {"w": jnp.array([1.0, -2.0])}
    tx = wrap(alig(**KWARGS))
    wrapped_params = (
        optax.LookaheadParams.init_synced(params)
        if "lookahead" in repr(tx.update.__qualname__)
        else params
    )
    state = tx.init(wrapped_params)
    grads = {"w": jnp.array([0.5, 0.5])}
    with pytest.raises(TypeError, match="unexpected keyword argument 'value'"):
        tx.update(grads, state, wrapped_params, value=1.0)
    with pytest.raises(ValueError, match="needs the loss as value="):
        tx.update(grads, state, wrapped_params)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("clip_by_global_norm", lambda: optax.chain(optax.clip_by_global_norm(0.1), alig())),
        ("zero_nans", lambda: optax.chain(optax.zero_nans(), alig())),
        ("add_decayed_weights", lambda: optax.chain(alig(), optax.add_decayed_weights(0.1))),
    ],
)
def test_unsafe_chains_change_the_step(name, make) -> None:
    """The unsafe rows of the wrappers table (docs/guides/optax.md): each changes the step
    alig takes on the raw gradient."""
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([1.0, jnp.nan if name == "zero_nans" else 2.0, 0.5])}
    reference = alig()
    ref_updates, ref_state = reference.update(grads, reference.init(params), params, value=2.0)
    tx = make()
    updates, _ = tx.update(grads, tx.init(params), params, value=2.0)
    if name == "zero_nans":  # alig skips a step with a NaN gradient; zero_nans makes it step
        assert int(ref_state.steps_skipped) == 1
        assert float(jnp.abs(updates["w"]).max()) > 0.0
    else:
        assert _deviation(updates, ref_updates) > 1e-2
