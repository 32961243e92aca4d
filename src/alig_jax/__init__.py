"""ALI-G for JAX: :func:`alig`, an optax ``GradientTransformationExtraArgs``.

Gradient accumulation: :func:`multi_steps` (``optax.MultiSteps`` alone hands ``alig``
the last micro-batch's loss with the mean gradient, a wrong step).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from alig_jax import alig
  >>> params = jnp.array([1.0, -2.0])
  >>> tx = alig(max_lr=0.1, momentum=0.9)
  >>> state = tx.init(params)
  >>> loss, grads = jax.value_and_grad(lambda w: jnp.sum(w**2))(params)
  >>> updates, state = tx.update(grads, state, params, value=loss)
  >>> params = optax.apply_updates(params, updates)

Reference: L. Berrada, A. Zisserman, M. P. Kumar, "Training Neural Networks for and by
Interpolation", ICML 2020, arXiv:1906.05661.
"""

from alig_core import __version__ as __version__  # the alig distribution's (its metadata)
from alig_jax._accumulation import AccumulationState, multi_steps
from alig_jax._extrapolation import (
    ExtrapolationState,
    anchor_params,
    extrapolation,
    extrapolation_anchor,
)
from alig_jax._transform import (
    AliGState,
    AliGTransformation,
    alig,
    project_onto_ball,
    scale_by_alig,
)

__all__ = [
    "AccumulationState",
    "AliGState",
    "AliGTransformation",
    "ExtrapolationState",
    "alig",
    "anchor_params",
    "extrapolation",
    "extrapolation_anchor",
    "multi_steps",
    "project_onto_ball",
    "scale_by_alig",
]
