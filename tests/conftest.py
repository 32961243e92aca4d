"""Which test folders a run covers: ``ALIG_TEST_FRAMEWORKS`` (einops-style).

``ALIG_TEST_FRAMEWORKS=torch,jax pytest`` collects ``tests/torch`` and ``tests/jax`` only
(``tests/core`` is always collected: it needs NumPy alone). An unknown name, or a named
group whose packages are not installed, stops the run with an error: a test run never
quietly covers less than it was asked to. Unset, every group whose packages import is
collected, and the header says which groups were left out and why.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

GROUPS: dict[str, tuple[str, ...]] = {
    "core": ("numpy", "hypothesis"),
    "torch": ("torch", "expecttest"),  # expecttest: torch.testing._internal's harness
    "jax": ("jax", "optax"),
    "keras": ("keras",),
    "integrations": (
        "torch",
        "lightning",
        "accelerate",
        "transformers",
        "jax",
        "optax",
        "flax",
        "deepspeed",
    ),
    "parity": ("torch", "tensorflow", "keras", "jax", "optax", "sklearn"),
    # the README's and the docs' code blocks (any framework and trainer a page shows) and
    # the site's build tools (tools/)
    "docs": (
        "mkdocs",
        "griffe",
        "torch",
        "tensorflow",
        "keras",
        "jax",
        "optax",
        "flax",
        "lightning",
        "accelerate",
        "transformers",
    ),
    # the complete scripts of examples/, each run at a tiny size (Keras ones on every backend)
    "examples": (
        "torch",
        "tensorflow",
        "keras",
        "jax",
        "optax",
        "flax",
        "lightning",
        "accelerate",
        "transformers",
        "sklearn",
    ),
}
"""Test folder -> the packages it needs."""


def _missing(group: str) -> list[str]:
    return [name for name in GROUPS[group] if importlib.util.find_spec(name) is None]


def _selected_groups() -> tuple[set[str], dict[str, list[str]]]:
    raw = os.environ.get("ALIG_TEST_FRAMEWORKS")
    if raw is None:
        left_out = {g: m for g in GROUPS if (m := _missing(g))}
        return set(GROUPS) - set(left_out), left_out
    names = {n.strip() for n in raw.split(",") if n.strip()}
    unknown = names - set(GROUPS)
    if unknown:
        raise pytest.UsageError(
            f"ALIG_TEST_FRAMEWORKS names unknown test groups {sorted(unknown)}; "
            f"known groups are {sorted(GROUPS)} (comma-separated)."
        )
    for group in names:
        if missing := _missing(group):
            raise pytest.UsageError(
                f"ALIG_TEST_FRAMEWORKS asks for '{group}', but {missing} cannot be imported; "
                f"install them (see noxfile.py) or leave '{group}' out."
            )
    return names | {"core"}, {}


SELECTED, LEFT_OUT = _selected_groups()


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"alig test groups: {', '.join(sorted(SELECTED))}"]
    lines += [f"alig test group '{g}' left out: {m} not installed" for g, m in LEFT_OUT.items()]
    return lines


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    try:
        relative = collection_path.relative_to(TESTS)
    except ValueError:
        return None
    if relative.parts and relative.parts[0] in GROUPS:
        return relative.parts[0] not in SELECTED
    return None
