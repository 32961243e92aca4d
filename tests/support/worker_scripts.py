"""Tests that run a worker script in a new process, and import the same script in this one.

A checkpoint must resume in a *new* process, and data-parallel ranks are processes of
their own: such tests run ``tests/<group>/*_worker.py`` with :func:`run_script` and use
its functions in-process through :func:`import_script` (for the reference run). What an
import statement loads is only seen in a fresh interpreter: :func:`modules_loaded_by`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["SUPPORT", "import_script", "modules_loaded_by", "run_script"]

SUPPORT = Path(__file__).parent
"""This folder: on the workers' PYTHONPATH, so that they import alig_cases too."""


def import_script(path: Path) -> ModuleType:
    """Imports the script at ``path`` as a module (under a name of its own)."""
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(
    path: Path, *args: object, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Runs ``python path args...`` in a new process; fails the test if it fails."""
    python_path = os.pathsep.join(p for p in (str(SUPPORT), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, str(path), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": python_path, **(env or {})},
        check=False,
    )
    assert result.returncode == 0, f"{path.name} {args} failed:\n{result.stderr[-3000:]}"
    return result


def modules_loaded_by(statement: str) -> list[str]:
    """The top-level packages a fresh interpreter has loaded after running ``statement``."""
    code = (
        f"import sys, json; {statement}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])
