"""``alig_core._extrapolation_config.validate_seed``: the noise seed rule every adapter calls."""

from __future__ import annotations

import pytest

from alig_core._extrapolation_config import validate_seed


def test_a_seed_is_taken_in_noise_mode_only() -> None:
    assert validate_seed(None, mode="noise") == 0
    assert validate_seed(None, mode="gradient") == 0
    assert validate_seed(5, mode="noise") == 5
    assert validate_seed(2**40, mode="noise") == 2**40  # no bound given: any int >= 0
    with pytest.raises(ValueError, match=r"Invalid seed: got 3 .*mode='past'.*expected None"):
        validate_seed(3, mode="past")


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_a_seed_is_an_int_at_least_zero(seed: object) -> None:
    with pytest.raises(ValueError, match=r"Invalid seed: got .*expected an int >= 0"):
        validate_seed(seed, mode="noise")


def test_an_adapter_bound_is_enforced_and_named() -> None:
    assert validate_seed(2**31 - 1, mode="noise", below=2**31) == 2**31 - 1
    with pytest.raises(ValueError, match=r"expected an int in \[0, 2\*\*31\)"):
        validate_seed(2**31, mode="noise", below=2**31)
    with pytest.raises(ValueError, match=r"expected an int in \[0, 1000\)"):
        validate_seed(1000, mode="noise", below=1000)
