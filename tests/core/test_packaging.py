"""The distribution's metadata (pyproject.toml) and the files it names agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_torch_extra_brings_numpy() -> None:
    """torch does not depend on NumPy but warns "Failed to initialize NumPy" on import
    without it: ``pip install alig[torch]`` must bring NumPy so ``import alig_torch`` is quiet."""
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"torch", "numpy"} <= _names(extras["torch"])


def test_the_license_file_is_the_license_pyproject_declares() -> None:
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 alig developers" in text


def test_the_changelog_has_a_section_for_the_version_in_pyproject() -> None:
    version = _pyproject()["project"]["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M)
    assert re.search(r"^## \[Unreleased\]$", changelog, re.M)


def test_the_project_urls_point_at_the_docs_and_the_changelog() -> None:
    urls = _pyproject()["project"]["urls"]
    assert set(urls) == {"Homepage", "Documentation", "Changelog", "Source"}
    assert urls["Documentation"].endswith("/docs")
    assert urls["Changelog"].endswith("/CHANGELOG.md")
    assert (ROOT / "docs").is_dir()
    assert (ROOT / "CHANGELOG.md").is_file()
