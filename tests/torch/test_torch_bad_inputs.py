"""The shared bad-input tables (tests/support/bad_inputs.py) and the random runs
(tests/support/alig_properties.py) against alig_torch.AliG, on both step paths."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

from alig_checks import BadInputChecks
from alig_properties import RandomRunChecks
from bad_inputs import Driver
from torch_driver import TorchDriver


class TestTorchBadInputs(BadInputChecks, RandomRunChecks):
    framework = "torch"
    drivers: ClassVar[dict[str, Callable[[], Driver]]] = {
        "single_tensor": partial(TorchDriver, foreach=False),
        "foreach": partial(TorchDriver, foreach=True),
    }
