"""The shared bad-input table (tests/support/bad_inputs.py) run against alig_jax.alig."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from alig_jax import alig
from alig_properties import check_random_run, configs, runs
from bad_inputs import (
    HYPERPARAMETER_ROWS,
    MISSING,
    PARAM_ROWS,
    STEP_ROWS,
    ParamRow,
    Row,
    check_hyperparameter_row,
    check_param_row,
    check_step_row,
    rows_for,
)


class OptaxDriver:
    """``alig`` on a list of arrays, its update jitted or not; the loss goes in ``value=``."""

    framework = "jax"
    loss_help = "value=loss"
    advances_on_skip: frozenset[str] = frozenset()

    def __init__(self, jit: bool) -> None:
        self.jit = jit

    def build(self, params: Sequence[np.ndarray], **config: Any) -> None:
        self.tx = alig(**config)
        self.current = [jnp.asarray(p) for p in params]
        self.opt_state = self.tx.init(self.current)

    def step(self, loss: Any, grads: Sequence[np.ndarray | None], *, sparse: bool = False) -> None:
        assert not sparse
        grads = [None if g is None else jnp.asarray(g) for g in grads]
        kwargs = {} if loss is MISSING else {"value": loss}
        update = jax.jit(self.tx.update) if self.jit and isinstance(loss, float) else self.tx.update
        updates, self.opt_state = update(grads, self.opt_state, self.current, **kwargs)
        # optax.apply_updates refuses None updates (parameters without a gradient).
        self.current = [
            p if u is None else p + u for p, u in zip(self.current, updates, strict=True)
        ]

    def params(self) -> list[np.ndarray]:
        return [np.asarray(p) for p in self.current]

    def state(self) -> dict[str, np.ndarray]:
        out = {
            name: np.asarray(getattr(self.opt_state, name))
            for name in ("gamma", "gamma_hat", "capped", "steps_taken", "steps_skipped")
        }
        for i, buffer in enumerate(jax.tree.leaves(self.opt_state.momentum)):
            out[f"momentum.{i}"] = np.asarray(buffer)
        return out


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def make_driver(request: pytest.FixtureRequest):
    return lambda: OptaxDriver(jit=request.param)


@pytest.mark.parametrize("row", rows_for("jax", STEP_ROWS))
def test_bad_loss_or_gradient(make_driver, row: Row) -> None:
    check_step_row(make_driver, row)


@pytest.mark.parametrize("row", rows_for("jax", PARAM_ROWS))
def test_bad_parameters(make_driver, row: ParamRow) -> None:
    check_param_row(make_driver, row)


@pytest.mark.parametrize(("name", "value"), HYPERPARAMETER_ROWS)
def test_invalid_hyperparameter(name: str, value: Any) -> None:
    check_hyperparameter_row(lambda: OptaxDriver(jit=False), name, value)


@settings(max_examples=60, deadline=None)
@given(config=configs, run=runs)
def test_random_configurations_and_sequences_follow_the_oracle(config, run) -> None:
    check_random_run(lambda: OptaxDriver(jit=False), config, run)
