"""ALI-G's math, defined once for every framework (no framework imported here).

Its public names are what a user needs: the validated hyperparameters (:class:`AliGConfig`,
:class:`ExtrapolationConfig`), ALI-G's step size (:func:`step_size`), the momentum
conventions, and, in :mod:`alig_core.oracle` and :mod:`alig_core.oracle_extrapolation`, the
plain NumPy float64 implementations that are the ground truth of every test. What the
adapters ``alig_torch``, ``alig_tf`` and ``alig_jax`` call besides is private: the step
written generically over an array namespace (:mod:`alig_core._math`), the extrapolation
procedure (:mod:`alig_core._extrapolation`; ``docs/extrapolation.md``; Lin, Kong, Stich,
Jaggi, ICML 2020, arXiv:2006.05720) and the validation helpers.

Update rule (``docs/specification.md``), with ``S`` the squared global gradient norm and
``l`` the loss::

    gamma = min(max((l - f_star) / (S + eps), 0), max_lr)      # skipped if l or S not finite
    standard:  b <- mu*b - gamma*g;  p <- p - gamma*g + mu*b
    adjusted:  b <- mu*b - g;        p <- p - gamma*g + gamma*mu*b
    then, with max_norm: p <- p * min(1, max_norm / ||all params||)

Example:
  >>> import numpy as np
  >>> import alig_core
  >>> config = alig_core.AliGConfig(max_lr=0.1, momentum=0.9)
  >>> s = alig_core.step_size(np, np.float64(2.0), np.float64(40.0),
  ...                         max_lr=config.max_lr, eps=config.eps, f_star=config.f_star)
  >>> round(float(s.gamma), 6), bool(s.capped)
  (0.05, False)

Reference: L. Berrada, A. Zisserman, M. P. Kumar, "Training Neural Networks for and by
Interpolation", ICML 2020, arXiv:1906.05661.
"""

from alig_core._config import AliGConfig, describe_momentum_convention, momentum_convention
from alig_core._extrapolation_config import EXTRAPOLATION_MODES, ExtrapolationConfig
from alig_core._math import StepSize, step_size
from alig_core._version import distribution_version

# The private modules the adapters call (``alig_core._math.record_step``, ...).
from alig_core import _extrapolation, _scalars  # noqa: F401  (isort: skip)

__all__ = [
    "AliGConfig",
    "EXTRAPOLATION_MODES",
    "ExtrapolationConfig",
    "StepSize",
    "describe_momentum_convention",
    "momentum_convention",
    "step_size",
]

__version__: str = distribution_version()
"""The installed ``alig`` distribution's version (``"0+unknown"`` when it is not installed)."""
