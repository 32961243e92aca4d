"""alig_tf.AliG against the NumPy oracle on every configuration of the shared table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest

from alig_cases import (
    CASES,
    Case,
    initial_params,
    make_sequence,
    max_relative_deviation,
    run_oracle,
    tolerance,
)
from alig_tf import AliG

# On TensorFlow the step is also run as a custom loop runs it (a plain tf.function) and
# compiled by XLA: each takes its own path through the norm and the skipped-step select.
MODES = ["eager", "graph", "xla"] if keras.backend.backend() == "tensorflow" else ["eager"]


def _stepper(
    opt: AliG, variables: list[keras.Variable], mode: str, dtype: str
) -> Callable[[list[Any], float], None]:
    """``apply(grads, variables, loss=loss)``, eagerly or inside a tf.function (``mode``)."""
    if mode == "eager":
        return lambda grads, loss: opt.apply(grads, variables, loss=loss)
    import tensorflow as tf

    @tf.function(jit_compile=mode == "xla")
    def compiled(grads: list[Any], loss: Any) -> None:
        opt.apply(grads, variables, loss=loss)

    return lambda grads, loss: compiled(grads, tf.constant(loss, dtype=dtype))


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_oracle_step_by_step(case: Case, dtype: str, mode: str, floatx) -> None:
    floatx(dtype)
    steps, tol = tolerance(dtype)
    sequence = make_sequence(steps, dtype, pinned=case.pinned_at_cap)
    history = run_oracle(case.config, initial_params(dtype), sequence)
    variables = [keras.Variable(p, dtype=dtype) for p in initial_params(dtype)]
    opt = AliG(**case.kwargs)
    opt.build(variables)
    apply = _stepper(opt, variables, mode, dtype)
    for t, (step, (expected, state)) in enumerate(zip(sequence, history, strict=True)):
        grads = [None if g is None else keras.ops.convert_to_tensor(g) for g in step.grads]
        apply(grads, step.loss)
        actual = [keras.ops.convert_to_numpy(v.value) for v in variables]
        assert max_relative_deviation(actual, expected) <= tol, f"step {t} ({step.event})"
        assert float(opt.gamma.numpy()) == pytest.approx(state.gamma, rel=tol, abs=tol)
        assert float(opt.gamma_hat.numpy()) == pytest.approx(state.gamma_hat, rel=tol, abs=tol)
        assert bool(opt.capped.numpy()) == state.capped
        assert int(opt.steps_taken.numpy()) == state.steps_taken
        assert int(opt.steps_skipped.numpy()) == state.steps_skipped
        assert len(opt.momentums) == (len(variables) if case.config.momentum else 0)
        for buffer, theirs in zip(opt.momentums, state.buffers, strict=False):
            ours = keras.ops.convert_to_numpy(buffer.value)
            if theirs is None:
                assert not np.any(ours)
            else:
                assert max_relative_deviation([ours], [theirs]) <= tol * 10
