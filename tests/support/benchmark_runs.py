"""Tests that run a benchmark of the ``benchmarks`` package as a user would: a new process.

:func:`run_benchmark` runs ``python -m benchmarks.<module>`` from the repository root (the
smoke tests of ``tests/parity``); the tests import the same modules in-process as
``benchmarks.<module>`` (pytest puts the repository root on the path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["ROOT", "run_benchmark"]

ROOT = Path(__file__).parents[2]
"""The repository root: the benchmarks run from there (``python -m benchmarks.<module>``)."""


def run_benchmark(
    module: str, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m benchmarks.<module> args...``; fails the test (with the tail of its
    output) unless it exits 0."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
    command = [sys.executable, "-m", f"benchmarks.{module}", *args]
    completed = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed
