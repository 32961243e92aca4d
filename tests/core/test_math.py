"""The generic functions of alig_core, with NumPy as the array namespace."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alig_core import AliGConfig, step_size
from alig_core._math import (
    accumulation_dtype,
    keep_if_skipped,
    momentum_coefficients,
    momentum_update,
    projection_scale,
    sgd_update,
)
from alig_core._scalars import python_scalars
from alig_core.oracle import OracleState, oracle_step, project_onto_ball


def _step_size(loss: float, sq_norm: float, **kwargs: float | None):
    params = {"max_lr": None, "eps": 0.0, "f_star": 0.0} | kwargs
    return step_size(np, np.float64(loss), np.float64(sq_norm), **params)


# ---------------------------------------------------------------- step size edge cases


def test_polyak_step_below_the_cap_is_taken_as_is() -> None:
    s = _step_size(1.0, 4.0, max_lr=1.0)
    assert (float(s.gamma), float(s.gamma_hat), bool(s.capped), bool(s.skipped)) == (
        0.25,
        0.25,
        False,
        False,
    )


def test_polyak_step_above_the_cap_is_capped() -> None:
    s = _step_size(1.0, 4.0, max_lr=0.1)
    assert (float(s.gamma), float(s.gamma_hat), bool(s.capped)) == (0.1, 0.25, True)


def test_no_cap_when_max_lr_is_none() -> None:
    s = _step_size(1e6, 1e-6)
    assert float(s.gamma) == pytest.approx(1e12)
    assert not bool(s.capped)


def test_eps_and_f_star_enter_the_step_size() -> None:
    s = _step_size(1.0, 3.0, eps=1.0, f_star=0.5)
    assert float(s.gamma) == pytest.approx(0.5 / 4.0)


def test_gap_below_zero_gives_no_ascent_step() -> None:
    s = _step_size(0.2, 4.0, f_star=0.5, max_lr=1.0)
    assert float(s.gamma_hat) < 0
    assert float(s.gamma) == 0.0
    assert not bool(s.capped)
    assert not bool(s.skipped)


@pytest.mark.parametrize("cap", [-0.1, np.float64(-1e-12), -math.inf])
def test_a_cap_below_zero_at_step_time_gives_no_ascent_step(cap) -> None:
    # a schedule or a hand-set group lr can reach the step below 0: gamma stays at 0
    s = step_size(np, np.float64(1.0), np.float64(4.0), max_lr=cap, eps=0.0, f_star=0.0)
    assert float(s.gamma) == 0.0
    assert bool(s.capped)
    assert not bool(s.skipped)


def test_a_cap_of_exactly_zero_is_hit_and_gamma_hat_equal_to_the_cap_is_capped() -> None:
    at_zero = step_size(np, np.float64(1.0), np.float64(4.0), max_lr=0.0, eps=0.0, f_star=0.0)
    assert (float(at_zero.gamma), bool(at_zero.capped)) == (0.0, True)
    at_cap = step_size(np, np.float64(1.0), np.float64(4.0), max_lr=0.25, eps=0.0, f_star=0.0)
    assert (float(at_cap.gamma), float(at_cap.gamma_hat), bool(at_cap.capped)) == (0.25, 0.25, True)


def test_zero_denominator_gives_gamma_zero_not_nan() -> None:
    s = _step_size(1.0, 0.0, eps=0.0, max_lr=1.0)
    assert (float(s.gamma), float(s.gamma_hat), bool(s.skipped)) == (0.0, 0.0, False)


@pytest.mark.parametrize(
    ("loss", "sq_norm"),
    [(math.nan, 1.0), (math.inf, 1.0), (-math.inf, 1.0), (1.0, math.nan), (1.0, math.inf)],
)
def test_non_finite_loss_or_norm_is_a_skipped_step_with_gamma_zero(
    loss: float, sq_norm: float
) -> None:
    s = _step_size(loss, sq_norm, max_lr=0.1)
    assert bool(s.skipped)
    assert float(s.gamma) == 0.0
    assert not bool(s.capped)


def test_float32_inputs_stay_float32() -> None:
    s = step_size(np, np.float32(1.0), np.float32(3.0), max_lr=0.1, eps=1e-5, f_star=0.0)
    assert s.gamma.dtype == np.float32
    assert s.gamma_hat.dtype == np.float32


def test_cap_may_be_an_array() -> None:
    s = step_size(np, np.float64(1.0), np.float64(4.0), max_lr=np.float64(0.2), eps=0, f_star=0)
    assert float(s.gamma) == 0.2


def test_accumulation_dtype_is_at_least_float32() -> None:
    assert accumulation_dtype("float16") == "float32"
    assert accumulation_dtype("bfloat16") == "float32"
    assert accumulation_dtype("float32") == "float32"
    assert accumulation_dtype("torch.float64") == "float64"


# ---------------------------------------------------------------- momentum, by hand

# Three steps on one scalar parameter p0 = 1 with gradients 1, 2, -1 and gammas .5, .25, .1,
# mu = .5, computed by hand from SPEC.md.
GRADS = [1.0, 2.0, -1.0]
GAMMAS = [0.5, 0.25, 0.1]
MU = 0.5
# standard: b <- mu b - gamma g ; p <- p - gamma g + mu b
#   b1 = -0.5            p1 = 1 - 0.5 - 0.25 = 0.25
#   b2 = -0.25 - 0.5 = -0.75   p2 = 0.25 - 0.5 - 0.375 = -0.625
#   b3 = -0.375 + 0.1 = -0.275 p3 = -0.625 + 0.1 - 0.1375 = -0.6625
STANDARD = [(0.25, -0.5), (-0.625, -0.75), (-0.6625, -0.275)]
# adjusted: b <- mu b - g ; p <- p - gamma g + gamma mu b
#   b1 = -1              p1 = 1 - 0.5 - 0.25 = 0.25
#   b2 = -0.5 - 2 = -2.5 p2 = 0.25 - 0.5 - 0.3125 = -0.5625
#   b3 = -1.25 + 1 = -0.25  p3 = -0.5625 + 0.1 - 0.0125 = -0.475
ADJUSTED = [(0.25, -1.0), (-0.5625, -2.5), (-0.475, -0.25)]


@pytest.mark.parametrize(("adjusted", "expected"), [(False, STANDARD), (True, ADJUSTED)])
def test_momentum_conventions_match_hand_computed_values(
    adjusted: bool, expected: list[tuple[float, float]]
) -> None:
    p, b = 1.0, 0.0
    for g, gamma, (p_expected, b_expected) in zip(GRADS, GAMMAS, expected, strict=True):
        c = momentum_coefficients(gamma, momentum=MU, adjusted_momentum=adjusted)
        p, b = momentum_update(p, g, b, c)
        assert p == pytest.approx(p_expected, abs=1e-15)
        assert b == pytest.approx(b_expected, abs=1e-15)


@pytest.mark.parametrize(("adjusted", "expected"), [(False, STANDARD), (True, ADJUSTED)])
def test_oracle_matches_hand_computed_values(
    adjusted: bool, expected: list[tuple[float, float]]
) -> None:
    # With eps = 0 and S = g^2, gamma_hat = loss / g^2: choose the loss that gives each gamma.
    config = AliGConfig(momentum=MU, adjusted_momentum=adjusted, eps=0.0)
    params, state = [np.array(1.0)], OracleState.zeros(1)
    for g, gamma, (p_expected, b_expected) in zip(GRADS, GAMMAS, expected, strict=True):
        params, state = oracle_step(params, [np.array(g)], gamma * g * g, state, config)
        assert state.gamma == pytest.approx(gamma, abs=1e-15)
        assert float(params[0]) == pytest.approx(p_expected, abs=1e-15)
        assert float(state.buffers[0]) == pytest.approx(b_expected, abs=1e-15)


def test_conventions_agree_while_gamma_is_constant() -> None:
    p_std, b_std, p_adj, b_adj = 1.0, 0.0, 1.0, 0.0
    for g in GRADS:
        p_std, b_std = momentum_update(
            p_std, g, b_std, momentum_coefficients(0.3, momentum=MU, adjusted_momentum=False)
        )
        p_adj, b_adj = momentum_update(
            p_adj, g, b_adj, momentum_coefficients(0.3, momentum=MU, adjusted_momentum=True)
        )
        assert p_std == pytest.approx(p_adj, abs=1e-15)


def test_sgd_update_without_momentum() -> None:
    assert sgd_update(1.0, 2.0, 0.25) == 0.5


# ---------------------------------------------------------------- projection


def test_projection_inside_the_ball_is_exactly_one() -> None:
    assert float(projection_scale(np, np.float64(4.0), 2.0)) == 1.0  # on the sphere
    assert float(projection_scale(np, np.float64(1.0), 2.0)) == 1.0


def test_projection_outside_the_ball_scales_to_the_radius() -> None:
    params = [np.array([3.0, 0.0]), np.array([[0.0, 4.0]])]
    sq_norm = sum(float(np.sum(p * p)) for p in params)
    scale = projection_scale(np, np.float64(sq_norm), 2.5)
    assert float(scale) == 0.5
    projected = [p * scale for p in params]
    assert math.sqrt(sum(float(np.sum(p * p)) for p in projected)) == pytest.approx(2.5)
    oracle = project_onto_ball(params, 2.5)
    for a, b in zip(projected, oracle, strict=True):
        np.testing.assert_array_equal(a, b)


def test_oracle_projection_leaves_buffers_untouched_and_covers_params_without_grad() -> None:
    config = AliGConfig(max_lr=0.1, momentum=0.9, max_norm=1.0)
    params = [np.array([3.0]), np.array([4.0])]
    new_params, state = oracle_step(
        params, [np.array([1.0]), None], 10.0, OracleState.zeros(2), config
    )
    # p0 = 3 - 0.1 - 0.09 = 2.81 before projection; b0 = -0.1; the norm covers p1 = 4 too.
    norm = math.hypot(2.81, 4.0)
    assert float(new_params[0][0]) == pytest.approx(2.81 / norm)
    assert float(new_params[1][0]) == pytest.approx(4.0 / norm)
    assert float(state.buffers[0][0]) == pytest.approx(-0.1)
    assert state.buffers[1] is None


# ---------------------------------------------------------------- skipping


def test_keep_if_skipped_selects_bitwise() -> None:
    old, new = np.array([-0.0, 1.5]), np.array([np.nan, 2.0])
    kept = keep_if_skipped(np, np.bool_(True), old, new)
    assert kept.tobytes() == old.tobytes()
    np.testing.assert_array_equal(keep_if_skipped(np, np.bool_(False), old, new), new)


@pytest.mark.parametrize(
    ("loss", "grad"), [(math.nan, 1.0), (math.inf, 1.0), (1.0, math.nan), (1.0, -math.inf)]
)
def test_oracle_skips_non_finite_steps_with_nothing_changed(loss: float, grad: float) -> None:
    config = AliGConfig(max_lr=0.1, momentum=0.9, max_norm=0.5)
    params = [np.array([1.0, -0.0])]
    params, state = oracle_step(params, [np.array([1.0, 1.0])], 1.0, OracleState.zeros(1), config)
    new_params, new_state = oracle_step(params, [np.array([grad, 1.0])], loss, state, config)
    assert new_params[0].tobytes() == params[0].tobytes()
    assert new_state.buffers[0].tobytes() == state.buffers[0].tobytes()
    assert (new_state.gamma, new_state.gamma_hat, new_state.capped) == (
        state.gamma,
        state.gamma_hat,
        state.capped,
    )
    assert (new_state.steps_taken, new_state.steps_skipped) == (1, 1)


_EDGE_VALUES = (0.0, -0.5, 1e-30, 0.3, 2.0, 1e30, math.inf, -math.inf, math.nan)


@pytest.mark.parametrize("max_lr", [None, 0.1])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_python_scalars_give_numpy_float64_step_sizes(max_lr, eps) -> None:
    """The host namespace (torch's CPU path) is the same math as NumPy, value for value."""
    for loss in _EDGE_VALUES:
        for sq_norm in (v for v in _EDGE_VALUES if not v < 0):
            with np.errstate(all="ignore"):
                expected = step_size(
                    np, np.float64(loss), np.float64(sq_norm), max_lr=max_lr, eps=eps, f_star=0.2
                )
            got = step_size(python_scalars, loss, sq_norm, max_lr=max_lr, eps=eps, f_star=0.2)
            for name, value in got._asdict().items():
                assert np.array_equal(value, getattr(expected, name), equal_nan=True), (
                    name, loss, sq_norm, value, getattr(expected, name)
                )  # fmt: skip
    for sq in (0.0, 1.0, 6.25, 1e300):
        assert projection_scale(python_scalars, sq, 2.5) == float(
            projection_scale(np, np.float64(sq), 2.5)
        )


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy's, expected
@pytest.mark.parametrize("xp", [np, python_scalars], ids=["numpy", "python_scalars"])
def test_an_overflowing_uncapped_step_size_is_a_skipped_step(xp) -> None:
    """Zero gradients with a subnormal eps: (l - f_star) / eps overflows. Without a cap that
    is an infinite step (and inf * 0 = NaN parameters): skipped. With a cap it is capped."""
    eps = 2.2e-308
    loss, zero = (np.float64(1e4), np.float64(0.0)) if xp is np else (1e4, 0.0)
    uncapped = step_size(xp, loss, zero, max_lr=None, eps=eps, f_star=0.0)
    assert bool(uncapped.skipped)
    assert float(uncapped.gamma) == 0.0
    capped = step_size(xp, loss, zero, max_lr=0.1, eps=eps, f_star=0.0)
    assert not bool(capped.skipped)
    assert float(capped.gamma) == 0.1
    assert bool(capped.capped)


def test_oracle_skips_an_overflowing_uncapped_step() -> None:
    params = [np.array([1.0, -2.0])]
    state = OracleState.zeros(1)
    config = AliGConfig(max_lr=None, momentum=0.9, eps=2.2e-308)
    new_params, new_state = oracle_step(params, [np.zeros(2)], 1e4, state, config)
    assert new_state.steps_skipped == 1
    assert new_state.steps_taken == 0
    np.testing.assert_array_equal(new_params[0], params[0])
    capped = AliGConfig(max_lr=0.1, momentum=0.9, eps=2.2e-308)
    new_params, new_state = oracle_step(params, [np.zeros(2)], 1e4, state, capped)
    assert new_state.steps_taken == 1
    assert new_state.gamma == 0.1
