"""alig_jax.alig as an optax citizen: jit, skipped steps, inject_hyperparams, multi_steps..."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alig_cases import max_relative_deviation
from alig_jax import AliGState, alig, multi_steps, project_onto_ball


def _quadratic_problem(dtype=jnp.float64):
    params = {"w": jnp.array([1.0, -2.0, 3.0], dtype), "b": jnp.array(0.5, dtype)}

    def loss_fn(p):
        return jnp.sum(p["w"] ** 2) + p["b"] ** 2

    return params, loss_fn


def _run(tx, params, loss_fn, steps, jit=True):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for _ in range(steps):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
    return params, state


# ---------------------------------------------------------------- the loss argument


def test_missing_value_is_a_clear_error() -> None:
    params, loss_fn = _quadratic_problem()
    tx = alig(max_lr=0.1)
    state = tx.init(params)
    grads = jax.grad(loss_fn)(params)
    with pytest.raises(ValueError, match="value=") as info:
        tx.update(grads, state, params)
    assert "tx.update(grads, state, params, value=loss)" in str(info.value)


@pytest.mark.parametrize(
    ("value", "message"), [(jnp.ones(3), "shape"), ("1.0", "scalar"), (1.0 + 2.0j, "real")]
)
def test_bad_value_is_a_clear_error(value, message) -> None:
    params, loss_fn = _quadratic_problem()
    tx = alig(max_lr=0.1)
    with pytest.raises(ValueError, match=message):
        tx.update(jax.grad(loss_fn)(params), tx.init(params), params, value=value)


def test_unknown_extra_args_are_ignored() -> None:
    params, loss_fn = _quadratic_problem()
    tx = alig(max_lr=0.1, momentum=0.9)
    state = tx.init(params)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    a, _ = tx.update(grads, state, params, value=loss)
    b, _ = tx.update(grads, state, params, value=loss, grad=grads, value_fn=loss_fn, other=3)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


def test_max_norm_without_params_is_a_clear_error() -> None:
    params, loss_fn = _quadratic_problem()
    tx = alig(max_lr=0.1, max_norm=1.0)
    with pytest.raises(ValueError, match="needs them"):
        tx.update(jax.grad(loss_fn)(params), tx.init(params), value=1.0)


@pytest.mark.parametrize(
    "kwargs", [{"max_lr": -1.0}, {"momentum": 1.0}, {"eps": math.nan}, {"max_norm": 0.0}]
)
def test_invalid_hyperparameters_raise_the_core_errors(kwargs) -> None:
    with pytest.raises(ValueError, match=f"Invalid {next(iter(kwargs))}"):
        alig(**kwargs)


# ---------------------------------------------------------------- jit, skipped steps


def test_second_jitted_call_does_not_recompile() -> None:
    params, loss_fn = _quadratic_problem()
    tx = alig(max_lr=0.1, momentum=0.9, max_norm=10.0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for loss_value in (1.0, 2.0, math.nan, 3.0):  # a skipped step too
        grads = jax.grad(loss_fn)(params)
        updates, state = update(grads, state, params, value=jnp.asarray(loss_value))
        params = optax.apply_updates(params, updates)
    assert update._cache_size() == 1


@pytest.mark.parametrize("bad", ["nan_value", "inf_value", "nan_grad", "inf_grad"])
@pytest.mark.parametrize("adjusted", [False, True])
def test_skipped_step_leaves_params_and_state_bitwise_unchanged(bad, adjusted) -> None:
    params, loss_fn = _quadratic_problem()
    params["b"] = jnp.array(-0.0)  # a signed zero must keep its sign too
    tx = alig(max_lr=0.5, momentum=0.9, adjusted_momentum=adjusted, max_norm=2.0)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(3):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    if bad == "nan_value":
        loss = jnp.nan
    elif bad == "inf_value":
        loss = jnp.inf
    elif bad == "nan_grad":
        grads["w"] = grads["w"].at[0].set(jnp.nan)
    else:
        grads["w"] = grads["w"].at[1].set(-jnp.inf)
    updates, new_state = update(grads, state, params, value=loss)
    new_params = optax.apply_updates(params, updates)

    def same_bits(a, b):
        return np.asarray(a).tobytes() == np.asarray(b).tobytes()

    assert jax.tree.all(jax.tree.map(same_bits, params, new_params))
    for field in ("momentum_buffer", "gamma", "gamma_hat", "capped", "steps_taken"):
        assert jax.tree.all(
            jax.tree.map(same_bits, getattr(state, field), getattr(new_state, field))
        ), field
    assert int(new_state.steps_skipped) == int(state.steps_skipped) + 1


def test_missing_gradient_leaves_param_and_buffer_untouched() -> None:
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
    tx = alig(max_lr=0.1, momentum=0.9)
    state = tx.init(params)
    updates, state = tx.update(
        {"a": jnp.array([1.0, 1.0]), "b": jnp.array([1.0])}, state, params, value=1.0
    )
    params = optax.apply_updates(params, updates)
    buffer_b = state.momentum_buffer["b"]
    updates, state = tx.update({"a": jnp.array([1.0, 1.0]), "b": None}, state, params, value=1.0)
    assert updates["b"] is None
    assert jnp.array_equal(state.momentum_buffer["b"], buffer_b)


# ---------------------------------------------------------------- optax machinery


def test_inject_hyperparams_gives_the_same_numbers() -> None:
    params, loss_fn = _quadratic_problem()
    plain, _ = _run(alig(max_lr=0.3, momentum=0.9), params, loss_fn, 10)
    injected_tx = optax.inject_hyperparams(alig)(max_lr=0.3, momentum=0.9)
    injected, state = _run(injected_tx, params, loss_fn, 10)
    assert max_relative_deviation(jax.tree.leaves(injected), jax.tree.leaves(plain)) <= 1e-12
    assert float(state.hyperparams["max_lr"]) == 0.3


def test_multi_steps_accumulates_then_steps() -> None:
    """alig_jax.multi_steps moves nothing before the k-th call; the k-th takes alig's step
    with the mean gradient *and the mean loss* of the k calls. (``optax.MultiSteps(alig)``
    hands over the last call's loss instead: test_jax_accumulation_and_wrappers.py.)"""
    params, _ = _quadratic_problem()
    scales = (0.5, 1.0, 3.0)  # three micro-batches: three different losses and gradients
    tx = multi_steps(alig(max_lr=10.0, momentum=0.9), every_k_schedule=3)
    state = tx.init(params)
    start = params
    losses, grads_seen = [], []
    for k, scale in enumerate(scales):
        loss, grads = jax.value_and_grad(lambda p, s=scale: s * (jnp.sum(p["w"] ** 2) + 1.0))(
            params
        )
        losses.append(loss)
        grads_seen.append(grads)
        updates, state = tx.update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
        moved = not jnp.array_equal(params["w"], start["w"])
        assert moved == (k == 2)
    inner = state.multi_steps.inner_opt_state
    assert int(inner.steps_taken) == 1

    mean_grads = jax.tree.map(lambda *g: sum(g) / 3, *grads_seen)
    mean_loss = sum(losses) / 3
    reference = alig(max_lr=10.0, momentum=0.9)
    updates, expected_state = reference.update(
        mean_grads, reference.init(start), start, value=mean_loss
    )
    expected = optax.apply_updates(start, updates)
    assert float(inner.gamma_hat) == pytest.approx(float(expected_state.gamma_hat), rel=1e-12)
    assert not bool(inner.capped)
    assert max_relative_deviation(jax.tree.leaves(params), jax.tree.leaves(expected)) <= 1e-12


def test_state_is_stable_under_lax_cond() -> None:
    params, loss_fn = _quadratic_problem()
    tx = alig(max_lr=0.1, momentum=0.9)
    state = tx.init(params)
    loss, grads = jax.value_and_grad(loss_fn)(params)

    @jax.jit
    def maybe_update(flag, state):
        def do(state):
            return tx.update(grads, state, params, value=loss)[1]

        return jax.lax.cond(flag, do, lambda s: s, state)

    new_state = maybe_update(True, state)
    assert isinstance(new_state, AliGState)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state
    )


