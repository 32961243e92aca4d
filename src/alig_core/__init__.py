"""ALI-G's math, defined once for every framework (no framework imported here).

``alig_core`` holds the validated hyperparameters (:class:`AliGConfig`), the step written
generically over an array namespace (see :mod:`alig_core._math` for the design), and, in
:mod:`alig_core.oracle`, a plain NumPy float64 implementation that is the ground truth of
every test. The adapters ``alig_torch``, ``alig_tf`` and ``alig_jax`` call these functions.
The extrapolation wrapper (``docs/extrapolation.md``; Lin, Kong, Stich, Jaggi, ICML 2020,
arXiv:2006.05720) has its options in :class:`ExtrapolationConfig`, its math in
:mod:`alig_core._extrapolation` and its oracle in :mod:`alig_core.oracle_extrapolation`.

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

from alig_core._config import (
    AliGConfig,
    describe_momentum_convention,
    describe_value,
    momentum_convention,
    validate_adjusted_momentum,
    validate_eps,
    validate_f_star,
    validate_max_lr,
    validate_max_norm,
    validate_momentum,
)
from alig_core._extrapolation import (
    ExtrapolationCall,
    ExtrapolationState,
    UpdateInputs,
    anchor_params,
    anchor_step_size,
    current_anchor,
    evaluation_skipped,
    extrapolate,
    extrapolated_point,
    extrapolated_step_size,
    finish_update,
    gradient_displacement,
    initial_extrapolation_state,
    linearization_term,
    linearized_loss,
    noise_displacement,
    noise_generator_seed,
    resolve_lr_x,
    select_call,
    update_inputs,
)
from alig_core._extrapolation_config import (
    EXTRAPOLATION_MODES,
    ExtrapolationConfig,
    validate_linearized,
    validate_lr_x,
    validate_mode,
    validate_seed,
    validate_sigma,
)
from alig_core._math import (
    MomentumCoefficients,
    Records,
    StepSize,
    accumulation_dtype,
    keep_if_skipped,
    momentum_buffer_update,
    momentum_coefficients,
    momentum_param_update,
    momentum_update,
    projection_scale,
    record_step,
    sgd_update,
    step_size,
)
from alig_core._scalars import python_scalars
from alig_core._version import distribution_version

__all__ = [
    "AliGConfig",
    "EXTRAPOLATION_MODES",
    "ExtrapolationCall",
    "ExtrapolationConfig",
    "ExtrapolationState",
    "MomentumCoefficients",
    "Records",
    "StepSize",
    "UpdateInputs",
    "accumulation_dtype",
    "anchor_params",
    "anchor_step_size",
    "current_anchor",
    "describe_momentum_convention",
    "describe_value",
    "evaluation_skipped",
    "extrapolate",
    "extrapolated_point",
    "extrapolated_step_size",
    "finish_update",
    "gradient_displacement",
    "initial_extrapolation_state",
    "keep_if_skipped",
    "linearization_term",
    "linearized_loss",
    "momentum_buffer_update",
    "momentum_coefficients",
    "momentum_convention",
    "momentum_param_update",
    "momentum_update",
    "noise_displacement",
    "noise_generator_seed",
    "projection_scale",
    "python_scalars",
    "record_step",
    "resolve_lr_x",
    "select_call",
    "sgd_update",
    "step_size",
    "update_inputs",
    "validate_adjusted_momentum",
    "validate_eps",
    "validate_f_star",
    "validate_linearized",
    "validate_lr_x",
    "validate_max_lr",
    "validate_max_norm",
    "validate_mode",
    "validate_momentum",
    "validate_seed",
    "validate_sigma",
]

__version__: str = distribution_version()
"""The installed ``alig`` distribution's version (``"0+unknown"`` when it is not installed)."""
