"""An array namespace over plain Python numbers, for the step size on the host.

:func:`alig_core.step_size`, :func:`alig_core.projection_scale` and
:func:`alig_core._math.record_step` take the array namespace ``xp`` as an argument;
``python_scalars`` is that namespace for Python floats and bools. An adapter whose numbers
already live on the host (torch on the CPU: reading a 0-d CPU tensor costs no device
synchronisation) computes the step with it in plain Python arithmetic, where 0-d tensors
would cost a dozen tensor operations. The formulas are the same lines of
:mod:`alig_core._math`; the values are float64.

Example:
  >>> from alig_core import step_size
  >>> from alig_core._scalars import python_scalars
  >>> s = step_size(python_scalars, 1.0, 4.0, max_lr=0.1, eps=0.0, f_star=0.0)
  >>> s.gamma, s.gamma_hat, s.capped, s.skipped
  (0.1, 0.25, True, False)
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["python_scalars"]


class _PythonScalars:
    """The members of an array namespace that :mod:`alig_core._math` uses, on Python numbers."""

    @staticmethod
    def where(condition: bool, if_true: Any, if_false: Any) -> Any:
        return if_true if condition else if_false

    @staticmethod
    def isfinite(value: float) -> bool:
        return math.isfinite(value)

    @staticmethod
    def logical_and(a: bool, b: bool) -> bool:
        return bool(a) and bool(b)

    @staticmethod
    def logical_not(a: bool) -> bool:
        return not a

    @staticmethod
    def sqrt(value: float) -> float:
        return math.sqrt(value) if value >= 0 else math.nan


python_scalars = _PythonScalars()
"""The array namespace of Python numbers: ``where``, ``isfinite``, ``logical_and``,
``logical_not`` and ``sqrt`` (every member :mod:`alig_core._math` uses)."""
