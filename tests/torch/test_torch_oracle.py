"""alig_torch.AliG against the NumPy oracle on every configuration of the shared table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alig_cases import (
    CASES,
    Case,
    Step,
    initial_params,
    make_sequence,
    max_relative_deviation,
    run_oracle,
    tolerance,
)
from alig_torch import AliG

DTYPES = {"float64": (torch.float64, np.float64), "float32": (torch.float32, np.float32)}


def make_params(dtype: torch.dtype, numpy_dtype: type) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.tensor(p, dtype=dtype)) for p in initial_params(numpy_dtype)]


def feed(params: list[torch.nn.Parameter], step: Step) -> None:
    for p, g in zip(params, step.grads, strict=True):
        p.grad = None if g is None else torch.tensor(g, dtype=p.dtype)


def buffers_of(opt: AliG, params: list[torch.nn.Parameter]) -> list[np.ndarray | None]:
    return [
        opt.state[p]["momentum_buffer"].numpy() if "momentum_buffer" in opt.state[p] else None
        for p in params
    ]


@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_oracle_step_by_step(case: Case, dtype_name: str, foreach: bool) -> None:
    dtype, numpy_dtype = DTYPES[dtype_name]
    steps, tol = tolerance(numpy_dtype)
    sequence = make_sequence(steps, numpy_dtype, pinned=case.pinned_at_cap)
    history = run_oracle(case.config, initial_params(numpy_dtype), sequence)
    params = make_params(dtype, numpy_dtype)
    opt = AliG(params, **case.kwargs, foreach=foreach)
    for t, (step, (expected, state)) in enumerate(zip(sequence, history, strict=True)):
        feed(params, step)
        opt.step(loss=step.loss)
        actual = [p.detach().numpy() for p in params]
        assert max_relative_deviation(actual, expected) <= tol, f"step {t} ({step.event})"
        assert float(opt.gamma) == pytest.approx(state.gamma, rel=tol, abs=tol), f"step {t}"
        assert float(opt.gamma_hat) == pytest.approx(state.gamma_hat, rel=tol, abs=tol)
        assert bool(opt.capped) == state.capped
        assert int(opt.steps_taken) == state.steps_taken
        assert int(opt.steps_skipped) == state.steps_skipped
        for ours, theirs in zip(buffers_of(opt, params), state.buffers, strict=True):
            if theirs is None:  # never had a gradient, or momentum 0: no buffer in use
                assert ours is None or not np.any(ours)
            else:
                assert max_relative_deviation([ours], [theirs]) <= max(tol, 1e-12) * 10


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_foreach_equals_single_tensor(dtype_name: str) -> None:
    dtype, numpy_dtype = DTYPES[dtype_name]
    sequence = make_sequence(60, numpy_dtype)
    for case in CASES:
        runs = []
        for foreach in (False, True):
            params = make_params(dtype, numpy_dtype)
            opt = AliG(params, **case.kwargs, foreach=foreach)
            for step in sequence:
                feed(params, step)
                opt.step(loss=step.loss)
            runs.append([p.detach().numpy() for p in params])
        assert max_relative_deviation(runs[0], runs[1]) <= (
            1e-14 if dtype_name == "float64" else 1e-6
        ), case.name
