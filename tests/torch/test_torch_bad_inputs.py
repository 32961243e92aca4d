"""The shared bad-input table (tests/support/bad_inputs.py) run against alig_torch.AliG."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alig_properties import check_random_run, configs, runs
from alig_torch import AliG
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


class TorchDriver:
    """AliG on leaf tensors; the loss arrives by ``loss=``, or by a closure returning None."""

    framework = "torch"
    loss_help = "opt.step(loss=loss)"
    advances_on_skip: frozenset[str] = frozenset()

    def __init__(self, foreach: bool) -> None:
        self.foreach = foreach

    def build(self, params: Sequence[np.ndarray], **config: Any) -> None:
        self.tensors = [torch.from_numpy(np.array(p)) for p in params]
        for t in self.tensors:
            if t.is_floating_point() or t.is_complex():
                t.requires_grad_(True)
        self.opt = AliG(self.tensors, foreach=self.foreach, **config)

    def step(self, loss: Any, grads: Sequence[np.ndarray | None], *, sparse: bool = False) -> None:
        for t, g in zip(self.tensors, grads, strict=True):
            t.grad = None if g is None else torch.from_numpy(np.array(g)).to(t.dtype)
        if sparse:
            self.tensors[0].grad = self.tensors[0].grad.to_sparse()
        if loss is MISSING:
            self.opt.step()
        elif loss is None:
            self.opt.step(lambda: None)
        elif isinstance(loss, np.ndarray):
            self.opt.step(loss=torch.from_numpy(loss))
        else:
            self.opt.step(loss=loss)

    def params(self) -> list[np.ndarray]:
        return [t.detach().numpy().copy() for t in self.tensors]

    def state(self) -> dict[str, np.ndarray]:
        state_dict = self.opt.state_dict()
        out = {
            f"{index}.{key}": value.numpy().copy()
            for index, entry in state_dict["state"].items()
            for key, value in entry.items()
        }
        for group in state_dict["param_groups"]:
            for key in ("gamma", "gamma_hat", "capped", "steps_taken", "steps_skipped"):
                out[key] = group[key].numpy().copy()
        return out


@pytest.fixture(params=[False, True], ids=["single_tensor", "foreach"])
def make_driver(request: pytest.FixtureRequest):
    return lambda: TorchDriver(foreach=request.param)


@pytest.mark.parametrize("row", rows_for("torch", STEP_ROWS))
def test_bad_loss_or_gradient(make_driver, row: Row) -> None:
    check_step_row(make_driver, row)


@pytest.mark.parametrize("row", rows_for("torch", PARAM_ROWS))
def test_bad_parameters(make_driver, row: ParamRow) -> None:
    check_param_row(make_driver, row)


@pytest.mark.parametrize(("name", "value"), HYPERPARAMETER_ROWS)
def test_invalid_hyperparameter(name: str, value: Any) -> None:
    check_hyperparameter_row(lambda: TorchDriver(foreach=None), name, value)


@settings(max_examples=60, deadline=None)
@given(config=configs, run=runs, foreach=st.booleans())
def test_random_configurations_and_sequences_follow_the_oracle(config, run, foreach) -> None:
    check_random_run(lambda: TorchDriver(foreach=foreach), config, run)
