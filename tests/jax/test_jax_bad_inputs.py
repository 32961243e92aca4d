"""The shared bad-input tables (tests/support/bad_inputs.py) run against alig_jax.alig."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

from hypothesis import given, settings

from alig_checks import BadInputChecks
from alig_properties import check_random_run, configs, runs
from bad_inputs import Driver
from jax_driver import OptaxDriver


class TestOptaxBadInputs(BadInputChecks):
    framework = "jax"
    drivers: ClassVar[dict[str, Callable[[], Driver]]] = {
        "eager": partial(OptaxDriver, jit=False),
        "jit": partial(OptaxDriver, jit=True),
    }


@settings(max_examples=60, deadline=None)
@given(config=configs, run=runs)
def test_random_configurations_and_sequences_follow_the_oracle(config, run) -> None:
    check_random_run(lambda: OptaxDriver(jit=False), config, run)
