"""alig_jax.alig against the NumPy oracle and optax.sgd (the generic checks of
``alig_checks``), its update jitted."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

from alig_checks import NesterovSGDChecks, OracleChecks
from bad_inputs import Driver
from jax_driver import OptaxDriver, OptaxSGD


class TestOptaxAliG(OracleChecks, NesterovSGDChecks):
    framework = "jax"
    drivers: ClassVar[dict[str, Callable[[], Driver]]] = {"jit": partial(OptaxDriver, jit=True)}
    make_sgd = OptaxSGD
