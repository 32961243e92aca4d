"""Every script in ``examples/`` runs to the end at its tiny size, in a process of its own.

The scripts are found by glob, so a new example is covered without touching this file. A
script that imports Keras runs once per Keras backend (``--backend``, ``KERAS_BACKEND``).
A run is skipped only when a package the script imports (read from its source) or the
backend's framework is not installed here, and the skip names the package: the nox
session that runs this folder installs them all. ``tests/examples`` is no group of
``ALIG_TEST_FRAMEWORKS`` (see ``tests/conftest.py``): it is collected whatever that
variable names, and each script asks for what it needs.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
"""Keras' backends; each is also the name of the framework it needs."""
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
TIMEOUT_S = 600


def imported_packages(script: Path) -> set[str]:
    """The top-level packages ``script`` imports anywhere (inside functions too), but the
    standard library's and alig's own."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {
        name
        for name in names
        if name not in sys.stdlib_module_names
        and name != "__future__"
        and not name.startswith("alig_")
    }


def _runs() -> list[object]:
    runs: list[object] = []
    for script in SCRIPTS:
        if "keras" in imported_packages(script):
            runs += [
                pytest.param(script, backend, id=f"{script.stem}-{backend}")
                for backend in KERAS_BACKENDS
            ]
        else:
            runs.append(pytest.param(script, None, id=script.stem))
    return runs


def test_the_examples_folder_holds_scripts() -> None:
    assert len(SCRIPTS) >= 9, [s.name for s in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_every_example_says_what_it_shows_and_how_to_run_it(script: Path) -> None:
    docstring = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8")))
    assert docstring, f"{script.name} has no module docstring"
    for words in ("What it shows:", "Run it:", f"python examples/{script.name}", "--tiny"):
        assert words in docstring, f"{script.name}'s docstring lacks {words!r}"


@pytest.mark.parametrize(("script", "backend"), _runs())
def test_example_runs_at_its_tiny_size(script: Path, backend: str | None, tmp_path: Path) -> None:
    needed = imported_packages(script) | ({backend} if backend else set())
    missing = sorted(name for name in needed if importlib.util.find_spec(name) is None)
    if missing:
        pytest.skip(f"{script.name} needs {missing}, not installed here")
    env = {**os.environ, **QUIET_TF}
    args = [sys.executable, str(script), "--tiny"]
    if backend:
        env["KERAS_BACKEND"] = backend
        args += ["--backend", backend]
    result = subprocess.run(  # cwd: a scratch folder, so that nothing lands in the repository
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(args[1:])} exited with {result.returncode}:\n"
        f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
    )
    assert "final train loss" in result.stdout, result.stdout[-3000:]
