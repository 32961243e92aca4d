"""Every package's ``__version__`` is the installed ``alig`` distribution's version."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

import pytest

from alig_core._version import UNKNOWN_VERSION, distribution_version

NEEDS = {
    "alig_core": (),
    "alig_torch": ("torch",),
    "alig_jax": ("jax", "optax"),
    "alig_tf": ("keras",),
}
"""Package -> the frameworks it imports. tests/core runs in every nox session, so each
adapter's check runs in the sessions that install its framework (alig_core's in all)."""


@pytest.mark.parametrize("package", NEEDS)
def test_version_is_the_distributions(package: str) -> None:
    missing = [name for name in NEEDS[package] if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{package} needs {missing}, not installed in this session")
    module = importlib.import_module(package)
    assert module.__version__ == importlib.metadata.version("alig")
    assert module.__version__ != UNKNOWN_VERSION


def test_a_distribution_that_is_not_installed_has_the_unknown_version() -> None:
    assert distribution_version("alig-no-such-distribution") == UNKNOWN_VERSION == "0+unknown"
