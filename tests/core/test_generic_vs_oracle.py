"""The generic functions, driven by NumPy, equal the oracle on every configuration."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from alig_cases import (
    CASES,
    Step,
    initial_params,
    make_sequence,
    max_relative_deviation,
    run_oracle,
)
from alig_checks import OracleChecks
from alig_core import AliGConfig, step_size
from alig_core._math import (
    keep_if_skipped,
    momentum_coefficients,
    momentum_update,
    projection_scale,
    sgd_update,
)
from bad_inputs import Driver


class NumpyAliG:
    """A minimal array-namespace adapter over NumPy, built only from alig_core's functions."""

    def __init__(self, params: Sequence[np.ndarray], config: AliGConfig) -> None:
        self.params = [np.array(p) for p in params]
        self.config = config
        self.buffers = [np.zeros_like(p) if config.momentum else None for p in self.params]
        self.gamma = self.gamma_hat = np.zeros((), self.params[0].dtype)
        self.capped = np.zeros((), bool)
        self.steps_taken = self.steps_skipped = 0

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
        self.gamma_hat = keep_if_skipped(np, size.skipped, self.gamma_hat, size.gamma_hat)
        self.capped = keep_if_skipped(np, size.skipped, self.capped, size.capped)
        self.steps_taken += int(not size.skipped)
        self.steps_skipped += int(size.skipped)


class NumpyDriver:
    """:class:`NumpyAliG` seen from the shared checks (``alig_checks``)."""

    framework = "numpy"
    loss_help = ""
    advances_on_skip: frozenset[str] = frozenset()

    def build(self, params: Sequence[np.ndarray], **config: Any) -> None:
        self.adapter = NumpyAliG(params, AliGConfig(**config))

    def step(self, loss: Any, grads: Sequence[np.ndarray | None], *, sparse: bool = False) -> None:
        assert not sparse
        self.adapter.step(Step(loss=loss, grads=tuple(grads), event=None))

    def params(self) -> list[np.ndarray]:
        return [p.copy() for p in self.adapter.params]

    def state(self) -> dict[str, np.ndarray]:
        names = ("gamma", "gamma_hat", "capped", "steps_taken", "steps_skipped")
        return {name: np.asarray(getattr(self.adapter, name)) for name in names}

    def buffers(self) -> list[np.ndarray | None]:
        return [None if b is None else b.copy() for b in self.adapter.buffers]


class TestNumpyAliG(OracleChecks):
    framework = "numpy"
    drivers: ClassVar[dict[str, Callable[[], Driver]]] = {"numpy": NumpyDriver}


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
