"""Property tests (hypothesis) of the step size and the projection."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from alig_core import step_size
from alig_core._math import projection_scale

finite = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False)
any_float = st.floats(allow_nan=True, allow_infinity=True)
positive = st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0.0, max_value=1e30, allow_nan=False)


@settings(max_examples=500, deadline=None)
@given(loss=any_float, sq_norm=any_float.map(abs), max_lr=positive, eps=non_negative, f_star=finite)
def test_gamma_is_always_in_zero_max_lr(
    loss: float, sq_norm: float, max_lr: float, eps: float, f_star: float
) -> None:
    with np.errstate(all="ignore"):
        s = step_size(
            np, np.float64(loss), np.float64(sq_norm), max_lr=max_lr, eps=eps, f_star=f_star
        )
    gamma = float(s.gamma)
    assert 0.0 <= gamma <= max_lr
    assert bool(s.skipped) == (not (math.isfinite(loss) and math.isfinite(sq_norm)))
    if bool(s.skipped):
        assert gamma == 0.0


arrays = st.lists(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=6),
    min_size=1,
    max_size=4,
)


def _project(params: list[np.ndarray], max_norm: float) -> list[np.ndarray]:
    scale = projection_scale(np, sum(np.sum(p * p) for p in params), max_norm)
    return [p * scale for p in params]


def _norm(params: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(p * p)) for p in params))


@settings(max_examples=300, deadline=None)
@given(values=arrays, max_norm=st.floats(min_value=1e-3, max_value=1e3))
def test_after_projection_the_norm_is_at_most_max_norm(
    values: list[list[float]], max_norm: float
) -> None:
    params = [np.array(v, dtype=np.float64) for v in values]
    projected = _project(params, max_norm)
    assert _norm(projected) <= max_norm * (1 + 1e-12)
    if _norm(params) <= max_norm:  # inside the ball: bit-for-bit untouched
        assert all(a.tobytes() == b.tobytes() for a, b in zip(params, projected, strict=True))


@settings(max_examples=300, deadline=None)
@given(values=arrays, max_norm=st.floats(min_value=1e-3, max_value=1e3))
def test_projection_is_idempotent(values: list[list[float]], max_norm: float) -> None:
    once = _project([np.array(v, dtype=np.float64) for v in values], max_norm)
    twice = _project(once, max_norm)
    for a, b in zip(once, twice, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
