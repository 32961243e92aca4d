"""alig_jax.extrapolation refuses invalid options and inputs with a message that says the fix.

(The skip rule, a non-finite loss or gradient at either point, is tested in
test_jax_extrapolation.py and on the oracle table.)
"""

from __future__ import annotations

from typing import Any

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
    extrapolation(SGD, mode="noise", sigma=0.1, key=0).init(jnp.ones(3))


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
    tx = extrapolation(SGD, mode="noise", sigma=0.1, key=0)
    with pytest.raises(ValueError, match=r"holds no noise key.*mode='noise'"):
        tx.update(params, state, params)
