"""The shared bad-input tables (tests/support/bad_inputs.py) run against alig_torch.AliG."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

from hypothesis import given, settings
from hypothesis import strategies as st

from alig_checks import BadInputChecks
from alig_properties import check_random_run, configs, runs
from bad_inputs import Driver
from torch_driver import TorchDriver


class TestTorchBadInputs(BadInputChecks):
    framework = "torch"
    drivers: ClassVar[dict[str, Callable[[], Driver]]] = {
        "single_tensor": partial(TorchDriver, foreach=False),
        "foreach": partial(TorchDriver, foreach=True),
    }


@settings(max_examples=60, deadline=None)
@given(config=configs, run=runs, foreach=st.booleans())
def test_random_configurations_and_sequences_follow_the_oracle(config, run, foreach) -> None:
    check_random_run(lambda: TorchDriver(foreach=foreach), config, run)
