"""The shared bad-input table (tests/support/bad_inputs.py) run against alig_tf.AliG.

Runs once per Keras backend (nox sessions tf, keras_jax, keras_torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import pytest
from hypothesis import given, settings

from alig_properties import check_random_run, configs, runs
from alig_tf import AliG
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

_RECORDS = ("gamma", "gamma_hat", "capped", "steps_taken", "steps_skipped")


class KerasDriver:
    """AliG on keras.Variables through ``apply(grads, variables, loss=...)``."""

    framework = "keras"
    loss_help = "loss=loss"
    advances_on_skip = frozenset({"iterations"})  # Keras counts every apply()

    def build(self, params: Sequence[np.ndarray], **config: Any) -> None:
        self.variables = [
            keras.Variable(p, dtype=str(p.dtype), trainable=p.dtype.kind == "f") for p in params
        ]
        self.opt = AliG(**config)

    def step(self, loss: Any, grads: Sequence[np.ndarray | None], *, sparse: bool = False) -> None:
        assert not sparse
        grads = [
            None if g is None else keras.ops.convert_to_tensor(g, dtype=v.dtype)
            for g, v in zip(grads, self.variables, strict=True)
        ]
        if loss is MISSING:
            self.opt.apply(grads, self.variables)
        else:
            self.opt.apply(grads, self.variables, loss=loss)

    def params(self) -> list[np.ndarray]:
        return [np.array(keras.ops.convert_to_numpy(v.value)) for v in self.variables]

    def state(self) -> dict[str, np.ndarray]:
        if not self.opt.built:
            return {}
        named = {id(getattr(self.opt, name)): name for name in _RECORDS}
        named[id(self.opt.iterations)] = "iterations"
        return {  # by position: variable paths carry a process-wide counter
            named.get(id(v), f"variables[{i}]"): np.array(keras.ops.convert_to_numpy(v.value))
            for i, v in enumerate(self.opt.variables)
        }


@pytest.mark.parametrize("row", rows_for("keras", STEP_ROWS))
def test_bad_loss_or_gradient(row: Row, floatx) -> None:
    floatx("float64")  # the learning-rate variable too: the oracle check is in float64
    check_step_row(KerasDriver, row)


@pytest.mark.parametrize("row", rows_for("keras", PARAM_ROWS))
def test_bad_parameters(row: ParamRow, floatx) -> None:
    floatx("float64")
    check_param_row(KerasDriver, row)


@pytest.mark.parametrize(("name", "value"), HYPERPARAMETER_ROWS)
def test_invalid_hyperparameter(name: str, value: Any) -> None:
    check_hyperparameter_row(KerasDriver, name, value)


@settings(max_examples=40, deadline=None)
@given(config=configs, run=runs)
def test_random_configurations_and_sequences_follow_the_oracle(config, run) -> None:
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        check_random_run(KerasDriver, config, run)
    finally:
        keras.config.set_floatx(previous)
