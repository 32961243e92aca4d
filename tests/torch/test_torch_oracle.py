"""alig_torch.AliG against the NumPy oracle and torch.optim.SGD (the generic checks of
``alig_checks``), on both CPU step paths."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

import pytest

from alig_cases import CASES, initial_params, make_sequence, max_relative_deviation
from alig_checks import NesterovSGDChecks, OracleChecks
from bad_inputs import Driver
from torch_driver import TorchDriver, TorchSGD

PATHS = {"single_tensor": False, "foreach": True}


class TestTorchAliG(OracleChecks, NesterovSGDChecks):
    framework = "torch"
    drivers: ClassVar[dict[str, Callable[[], Driver]]] = {
        name: partial(TorchDriver, foreach=foreach) for name, foreach in PATHS.items()
    }
    make_sgd = TorchSGD


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_foreach_equals_single_tensor(dtype: str) -> None:
    sequence = make_sequence(60, dtype)
    for case in CASES:
        runs = []
        for foreach in PATHS.values():
            driver = TorchDriver(foreach=foreach)
            driver.build(initial_params(dtype), **case.kwargs)
            for step in sequence:
                driver.step(step.loss, step.grads)
            runs.append(driver.params())
        tolerance = 1e-14 if dtype == "float64" else 1e-6
        assert max_relative_deviation(runs[0], runs[1]) <= tolerance, case.name
