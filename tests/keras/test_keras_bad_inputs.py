"""The shared bad-input tables (tests/support/bad_inputs.py) run against alig_tf.AliG.

Runs once per Keras backend (nox sessions tf, keras_jax, keras_torch), in float64 (the
learning-rate variable too: the rows' oracle checks are in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import ClassVar

from hypothesis import given, settings

from alig_checks import BadInputChecks
from alig_properties import check_random_run, configs, runs
from bad_inputs import Driver
from keras_driver import KerasDriver, floatx_scope


class TestKerasBadInputs(BadInputChecks):
    framework = "keras"
    drivers: ClassVar[dict[str, Callable[[], Driver]]] = {"eager": KerasDriver}

    def dtype_scope(self, dtype: str) -> AbstractContextManager[object]:
        return floatx_scope(dtype)


@settings(max_examples=40, deadline=None)
@given(config=configs, run=runs)
def test_random_configurations_and_sequences_follow_the_oracle(config, run) -> None:
    with floatx_scope("float64"):
        check_random_run(KerasDriver, config, run)
