"""alig_jax.extrapolation refuses invalid options and inputs with a message that says the fix.

(The skip rule, a non-finite loss or gradient at either point, is tested in
test_jax_extrapolation.py and on the oracle table.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest

from alig_jax import alig, extrapolation
from extrapolation_cases import invalid_options_for

SGD = optax.sgd(0.1, momentum=0.9, nesterov=True)


@pytest.mark.parametrize(("kwargs", "match"), invalid_options_for("jax"))
def test_invalid_options_are_refused_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        extrapolation(alig(max_lr=0.1), **kwargs)


def test_a_negative_seed_is_refused_as_in_torch_and_keras() -> None:
    with pytest.raises(ValueError, match=r"Invalid seed: got -2.*an int >= 0.*seed=0"):
        extrapolation(SGD, mode="noise", sigma=0.1, seed=-2)
    with (
        pytest.raises(ValueError, match=r"Invalid seed: got -2"),
        pytest.warns(DeprecationWarning, match="pass seed="),
    ):
        extrapolation(SGD, mode="noise", sigma=0.1, key=-2)


def test_a_jax_key_is_taken_in_noise_mode_only() -> None:
    extrapolation(SGD, mode="noise", sigma=0.1, seed=jax.random.key(0))
    extrapolation(SGD, mode="noise", sigma=0.1, seed=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"(?s)Invalid seed: got .* with mode='past'.*seed=None"):
        extrapolation(SGD, mode="past", lr_x=0.1, seed=jax.random.key(0))


def test_seed_and_the_deprecated_key_together_are_refused() -> None:
    with (
        pytest.raises(ValueError, match=r"both seed=1 and key=2.*seed= only"),
        pytest.warns(DeprecationWarning, match="pass seed="),
    ):
        extrapolation(SGD, mode="noise", sigma=0.1, seed=1, key=2)


@pytest.mark.parametrize("base", [optax.sgd, 0.1, None, "alig"])
def test_a_base_that_is_not_an_optax_transformation_is_refused(base: Any) -> None:
    with pytest.raises(ValueError, match=r"Invalid base.*expected an optax GradientTransformation"):
        extrapolation(base)


@pytest.mark.parametrize("mode", ["gradient", "past"])
def test_lr_x_none_is_refused_where_the_base_keeps_no_step_size(mode: str) -> None:
    tx = extrapolation(SGD, mode=mode)
    with pytest.raises(ValueError, match=r"Invalid lr_x: got None.*inject_hyperparams"):
        tx.init(jnp.ones(3))
    # Either fix works: an explicit lr_x, or the learning rate in the state.
    extrapolation(SGD, mode=mode, lr_x=0.1).init(jnp.ones(3))
    injected = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    extrapolation(injected, mode=mode).init(jnp.ones(3))
    # Noise mode takes no lr_x: nothing to read.
    extrapolation(SGD, mode="noise", sigma=0.1, seed=0).init(jnp.ones(3))


def test_lr_x_none_is_refused_where_two_alig_states_would_each_give_one() -> None:
    base = optax.multi_transform(
        {"a": alig(max_lr=0.1), "b": alig(max_lr=0.2)}, {"x": "a", "y": "b"}
    )
    params = {"x": jnp.ones(2), "y": jnp.ones(2)}
    with pytest.raises(ValueError, match="holds 2 ALI-G states"):
        extrapolation(base).init(params)
    extrapolation(base, lr_x=0.1).init(params)


def test_update_without_params_or_without_the_loss_for_alig_is_refused() -> None:
    params = jnp.ones(3)
    tx = extrapolation(alig(max_lr=0.1))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"needs the params: call tx\.update"):
        tx.update(params, state)
    with pytest.raises(ValueError, match=r"needs the loss.*value=loss"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match=r"scalar real loss.*shape \(3,\).*loss.mean\(\)"):
        tx.update(params, state, params, value=jnp.ones(3))
    with pytest.raises(ValueError, match="scalar real loss"):
        tx.update(params, state, params, value=jnp.array(1.0 + 2.0j))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({}, "no arrays in it"),
        ({"w": jnp.ones(2), "count": jnp.array(3)}, r"leaf \['count'\] has dtype int"),
    ],
)
def test_params_that_cannot_be_displaced_are_refused_at_init(params: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        extrapolation(SGD, lr_x=0.1).init(params)


def test_a_noise_wrapper_refuses_a_state_without_its_key() -> None:
    params = jnp.ones(3)
    state = extrapolation(SGD, lr_x=0.1).init(params)  # a "gradient"-mode state: key None
    tx = extrapolation(SGD, mode="noise", sigma=0.1, seed=0)
    with pytest.raises(ValueError, match=r"holds no noise key.*mode='noise'"):
        tx.update(params, state._replace(config_code=tx.init(params).config_code), params)


@pytest.mark.parametrize(
    ("saved", "ours", "match"),
    [
        (
            {"mode": "past"},
            {},
            r"mode='past', linearized=True\), and this wrapper has "
            r"mode='gradient', linearized=True",
        ),
        (
            {"linearized": False},
            {},
            r"mode='gradient', linearized=False\), and this wrapper "
            r"has mode='gradient', linearized=True",
        ),
        (
            {},
            {"mode": "noise", "sigma": 0.1},
            r"linearized=True\), and this wrapper has "
            r"mode='noise'",
        ),
    ],
)
def test_a_state_of_another_mode_or_linearized_is_refused_even_under_jit(
    saved: dict[str, Any], ours: dict[str, Any], match: str
) -> None:
    """A checkpoint restored into another wrapper: refused with both settings named."""
    params = jnp.ones(3)
    state = extrapolation(alig(max_lr=0.1), **({"lr_x": 0.1} | saved)).init(params)
    tx = extrapolation(alig(max_lr=0.1), **({"lr_x": 0.1} | ours if "sigma" not in ours else ours))
    for update in (tx.update, jax.jit(tx.update)):
        with pytest.raises(ValueError, match=match + ".*checkpoint's mode and linearized"):
            update(params, state, params, value=1.0)
    tx.update(params, tx.init(params), params, value=1.0)  # its own state is taken
