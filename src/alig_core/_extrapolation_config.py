"""The extrapolation wrapper's options: one frozen configuration, validated once.

Every adapter's extrapolation wrapper builds an :class:`ExtrapolationConfig` from its
constructor arguments, so an invalid ``mode``, ``lr_x``, ``sigma`` or ``linearized`` raises
the same ``ValueError`` in every framework (``docs/extrapolation.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alig_core._config import _checked_bool, _checked_number, describe_value

__all__ = [
    "EXTRAPOLATION_MODES",
    "ExtrapolationConfig",
    "validate_linearized",
    "validate_lr_x",
    "validate_mode",
    "validate_seed",
    "validate_sigma",
]

EXTRAPOLATION_MODES: tuple[str, ...] = ("gradient", "past", "noise")
"""The displacements: ``-lr_x * g(w_t)``, ``-lr_x * g(w~_{t-1})``, ``sigma * xi_t``."""

_MODE_FIX = (
    "Pass mode='gradient' (EXTRAP-SGD: a gradient step at the anchor), mode='past' (the "
    "gradient of the previous update: one gradient per iteration) or mode='noise' "
    "(sigma * standard normal noise, the perturbation baseline)."
)


def validate_mode(value: Any) -> str:
    """Checks ``mode``: one of ``"gradient"``, ``"past"``, ``"noise"``; returns it.

    Raises:
      ValueError: naming the argument, the value given and the valid choices.
    """
    if isinstance(value, str) and value in EXTRAPOLATION_MODES:
        return value
    choices = ", ".join(repr(m) for m in EXTRAPOLATION_MODES)
    raise ValueError(
        f"Invalid mode: got {describe_value(value)}; expected one of {choices}. {_MODE_FIX}"
    )


def validate_lr_x(value: Any, *, mode: str = "gradient") -> Any:
    """Checks ``lr_x``, the step size of the displacement; returns it unchanged.

    Valid: ``None`` (the default: the base optimizer's own step size), a finite number
    >= 0 (0 turns the extrapolation off: the wrapper is then its base, bit for bit), or a
    schedule (a callable of the iteration count, accepted unchecked: its values are the
    caller's responsibility, as for ``max_lr`` schedules). ``mode="noise"`` takes no
    ``lr_x`` (its displacement is ``sigma * xi``): anything but ``None`` is refused there.

    Raises:
      ValueError: naming the argument, the value given, the valid range and the fix.
    """
    if value is None:
        return value
    if mode == "noise":
        raise ValueError(
            f"Invalid lr_x: got {describe_value(value)} with mode='noise'; expected None: the "
            "noise displacement is sigma * xi and takes no lr_x. Pass sigma=... instead, or a "
            "gradient mode ('gradient', 'past') to use lr_x."
        )
    if callable(value) and getattr(value, "shape", None) is None:
        return value
    expected = "None (the base's own step size), a finite number >= 0, or a schedule"
    fix = (
        "Pass e.g. lr_x=0.1, lr_x=None for the base optimizer's step size, or a callable of "
        "the iteration count."
    )
    return _checked_number("lr_x", value, expected, fix, lambda x: x >= 0.0)


def validate_sigma(value: Any, *, mode: str = "noise") -> Any:
    """Checks ``sigma``, the scale of the noise displacement; returns it unchanged.

    ``mode="noise"`` needs a finite ``sigma >= 0`` (0 turns the noise off); the other modes
    take none (``None``): a ``sigma`` there would silently do nothing, so it is refused.

    Raises:
      ValueError: naming the argument, the value given, the valid range and the fix.
    """
    if mode != "noise":
        if value is None:
            return value
        raise ValueError(
            f"Invalid sigma: got {describe_value(value)} with mode={mode!r}; expected None: sigma "
            "is the scale of mode='noise' only. Leave sigma=None, or pass mode='noise'."
        )
    expected = "a finite number >= 0 (the standard deviation of the noise displacement)"
    fix = "Pass e.g. sigma=0.01 with mode='noise'."
    return _checked_number("sigma", value, expected, fix, lambda x: x >= 0.0)


def validate_seed(value: Any, *, mode: str = "noise", below: int | None = None) -> int:
    """Checks ``seed``, the seed of the noise displacement; returns it (0 for ``None``).

    ``mode="noise"``: ``None`` (0) or an int >= 0, and under ``below`` where the adapter's
    generator takes no larger seed (TensorFlow's: ``2**31``). The other modes draw no
    noise and take ``None`` only.

    Raises:
      ValueError: naming the argument, the value given, the valid range and the fix.

    Example:
      >>> validate_seed(None), validate_seed(7, below=2**31)
      (0, 7)
    """
    if mode != "noise":
        if value is None:
            return 0
        raise ValueError(
            f"Invalid seed: got {describe_value(value)} with mode={mode!r}; expected None: the "
            "seed draws the noise of mode='noise' only. Leave seed=None, or pass mode='noise'."
        )
    if value is None:
        return 0
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 0
        or (below is not None and value >= below)
    ):
        if below is None:
            expected = "an int >= 0"
        elif below & (below - 1) == 0:  # a power of two, as generators' bounds are
            expected = f"an int in [0, 2**{below.bit_length() - 1})"
        else:
            expected = f"an int in [0, {below})"
        raise ValueError(
            f"Invalid seed: got {describe_value(value)}; expected {expected} (the noise of "
            "iteration t is a function of (seed, t) only). Pass e.g. seed=0."
        )
    return value


def validate_linearized(value: Any) -> bool:
    """Checks ``linearized``: a bool (Python or 0-d NumPy); returns a Python bool."""
    return _checked_bool(
        "linearized",
        value,
        "Pass linearized=True (the default: ALI-G's Polyak step for the linear model at the "
        "extrapolated point, seen from the anchor) or False for the plain loss there.",
    )


@dataclass(frozen=True)
class ExtrapolationConfig:
    """The options of the extrapolation wrapper (``docs/extrapolation.md``), validated.

    Attributes:
      mode: ``"gradient"`` (EXTRAP-SGD: ``d_t = -lr_x * g(w_t)``), ``"past"``
        (``d_t = -lr_x * g(w~_{t-1})``, ``d_0 = 0``) or ``"noise"``
        (``d_t = sigma * xi_t``).
      lr_x: the step size of the displacement in the gradient modes: ``None`` for the
        base's own (SGD: its ``lr``; ALI-G: its step size at the anchor in ``"gradient"``
        mode, the gamma of the previous update in ``"past"`` mode), a number >= 0, or a
        schedule of the iteration count. ``None`` in ``"noise"`` mode.
      sigma: the noise scale of ``"noise"`` mode (required there, ``None`` elsewhere).
      linearized: for ALI-G as the base, take the Polyak step of the linear model of the
        loss at ``w~_t`` seen from the anchor (``True``) or of the plain ``l(w~_t)``
        (``False``). A base that takes no loss ignores it.

    Example:
      >>> ExtrapolationConfig(mode="past", lr_x=0.1).evaluations_per_iteration
      1
      >>> ExtrapolationConfig(mode="noise")
      Traceback (most recent call last):
      ...
      ValueError: Invalid sigma: got None (type NoneType); expected a finite number >= 0 \
(the standard deviation of the noise displacement). Pass e.g. sigma=0.01 with mode='noise'.
    """

    mode: str = "gradient"
    lr_x: float | Callable[[Any], Any] | None = None
    sigma: float | None = None
    linearized: bool = True

    def __post_init__(self) -> None:
        validate_mode(self.mode)
        validate_lr_x(self.lr_x, mode=self.mode)
        validate_sigma(self.sigma, mode=self.mode)
        object.__setattr__(self, "linearized", validate_linearized(self.linearized))

    @property
    def evaluations_per_iteration(self) -> int:
        """Loss-and-gradient evaluations one iteration needs: 2 in ``"gradient"`` mode, else 1."""
        return 2 if self.mode == "gradient" else 1

    @property
    def alternates(self) -> bool:
        """Whether one-evaluation-per-call loops alternate extrapolating and updating calls.

        Only ``"gradient"`` mode does; ``"past"`` and ``"noise"`` update on every call and
        place the next extrapolated point in the same call.
        """
        return self.mode == "gradient"
