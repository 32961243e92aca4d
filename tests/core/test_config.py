"""The validation table: every invalid hyperparameter raises a ValueError naming it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from abstract_values import AbstractScalar
from alig_core import AliGConfig
from alig_core._config import validate_max_lr

nan, inf = math.nan, math.inf

# (argument, invalid value, text the message must contain besides the name and the value)
INVALID: list[tuple[str, Any, str]] = [
    ("max_lr", 0.0, "finite number > 0"),
    ("max_lr", -0.1, "finite number > 0"),
    ("max_lr", nan, "finite number > 0"),
    ("max_lr", inf, "finite number > 0"),
    ("max_lr", "0.1", "finite number > 0"),
    ("max_lr", True, "finite number > 0"),
    ("max_lr", [0.1], "finite number > 0"),
    ("momentum", -0.1, "0 <= momentum < 1"),
    ("momentum", 1.0, "0 <= momentum < 1"),
    ("momentum", 1.5, "0 <= momentum < 1"),
    ("momentum", nan, "0 <= momentum < 1"),
    ("momentum", inf, "0 <= momentum < 1"),
    ("momentum", None, "0 <= momentum < 1"),
    ("momentum", "0.9", "0 <= momentum < 1"),
    ("adjusted_momentum", 1, "True or False"),
    ("adjusted_momentum", "yes", "True or False"),
    ("adjusted_momentum", None, "True or False"),
    ("eps", -1e-8, "finite number >= 0"),
    ("eps", nan, "finite number >= 0"),
    ("eps", inf, "finite number >= 0"),
    ("eps", None, "finite number >= 0"),
    ("f_star", nan, "finite number"),
    ("f_star", -inf, "finite number"),
    ("f_star", inf, "finite number"),
    ("f_star", "0", "finite number"),
    ("max_norm", 0.0, "finite number > 0"),
    ("max_norm", -1.0, "finite number > 0"),
    ("max_norm", nan, "finite number > 0"),
    ("max_norm", inf, "finite number > 0"),
    ("max_norm", np.array([1.0, 2.0]), "finite number > 0"),
    ("max_lr", np.array(1, dtype=np.int64), "finite number > 0"),
]


@pytest.mark.parametrize(("name", "value", "expected"), INVALID, ids=lambda x: repr(x)[:20])
def test_invalid_value_raises_value_error_naming_argument_value_and_range(
    name: str, value: Any, expected: str
) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}") as info:
        AliGConfig(**{name: value})
    message = str(info.value)
    assert expected in message
    assert repr(value) in message
    assert "Pass" in message  # says what to do instead


VALID: list[dict[str, Any]] = [
    {},
    {"max_lr": 0.1, "momentum": 0.9, "adjusted_momentum": True},
    {"max_lr": 1, "momentum": 0, "eps": 0, "f_star": -3, "max_norm": 10},
    {"max_lr": np.float32(0.5), "momentum": np.float64(0.5), "adjusted_momentum": np.bool_(True)},
    {"max_lr": np.array(0.1)},  # a 0-d array, like a framework's 0-d tensor
    {"f_star": -1e30, "eps": 1e30},
]


@pytest.mark.parametrize("kwargs", VALID)
def test_valid_values_are_accepted_unchanged(kwargs: dict[str, Any]) -> None:
    config = AliGConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) == value
    assert isinstance(config.adjusted_momentum, bool)


def test_defaults_match_the_spec() -> None:
    config = AliGConfig()
    assert (config.max_lr, config.momentum, config.adjusted_momentum) == (None, 0.0, False)
    assert (config.eps, config.f_star, config.max_norm) == (1e-5, 0.0, None)


def test_config_is_frozen() -> None:
    config = AliGConfig(max_lr=0.1)
    with pytest.raises(AttributeError):
        config.max_lr = 0.2  # type: ignore[misc]


def test_schedule_is_accepted_only_where_allowed() -> None:
    def schedule(count: Any) -> float:
        return 0.1

    assert AliGConfig(max_lr=schedule).max_lr is schedule
    with pytest.raises(ValueError, match="Invalid max_lr"):
        validate_max_lr(schedule)


def test_abstract_value_that_refuses_float_is_accepted_unchecked() -> None:
    traced = AbstractScalar()
    assert AliGConfig(max_lr=traced, momentum=traced).momentum is traced  # type: ignore[arg-type]
