"""The generic functions, driven by NumPy, equal the oracle on every configuration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

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
from alig_core import (
    AliGConfig,
    keep_if_skipped,
    momentum_coefficients,
    momentum_update,
    projection_scale,
    sgd_update,
    step_size,
)


class NumpyAliG:
    """A minimal array-namespace adapter over NumPy, built only from alig_core's functions."""

    def __init__(self, params: Sequence[np.ndarray], config: AliGConfig) -> None:
        self.params = [np.array(p) for p in params]
        self.config = config
        self.buffers = [np.zeros_like(p) for p in self.params]
        self.gamma = np.zeros((), self.params[0].dtype)

    def step(self, step: Step) -> None:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf on skipped steps
            self._step(step)

    def _step(self, step: Step) -> None:
        c, dtype = self.config, self.params[0].dtype
        present = [i for i, g in enumerate(step.grads) if g is not None]
        sq_grad_norm = sum(
            (np.sum(np.square(step.grads[i].astype(dtype))) for i in present),
            np.zeros((), dtype),
        )
        size = step_size(
            np,
            np.asarray(step.loss, dtype),
            sq_grad_norm,
            max_lr=c.max_lr,
            eps=c.eps,
            f_star=c.f_star,
        )
        coefficients = momentum_coefficients(
            size.gamma, momentum=c.momentum, adjusted_momentum=c.adjusted_momentum
        )
        new_params = list(self.params)
        for i in present:
            g = step.grads[i].astype(dtype)
            if c.momentum == 0:
                new = sgd_update(self.params[i], g, size.gamma)
            else:
                new, buffer = momentum_update(self.params[i], g, self.buffers[i], coefficients)
                self.buffers[i] = keep_if_skipped(np, size.skipped, self.buffers[i], buffer)
            new_params[i] = keep_if_skipped(np, size.skipped, self.params[i], new)
        if c.max_norm is not None:
            scale = projection_scale(np, sum(np.sum(p * p) for p in new_params), c.max_norm)
            new_params = [keep_if_skipped(np, size.skipped, p, p * scale) for p in new_params]
        self.params = [np.asarray(p, dtype) for p in new_params]
        self.gamma = keep_if_skipped(np, size.skipped, self.gamma, size.gamma)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_generic_functions_equal_the_oracle(case: Case, dtype: type) -> None:
    steps, tol = tolerance(dtype)
    params = initial_params(dtype)
    sequence = make_sequence(steps, dtype, pinned=case.pinned_at_cap)
    history = run_oracle(case.config, params, sequence)
    adapter = NumpyAliG(params, case.config)
    worst = 0.0
    for step, (expected_params, expected_state) in zip(sequence, history, strict=True):
        adapter.step(step)
        worst = max(worst, max_relative_deviation(adapter.params, expected_params))
        assert float(adapter.gamma) == pytest.approx(expected_state.gamma, rel=tol, abs=tol)
    assert worst <= tol


def test_a_perturbed_configuration_is_detected() -> None:
    """Guard: the comparison above can fail (the other momentum convention differs)."""
    standard, adjusted = CASES[2], CASES[3]
    assert standard.name == "standard_momentum"
    assert adjusted.name == "adjusted_momentum"
    params, sequence = initial_params(), make_sequence(40)
    expected = run_oracle(standard.config, params, sequence)[-1][0]
    adapter = NumpyAliG(params, adjusted.config)
    for step in sequence:
        adapter.step(step)
    assert max_relative_deviation(adapter.params, expected) > 1e-3
