"""The extrapolation options: every invalid value raises a ValueError naming it, with the fix."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from abstract_values import AbstractScalar
from alig_core import EXTRAPOLATION_MODES, ExtrapolationConfig
from alig_core._extrapolation_config import validate_lr_x, validate_mode, validate_sigma

nan, inf = math.nan, math.inf

# (keyword arguments, the argument named, text the message must contain)
INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"mode": "extragradient"}, "mode", "'gradient', 'past', 'noise'"),
    ({"mode": "Gradient"}, "mode", "'gradient', 'past', 'noise'"),
    ({"mode": None}, "mode", "'gradient', 'past', 'noise'"),
    ({"mode": 1}, "mode", "'gradient', 'past', 'noise'"),
    ({"lr_x": -0.1}, "lr_x", "finite number >= 0"),
    ({"lr_x": nan}, "lr_x", "finite number >= 0"),
    ({"lr_x": inf}, "lr_x", "finite number >= 0"),
    ({"lr_x": "0.1"}, "lr_x", "finite number >= 0"),
    ({"lr_x": True}, "lr_x", "finite number >= 0"),
    ({"lr_x": [0.1]}, "lr_x", "finite number >= 0"),
    ({"lr_x": np.array([0.1, 0.2])}, "lr_x", "finite number >= 0"),
    ({"lr_x": np.array(1, dtype=np.int64)}, "lr_x", "finite number >= 0"),
    ({"mode": "past", "lr_x": -1.0}, "lr_x", "finite number >= 0"),
    ({"mode": "noise", "sigma": 0.1, "lr_x": 0.1}, "lr_x", "sigma * xi"),
    ({"mode": "noise"}, "sigma", "finite number >= 0"),
    ({"mode": "noise", "sigma": -0.01}, "sigma", "finite number >= 0"),
    ({"mode": "noise", "sigma": nan}, "sigma", "finite number >= 0"),
    ({"mode": "noise", "sigma": inf}, "sigma", "finite number >= 0"),
    ({"mode": "noise", "sigma": "0.1"}, "sigma", "finite number >= 0"),
    ({"mode": "gradient", "sigma": 0.1}, "sigma", "mode='noise' only"),
    ({"mode": "past", "sigma": 0.0}, "sigma", "mode='noise' only"),
    ({"linearized": 1}, "linearized", "True or False"),
    ({"linearized": "yes"}, "linearized", "True or False"),
    ({"linearized": None}, "linearized", "True or False"),
]


@pytest.mark.parametrize(("kwargs", "name", "expected"), INVALID, ids=lambda x: repr(x)[:40])
def test_invalid_value_raises_value_error_naming_argument_value_range_and_fix(
    kwargs: dict[str, Any], name: str, expected: str
) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}") as info:
        ExtrapolationConfig(**kwargs)
    message = str(info.value)
    assert expected in message
    assert repr(kwargs.get(name)) in message  # the value given
    assert "Pass" in message or "Leave" in message  # what to do instead


def _schedule(t: Any) -> Any:
    return 0.1 / (1 + t)


VALID: list[dict[str, Any]] = [
    {},
    {"mode": "gradient", "lr_x": 0.1},
    {"mode": "gradient", "lr_x": 0},  # 0: the wrapper is its base, bit for bit
    {"mode": "past", "lr_x": _schedule, "linearized": False},
    {"mode": "past", "lr_x": np.float32(0.5), "linearized": np.bool_(True)},
    {"mode": "gradient", "lr_x": np.array(0.1)},  # a 0-d array, like a framework's 0-d tensor
    {"mode": "noise", "sigma": 0.01},
    {"mode": "noise", "sigma": 0.0},
    {"mode": "noise", "sigma": np.float64(1e-3)},
]


@pytest.mark.parametrize("kwargs", VALID, ids=lambda x: repr(x)[:40])
def test_valid_values_are_accepted_unchanged(kwargs: dict[str, Any]) -> None:
    config = ExtrapolationConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) is value or getattr(config, name) == value
    assert isinstance(config.linearized, bool)


def test_defaults() -> None:
    config = ExtrapolationConfig()
    assert (config.mode, config.lr_x, config.sigma, config.linearized) == (
        "gradient",
        None,
        None,
        True,
    )
    assert EXTRAPOLATION_MODES == ("gradient", "past", "noise")


def test_config_is_frozen() -> None:
    config = ExtrapolationConfig()
    with pytest.raises(AttributeError):
        config.mode = "past"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mode", "evaluations", "alternates"),
    [("gradient", 2, True), ("past", 1, False), ("noise", 1, False)],
)
def test_evaluations_per_iteration_and_alternation(
    mode: str, evaluations: int, alternates: bool
) -> None:
    config = ExtrapolationConfig(mode=mode, sigma=0.1 if mode == "noise" else None)
    assert config.evaluations_per_iteration == evaluations
    assert config.alternates is alternates


def test_the_validators_are_usable_alone() -> None:
    assert validate_mode("past") == "past"
    assert validate_lr_x(None) is None
    assert validate_lr_x(_schedule) is _schedule
    assert validate_sigma(None, mode="gradient") is None
    assert validate_sigma(0.2, mode="noise") == 0.2


def test_an_abstract_lr_x_that_refuses_float_is_accepted_unchecked() -> None:
    """A traced value (a JAX tracer inside jit) cannot be checked; it was at construction."""
    value = AbstractScalar()
    assert validate_lr_x(value) is value
