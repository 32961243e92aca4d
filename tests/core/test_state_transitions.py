"""The state transitions every adapter takes from the core: records, projection, dtype, cap.

``alig_core._math.record_step``, ``projection_scale(..., skipped=)``, ``accumulation_dtype`` over
all the parameters' dtypes, and the one rule for "no cap" (``None`` or ``inf``), each in
NumPy and in ``python_scalars`` (torch's host path), against the oracle's records.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from alig_core import AliGConfig, step_size
from alig_core._math import Records, accumulation_dtype, projection_scale, record_step
from alig_core._scalars import python_scalars
from alig_core.oracle import OracleState, oracle_step

_EDGE_VALUES = (0.0, -0.5, 1e-30, 0.3, 2.0, 1e30, math.inf, -math.inf, math.nan)


def _as(xp, value, dtype):
    return value if xp is python_scalars else np.asarray(value, dtype=dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("xp", [np, python_scalars], ids=["numpy", "python_scalars"])
@pytest.mark.parametrize("eps", [0.0, 2.2e-308, 1e-5])
def test_an_infinite_cap_is_no_cap(xp, eps) -> None:
    """``max_lr=inf`` (how torch's group ``lr`` and Keras' learning rate store "no cap") is
    the step of ``max_lr=None`` for every loss and norm, the overflowing quotient included
    (skipped, not an infinite step). Fails on the code before: there an infinite cap let an
    overflowing quotient through as gamma = inf, capped."""
    for loss in _EDGE_VALUES:
        for sq in (v for v in _EDGE_VALUES if not v < 0):
            args = (xp, _as(xp, loss, np.float64), _as(xp, sq, np.float64))
            none = step_size(*args, max_lr=None, eps=eps, f_star=0.0)
            inf = step_size(*args, max_lr=math.inf, eps=eps, f_star=0.0)
            for name, value in none._asdict().items():
                assert np.array_equal(value, getattr(inf, name), equal_nan=True), (
                    name, loss, sq, eps, value, getattr(inf, name)
                )  # fmt: skip
            assert not bool(inf.capped)
            assert math.isfinite(float(inf.gamma))


@pytest.mark.parametrize("xp", [np, python_scalars], ids=["numpy", "python_scalars"])
def test_record_step_moves_the_records_as_the_oracle_does(xp) -> None:
    """Over steps taken, capped, below f_star and skipped (NaN loss, inf norm), the records
    equal the oracle's after every step, and a skipped step keeps the last taken step's."""
    config = AliGConfig(max_lr=0.3, eps=0.0, f_star=0.1)
    zero_int = 0 if xp is python_scalars else np.zeros((), np.int32)
    records = Records(
        gamma=_as(xp, 0.0, np.float64),
        gamma_hat=_as(xp, 0.0, np.float64),
        capped=False if xp is python_scalars else np.bool_(False),
        steps_taken=zero_int,
        steps_skipped=zero_int,
    )
    params, state = [np.array([1.0, -2.0])], OracleState.zeros(1)
    events = [(0.9, 4.0), (5.0, 1.0), (math.nan, 1.0), (0.05, 1.0), (0.7, math.inf), (0.6, 2.0)]
    gammas = set()
    for loss, sq in events:
        grad = np.array([math.sqrt(sq), 0.0]) if math.isfinite(sq) else np.array([math.inf, 0.0])
        params, state = oracle_step(params, [grad], loss, state, config)
        size = step_size(
            xp, _as(xp, loss, np.float64), _as(xp, sq, np.float64),
            max_lr=config.max_lr, eps=config.eps, f_star=config.f_star,
        )  # fmt: skip
        records = record_step(xp, records, size)
        assert float(records.gamma) == pytest.approx(state.gamma, rel=1e-15, abs=0)
        assert float(records.gamma_hat) == pytest.approx(state.gamma_hat, rel=1e-15, abs=0)
        assert bool(records.capped) == state.capped
        assert int(records.steps_taken) == state.steps_taken
        assert int(records.steps_skipped) == state.steps_skipped
        gammas.add(float(records.gamma))
    assert state.steps_skipped == 2
    assert state.steps_taken == 4
    assert len(gammas) >= 3  # gamma moved (capped, not capped, clamped at 0)
    if xp is np:  # the counters keep their dtype: an adapter writes them back as they are
        assert records.steps_taken.dtype == np.int32
        assert records.steps_skipped.dtype == np.int32


def test_record_step_keeps_the_old_records_bit_for_bit_on_a_skipped_step() -> None:
    old = Records(np.float32(0.123), np.float32(-4.5), np.bool_(True), np.int64(7), np.int64(2))
    size = step_size(np, np.float32(np.nan), np.float32(1.0), max_lr=0.1, eps=0.0, f_star=0.0)
    new = record_step(np, old, size)
    assert new.gamma.tobytes() == old.gamma.tobytes()
    assert new.gamma_hat.tobytes() == old.gamma_hat.tobytes()
    assert bool(new.capped) is True
    assert (int(new.steps_taken), int(new.steps_skipped)) == (7, 3)
    assert new.steps_taken.dtype == np.int64


@pytest.mark.parametrize("xp", [np, python_scalars], ids=["numpy", "python_scalars"])
def test_a_skipped_step_projects_nothing(xp) -> None:
    for sq in (0.0, 1.0, 6.25, 25.0, 1e300):
        scale = projection_scale(xp, _as(xp, sq, np.float64), 2.5)
        taken = projection_scale(xp, _as(xp, sq, np.float64), 2.5, skipped=_as(xp, False, bool))
        skipped = projection_scale(xp, _as(xp, sq, np.float64), 2.5, skipped=_as(xp, True, bool))
        assert float(taken) == float(scale)
        assert float(skipped) == 1.0
    assert float(projection_scale(xp, _as(xp, 25.0, np.float64), 2.5)) == 0.5


def test_accumulation_dtype_over_all_parameter_dtypes() -> None:
    assert accumulation_dtype() == "float32"  # no parameter: the least
    assert accumulation_dtype("bfloat16", "float16", "float32") == "float32"
    assert accumulation_dtype("bfloat16", "torch.float64") == "float64"
    assert accumulation_dtype(np.dtype("float32"), np.dtype("float64")) == "float64"
    assert accumulation_dtype("double") == "float64"
