"""One module per framework, one shape: what the benchmarks ask of a framework.

``benchmarks.frameworks._torch``, ``_jax`` and ``_keras`` each expose:

- ``ParityRunner(weights, alig_kwargs, dtype)`` with ``step(x, y) -> StepRecord``: the
  parity run (``benchmarks.parity``, ``tests/parity/test_parity.py``; the protocol and the
  oracle's runner: ``benchmarks._parity_runners``);
- ``long_run(problem) -> Result``: the long run (``benchmarks.long_run``);
- ``step_time_rows(shapes) -> (baseline, {row: step})``: the step-time rows, each a
  blocking optimizer step, built and warmed up (``benchmarks.step_time``); Keras adds
  ``step_time_rows_graph`` (no XLA);
- ``extrapolation_cost_rows(problem) -> (info, [CostRow])``: a full training iteration of
  the digits MLP per row, bare bases and the extrapolation wrapper around them
  (``benchmarks.extrapolation_cost``).

:func:`load` imports a framework's module, and with it the framework, only when asked.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["FRAMEWORKS", "load"]

FRAMEWORKS = ("torch", "jax", "keras")


def load(name: str) -> ModuleType:
    """The module of framework ``name`` (one of :data:`FRAMEWORKS`)."""
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}: choose one of {FRAMEWORKS}")
    return importlib.import_module(f"benchmarks.frameworks._{name}")
