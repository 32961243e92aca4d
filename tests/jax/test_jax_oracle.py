"""alig_jax.alig against the NumPy oracle on every configuration of the shared table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alig_cases import (
    CASES,
    Case,
    initial_params,
    make_sequence,
    max_relative_deviation,
    run_oracle,
    tolerance,
)
from alig_jax import alig


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_oracle_step_by_step(case: Case, dtype: type) -> None:
    steps, tol = tolerance(dtype)
    sequence = make_sequence(steps, dtype, pinned=case.pinned_at_cap)
    history = run_oracle(case.config, initial_params(dtype), sequence)
    params = [jnp.asarray(p) for p in initial_params(dtype)]
    tx = alig(**case.kwargs)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t, (step, (expected, oracle_state)) in enumerate(zip(sequence, history, strict=True)):
        grads = [None if g is None else jnp.asarray(g) for g in step.grads]
        updates, state = update(grads, state, params, value=jnp.asarray(step.loss, dtype))
        params = [
            p if u is None else optax.apply_updates(p, u)
            for p, u in zip(params, updates, strict=True)
        ]
        assert all(p.dtype == dtype for p in params)
        assert max_relative_deviation(params, expected) <= tol, f"step {t} ({step.event})"
        assert float(state.gamma) == pytest.approx(oracle_state.gamma, rel=tol, abs=tol)
        assert float(state.gamma_hat) == pytest.approx(oracle_state.gamma_hat, rel=tol, abs=tol)
        assert bool(state.capped) == oracle_state.capped
        assert int(state.steps_taken) == oracle_state.steps_taken
        assert int(state.steps_skipped) == oracle_state.steps_skipped
        if state.momentum is not None:
            for ours, theirs in zip(state.momentum, oracle_state.buffers, strict=True):
                if theirs is None:
                    assert not np.any(np.asarray(ours))
                else:
                    assert max_relative_deviation([ours], [theirs]) <= tol * 10
