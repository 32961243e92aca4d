"""alig_tf.Extrapolation against the NumPy oracle on the shared extrapolation table.

Every mode x base (keras.optimizers.SGD(nesterov=True), AliG standard and adjusted, with and
without projection) x call form (alternating: model.fit's; same batch: a custom loop that
applies twice on one batch), driven with the table's (loss, gradient) evaluations and run as
model.fit runs an optimizer on this backend (TensorFlow: XLA; JAX: ``jax.jit`` of
``stateless_apply``; torch: eagerly); after every call the weights, the anchor, the phase,
the counters, the base's buffers and ALI-G's gamma agree with the oracle (float64: 100
iterations within 1e-10; float32: 20 within 1e-5); skipped iterations leave everything bit
for bit; d = 0 equals the bare base bit for bit.

The table's "past" and "noise" rows of the same-batch form are the same loop as their
alternating rows (one evaluation per call either way) and are run once.

Keras' SGD(nesterov=True) keeps the learning rate in its buffer (``m <- mu*m - lr*g;
w <- w + mu*m - lr*g``) and the oracle's SGD does not (``b <- mu*b + g; w <- w - lr*(g +
mu*b)``): with a constant lr, ``m = -lr*b`` and the weights are the same up to rounding, so
the weights are compared as they are and Keras' buffers with ``-lr*b``. On TensorFlow,
Keras 3.15's SGD casts its Python-float momentum through float32 (``ops.cast(0.9,
"float64")`` is 0.8999999761581421 there), so its oracle base has that momentum.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import ClassVar

import pytest

from extrapolation_cases import CASES, find_case
from extrapolation_checks import (
    PLAIN_CASES,
    ExtrapolationOracleChecks,
    MakeRun,
    check_against_oracle,
)
from keras_driver import floatx_scope
from worker_scripts import import_script

HARNESS = import_script(Path(__file__).with_name("extrapolation_worker.py"))

KERAS_CASES = tuple(c for c in CASES if c.mode == "gradient" or c.call_form == "alternating")
"""The table without the same-batch rows of "past" and "noise" (the alternating loop)."""

OTHER_MODES = tuple(m for m in HARNESS.MODES if m != HARNESS.DEFAULT_MODE)
"""Execution modes besides model.fit's (TensorFlow: a plain tf.function, eager; JAX: eager)."""

OTHER_MODE_CASES = (
    "gradient-alig_adjusted_projected-alternating",
    "gradient-sgd_nesterov-same_batch",
    "past-alig_standard-alternating",
    "noise-alig_standard_projected-alternating",
)

pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist")


class TestOracle(ExtrapolationOracleChecks):
    """The shared extrapolation table (``extrapolation_checks``), run as model.fit runs the
    optimizer on this backend; the d = 0 runs eagerly (an XLA compilation may fuse the
    base's arithmetic differently in two programs), over 50 iterations (slow on TensorFlow;
    the events recur every 31 evaluations, so skips at the anchor and at the update happen
    in each run)."""

    make_run: ClassVar[MakeRun] = HARNESS.KerasRun
    cases = KERAS_CASES
    zero_run: ClassVar[MakeRun] = partial(HARNESS.KerasRun, mode="eager")
    zero_cases = tuple(c for c in PLAIN_CASES if c in KERAS_CASES)
    zero_iterations = 50

    def dtype_scope(self, dtype: str) -> AbstractContextManager[object]:
        return floatx_scope(dtype)


@pytest.mark.skipif(not OTHER_MODES, reason="torch steps eagerly only")
@pytest.mark.parametrize("mode", OTHER_MODES)
@pytest.mark.parametrize("name", OTHER_MODE_CASES)
def test_other_execution_modes_match_the_oracle(name: str, mode: str) -> None:
    """A custom loop's ways: TensorFlow without XLA (tf.function) and eagerly, JAX eagerly."""
    make_run = partial(HARNESS.KerasRun, mode=mode)
    check_against_oracle(make_run, find_case(name), "float64", same_sequence=True)
