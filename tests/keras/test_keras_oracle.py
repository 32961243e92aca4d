"""alig_tf.AliG against the NumPy oracle and keras.optimizers.SGD (the generic checks of
``alig_checks``); on TensorFlow also as a custom loop runs it (a plain tf.function) and
compiled by XLA (``keras_driver.MODES``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import ClassVar

import pytest

from alig_checks import NesterovSGDChecks, OracleChecks
from bad_inputs import Driver
from keras_driver import MODES, KerasDriver, KerasSGD, floatx_scope


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
class TestKerasAliG(OracleChecks, NesterovSGDChecks):
    framework = "keras"
    drivers: ClassVar[dict[str, Callable[[], Driver]]] = {
        mode: partial(KerasDriver, mode) for mode in MODES
    }
    make_sgd = KerasSGD

    def dtype_scope(self, dtype: str) -> AbstractContextManager[object]:
        return floatx_scope(dtype)
