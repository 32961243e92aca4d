"""ALI-G hyperparameters: one frozen configuration, validated once for every adapter."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "describe_value",
    "AliGConfig",
    "describe_momentum_convention",
    "momentum_convention",
    "validate_adjusted_momentum",
    "validate_eps",
    "validate_f_star",
    "validate_max_lr",
    "validate_max_norm",
    "validate_momentum",
]


def describe_value(value: Any) -> str:
    """A value as an error message shows it: its repr and its type.

    >>> describe_value(True)
    'True (type bool)'
    """
    return f"{value!r} (type {type(value).__name__})"


def _concrete_float(name: str, value: Any, expected: str, fix: str) -> float | None:
    """Returns ``value`` as a float, or ``None`` when it is an abstract (traced) array.

    Python and NumPy numbers are checked strictly. 0-d framework arrays (a torch tensor, a
    concrete JAX array) are converted with ``float()``; a value that refuses conversion
    because it is abstract (a JAX tracer inside ``jit`` or ``inject_hyperparams``) is
    accepted unchecked: its concrete value was validated when the optimizer was built.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str | bytes):
        raise ValueError(f"Invalid {name}: got {describe_value(value)}; expected {expected}. {fix}")
    if isinstance(value, numbers.Real):
        return float(value)
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) == () and hasattr(value, "__float__"):
        dtype_name = str(getattr(value, "dtype", ""))
        if "bool" in dtype_name or "int" in dtype_name or "complex" in dtype_name:
            raise ValueError(
                f"Invalid {name}: got {describe_value(value)} of dtype {dtype_name}; "
                f"expected {expected}. {fix}"
            )
        try:
            return float(value)
        except Exception:  # an abstract value (e.g. a JAX tracer): checked at construction
            return None
    raise ValueError(f"Invalid {name}: got {describe_value(value)}; expected {expected}. {fix}")


def _checked_number(
    name: str, value: Any, expected: str, fix: str, valid: Callable[[float], bool]
) -> Any:
    """Returns ``value`` if it is a finite number for which ``valid`` holds (or abstract).

    Raises:
      ValueError: naming the argument, the value given, what was expected and the fix.
    """
    number = _concrete_float(name, value, expected, fix)
    if number is not None and not (math.isfinite(number) and valid(number)):
        raise ValueError(f"Invalid {name}: got {describe_value(value)}; expected {expected}. {fix}")
    return value


def _checked_bool(name: str, value: Any, fix: str) -> bool:
    """Returns ``value`` as a Python bool if it is one (Python or 0-d NumPy), else raises."""
    if isinstance(value, bool):
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):  # numpy.bool_
        return bool(value)
    raise ValueError(f"Invalid {name}: got {describe_value(value)}; expected True or False. {fix}")


def validate_max_lr(value: Any, *, allow_schedule: bool = False) -> Any:
    """Checks ``max_lr``: ``None`` (no cap) or a finite number > 0.

    Args:
      value: the proposed cap on the step size.
      allow_schedule: accept a callable (a schedule of the step count) unchecked; the
        adapter that evaluates it is responsible for its values.

    Returns:
      ``value`` unchanged.

    Raises:
      ValueError: naming the argument, the value given and the valid range.
    """
    if value is None:
        return value
    if allow_schedule and callable(value) and getattr(value, "shape", None) is None:
        return value
    expected = "None (no cap) or a finite number > 0" + (
        ", or a schedule" if allow_schedule else ""
    )
    fix = "Pass e.g. max_lr=0.1 (the largest step size ALI-G may take), or None for no cap."
    return _checked_number("max_lr", value, expected, fix, lambda x: x > 0.0)


def validate_momentum(value: Any) -> Any:
    """Checks ``momentum``: a finite number with 0 <= momentum < 1; returns it unchanged."""
    expected = "a finite number with 0 <= momentum < 1"
    fix = "Pass e.g. momentum=0.9, or momentum=0.0 for plain ALI-G without momentum."
    return _checked_number("momentum", value, expected, fix, lambda x: 0.0 <= x < 1.0)


