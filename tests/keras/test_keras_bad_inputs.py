"""The shared bad-input tables (tests/support/bad_inputs.py) run against alig_tf.AliG.

Runs once per Keras backend (nox sessions tf, keras_jax, keras_torch), in float64 (the
learning-rate variable too: the rows' oracle checks are in float64), with the random-run
suite that torch and optax run too (alig_properties.RandomRunChecks).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import ClassVar

from alig_checks import BadInputChecks
from alig_properties import RandomRunChecks
from bad_inputs import Driver
from keras_driver import KerasDriver, floatx_scope


class TestKerasBadInputs(BadInputChecks, RandomRunChecks):
    framework = "keras"
    drivers: ClassVar[dict[str, Callable[[], Driver]]] = {"eager": KerasDriver}

    def dtype_scope(self, dtype: str) -> AbstractContextManager[object]:
        return floatx_scope(dtype)
