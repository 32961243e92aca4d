"""The shared bad-input tables (tests/support/bad_inputs.py) and the random runs
(tests/support/alig_properties.py) against alig_jax.alig."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

from alig_checks import BadInputChecks
from alig_properties import RandomRunChecks
from bad_inputs import Driver
from jax_driver import OptaxDriver


class TestOptaxBadInputs(BadInputChecks, RandomRunChecks):
    framework = "jax"
    drivers: ClassVar[dict[str, Callable[[], Driver]]] = {
        "eager": partial(OptaxDriver, jit=False),
        "jit": partial(OptaxDriver, jit=True),
    }
    random_drivers = ("eager",)  # jit would compile every example's configuration anew
    accepted_hyperparameters: ClassVar[dict[tuple[str, Any], str]] = {
        ("momentum", None): "test_jax_generic_invariants.py::test_momentum_none_is_no_momentum",
    }