def validate_adjusted_momentum(value: Any) -> bool:
    """Checks ``adjusted_momentum``: a bool (Python or 0-d NumPy); returns a Python bool."""
    return _checked_bool(
        "adjusted_momentum",
        value,
        "Pass adjusted_momentum=False for the standard convention of the paper's code, "
        "or True for the convention of torch.optim.SGD(nesterov=True).",
    )


def validate_eps(value: Any) -> Any:
    """Checks ``eps``: a finite number >= 0; returns it unchanged."""
    fix = "Pass e.g. eps=1e-5 (the default); it is added to the squared gradient norm."
    return _checked_number("eps", value, "a finite number >= 0", fix, lambda x: x >= 0.0)


def validate_f_star(value: Any) -> Any:
    """Checks ``f_star``: a finite number; returns it unchanged."""
    expected = "a finite number (a lower bound of the loss)"
    fix = "Pass f_star=0.0 (the default) for a non-negative loss such as cross-entropy."
    return _checked_number("f_star", value, expected, fix, lambda x: True)


def validate_max_norm(value: Any) -> Any:
    """Checks ``max_norm``: ``None`` (no projection) or a finite number > 0."""
    if value is None:
        return value
    expected = "None (no projection) or a finite number > 0"
    fix = "Pass the radius of the l2 ball that constrains the parameters, e.g. max_norm=100.0."
    return _checked_number("max_norm", value, expected, fix, lambda x: x > 0.0)


@dataclass(frozen=True)
class AliGConfig:
    """The hyperparameters of ALI-G, validated at construction.

    Every adapter builds one of these from its constructor arguments, so an invalid value
    raises the same ``ValueError`` in every framework.

    Attributes:
      max_lr: eta, the cap on the step size; ``None`` for no cap. With
        ``allow_schedule=True`` at validation, adapters may also pass a schedule.
      momentum: mu, 0 <= mu < 1.
      adjusted_momentum: ``False`` for the standard convention (the paper's PyTorch code),
        ``True`` for the convention of ``torch.optim.SGD(nesterov=True)``.
      eps: delta, added to the squared gradient norm.
      f_star: the lower bound of the loss (the paper's b).
      max_norm: radius of the l2-ball constraint; ``None`` for no projection.

    Example:
      >>> AliGConfig(max_lr=0.1, momentum=0.9).momentum
      0.9
      >>> AliGConfig(momentum=1.0)
      Traceback (most recent call last):
      ...
      ValueError: Invalid momentum: got 1.0 (type float); expected a finite number with \
0 <= momentum < 1. Pass e.g. momentum=0.9, or momentum=0.0 for plain ALI-G without momentum.
    """

    max_lr: float | Callable[[Any], Any] | None = None
    momentum: float = 0.0
    adjusted_momentum: bool = False
    eps: float = 1e-5
    f_star: float = 0.0
    max_norm: float | None = None

    def __post_init__(self) -> None:
        validate_max_lr(self.max_lr, allow_schedule=True)
        validate_momentum(self.momentum)
        object.__setattr__(
            self, "adjusted_momentum", validate_adjusted_momentum(self.adjusted_momentum)
        )
        validate_eps(self.eps)
        validate_f_star(self.f_star)
        validate_max_norm(self.max_norm)


_CONVENTION_NAMES = ("no momentum", "adjusted_momentum=False", "adjusted_momentum=True")


def momentum_convention(has_buffers: bool, adjusted_momentum: bool) -> int:
    """What an optimizer's momentum buffers hold, as the code adapters save with its state.

    0: no buffers (``momentum == 0``); 1: the standard convention (``-gamma * g`` terms);
    2: the adjusted one (``-g`` terms). A checkpoint whose code differs from the optimizer
    loading it must be refused: resuming would silently change the trajectory.

    >>> momentum_convention(True, adjusted_momentum=True), describe_momentum_convention(2)
    (2, 'adjusted_momentum=True')
    """
    return 0 if not has_buffers else 2 if adjusted_momentum else 1


def describe_momentum_convention(code: int) -> str:
    """The setting a :func:`momentum_convention` code stands for, for error messages."""
    if 0 <= code < len(_CONVENTION_NAMES):
        return _CONVENTION_NAMES[code]
    return f"an unknown momentum convention (code {code})"