def test_max_lr_schedule_is_evaluated_at_the_steps_taken() -> None:
    params = jnp.array([10.0])
    tx = alig(max_lr=optax.linear_schedule(0.1, 0.2, transition_steps=1), eps=0.0)
    state = tx.init(params)
    gammas = []
    for _ in range(3):
        _, state = tx.update(jnp.array([1.0]), state, params, value=1000.0)
        gammas.append(float(state.gamma))
    assert gammas == pytest.approx([0.1, 0.2, 0.2])


# ---------------------------------------------------------------- the math, end to end


def test_converges_on_a_parabola() -> None:
    params, loss_fn = _quadratic_problem()
    params, state = _run(alig(max_lr=1.0, eps=0.0), params, loss_fn, 50)
    assert float(loss_fn(params)) < 1e-20  # the Polyak step halves w on |w|^2
    assert int(state.steps_taken) == 50


def test_converges_on_rosenbrock() -> None:
    def rosenbrock(p):
        return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

    params, _ = _run(alig(max_lr=1e-3, momentum=0.9), jnp.array([-1.0, 1.5]), rosenbrock, 3000)
    assert float(rosenbrock(params)) < 1e-4


def test_bf16_params_keep_their_dtype_and_the_norm_is_float32() -> None:
    params = {"w": jnp.full((4096,), 1.0, jnp.bfloat16)}
    tx = alig(max_lr=10.0, eps=0.0)
    state = tx.init(params)
    grads = {"w": jnp.full((4096,), 0.01, jnp.bfloat16)}
    updates, state = tx.update(grads, state, params, value=1.0)
    assert updates["w"].dtype == jnp.bfloat16
    assert state.gamma.dtype == jnp.float32
    expected = 1.0 / (4096 * float(jnp.bfloat16(0.01)) ** 2)
    assert float(state.gamma) == pytest.approx(expected, rel=1e-5)


def test_projection_helper_and_steps_keep_params_in_the_ball() -> None:
    params, loss_fn = _quadratic_problem()
    params = project_onto_ball(params, 1.0)
    norm = math.sqrt(sum(float(jnp.sum(p**2)) for p in jax.tree.leaves(params)))
    assert norm == pytest.approx(1.0)
    tx = alig(max_lr=1.0, momentum=0.9, max_norm=1.0)
    state = tx.init(params)
    for _ in range(5):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p) - 10.0 * p["b"])(params)
        updates, state = tx.update(grads, state, params, value=loss + 100.0)
        params = optax.apply_updates(params, updates)
        norm = math.sqrt(sum(float(jnp.sum(p**2)) for p in jax.tree.leaves(params)))
        assert norm <= 1.0 + 1e-12


def test_the_norm_of_a_large_float32_gradient_is_accurate() -> None:
    """float32 gradients of ResNet-18 size: the squared norm within SPEC's float32 1e-5."""
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype(np.float32) for s in ((512, 512, 3, 3), (1000, 512))]
    exact = sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)
    params = [jnp.zeros(g.shape, jnp.float32) for g in grads]
    tx = alig(max_lr=None, eps=0.0)
    _, state = jax.jit(tx.update)(
        [jnp.asarray(g) for g in grads], tx.init(params), params, value=1.0
    )
    assert abs(float(state.gamma) * exact - 1.0) <= 1e-5  # gamma = loss / S with eps = 0
