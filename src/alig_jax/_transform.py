"""ALI-G as an optax ``GradientTransformationExtraArgs``.

The numbers come from :mod:`alig_core`, called with ``jax.numpy``; this module flattens
the trees, keeps the state and turns the new parameters into optax updates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import jax
import jax.numpy as jnp
import optax

import alig_core
from alig_core import (
    AliGConfig,
    Records,
    momentum_coefficients,
    momentum_update,
    projection_scale,
    record_step,
)
from alig_jax._leaves import (
    accumulation_dtype,
    check_params,
    is_missing,
    loss_value,
    sum_of_squares,
)

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["AliGState", "StepOptions", "alig", "project_onto_ball", "scale_by_alig"]

_VALUE_HELP = (
    "Pass the loss of the minibatch whose gradients you pass as a keyword argument: "
    "updates, state = tx.update(grads, state, params, value=loss) (with "
    "flax.nnx.Optimizer: optimizer.update(model, grads, value=loss))."
)


class AliGState(NamedTuple):
    """State of :func:`alig`: momentum buffers, the last step size and the step counters."""

    momentum: optax.Updates | None
    """Momentum buffers, a tree like the params (``None`` when ``momentum == 0``); in the
    convention of ``adjusted_momentum`` (standard: ``-gamma * g`` terms; adjusted: ``-g``)."""
    gamma: jax.Array
    """() float32 (float64 for float64 params): the step size of the last step taken."""
    gamma_hat: jax.Array
    """() like ``gamma``: the Polyak step before clamp and cap, of the last step taken."""
    capped: jax.Array
    """() bool: whether the last step taken hit the cap."""
    steps_taken: jax.Array
    """() int32: steps taken; the count a ``max_lr`` schedule is evaluated at."""
    steps_skipped: jax.Array
    """() int32: steps skipped because the loss or the gradient norm was not finite."""
    momentum_convention: jax.Array
    """A marker (int8 zeros) whose *shape* records what the buffers hold: its length is
    1 + :func:`alig_core.momentum_convention` (1 without momentum, 2 standard, 3
    adjusted). Shapes are static under ``jit``, so ``update`` refuses a state restored
    from a checkpoint of the other convention even when traced (the buffers of the two
    conventions hold different quantities)."""


class StepOptions(TypedDict, total=False):
    """The keyword options of :func:`scale_by_alig`: :func:`alig`'s, but ``max_norm``."""

    adjusted_momentum: bool
    eps: float
    f_star: float


def _alig_transform(config: AliGConfig) -> optax.GradientTransformationExtraArgs:
    """The transformation of a validated configuration (:func:`alig` builds it)."""
    momentum = config.momentum
    # A traced momentum (inside inject_hyperparams) keeps buffers: only a literal 0 drops them.
    keeps_buffers = not (isinstance(momentum, int | float) and momentum == 0)
    convention = alig_core.momentum_convention(keeps_buffers, config.adjusted_momentum)

    def init_fn(params: optax.Params) -> AliGState:
        check_params(params, who="alig", verb="optimizes")
        dtype = accumulation_dtype(jax.tree.leaves(params))
        buffers = jax.tree.map(jnp.zeros_like, params) if keeps_buffers else None
        return AliGState(
            momentum=buffers,
            gamma=jnp.zeros((), dtype),
            gamma_hat=jnp.zeros((), dtype),
            capped=jnp.zeros((), bool),
            steps_taken=jnp.zeros((), jnp.int32),
            steps_skipped=jnp.zeros((), jnp.int32),
            momentum_convention=jnp.zeros((convention + 1,), jnp.int8),
        )

    def update_fn(
        updates: optax.Updates,
        state: AliGState,
        params: optax.Params | None = None,
        *,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AliGState]:
        del extra_args  # optax convention: unknown extra arguments are ignored
        if config.max_norm is not None and params is None:
            raise ValueError(
                f"alig(max_norm={config.max_norm}) projects the parameters after the step and "
                "needs them: call tx.update(grads, state, params, value=loss)."
            )
        saved = jnp.shape(state.momentum_convention)
        if saved != (convention + 1,):
            saved_convention = saved[0] - 1 if len(saved) == 1 else -1
            raise ValueError(
                "This AliGState was written by alig with "
                f"{alig_core.describe_momentum_convention(saved_convention)}, and this alig "
                f"has {alig_core.describe_momentum_convention(convention)}: the buffers of "
                "the two conventions hold different quantities, so resuming would silently "
                "change the trajectory. Build the transformation with the checkpoint's "
                "settings (momentum and adjusted_momentum) to resume from it."
            )
        treedef: Any  # a jax PyTreeDef (flatten_up_to, unflatten: not in jax's stubs)
        grads, treedef = jax.tree.flatten(updates, is_leaf=is_missing)
        present = [g for g in grads if g is not None]
        dtype = state.gamma.dtype
        loss = loss_value(
            value,
            dtype,
            who="ALI-G",
            missing=f"ALI-G's update needs the loss as value=, and got none. {_VALUE_HELP}",
            value_help=_VALUE_HELP,
        )
        sq_grad_norm = sum_of_squares(present, dtype)
        cap = config.max_lr(state.steps_taken) if callable(config.max_lr) else config.max_lr
        size = alig_core.step_size(
            jnp, loss, sq_grad_norm, max_lr=cap, eps=config.eps, f_star=config.f_star
        )
        skipped = size.skipped

        # The step as a delta: the core's update applied to a zero parameter.
        old_buffers = (
            treedef.flatten_up_to(state.momentum) if keeps_buffers else [None] * len(grads)
        )
        coefficients = momentum_coefficients(
            size.gamma, momentum=config.momentum, adjusted_momentum=config.adjusted_momentum
        )
        deltas: list[jax.Array | None] = []
        new_buffers: list[jax.Array | None] = []
        for g, b in zip(grads, old_buffers, strict=True):
            if g is None:  # no gradient: neither the parameter nor its buffer moves
                deltas.append(None)
                new_buffers.append(b)
                continue
            if keeps_buffers:
                c = alig_core.MomentumCoefficients(*(jnp.asarray(x, dtype) for x in coefficients))
                delta, buffer = momentum_update(jnp.zeros((), dtype), g.astype(dtype), b, c)
                new_buffers.append(jnp.where(skipped, b, buffer.astype(b.dtype)))
            else:
                delta = alig_core.sgd_update(jnp.zeros((), dtype), g.astype(dtype), size.gamma)
                new_buffers.append(None)
            # -0.0 on a skipped step: p + (-0.0) is p bit for bit, whatever p's sign.
            deltas.append(jnp.where(skipped, -0.0, delta).astype(g.dtype))

        if config.max_norm is not None:
            param_leaves = treedef.flatten_up_to(params)
            moved = [p if d is None else p + d for p, d in zip(param_leaves, deltas, strict=True)]
            sq_param_norm = sum_of_squares(moved, dtype)
            scale = projection_scale(jnp, sq_param_norm, config.max_norm, skipped=skipped)
            deltas = [
                jnp.where(skipped, -0.0, (m * scale.astype(m.dtype)) - p).astype(p.dtype)
                for p, m in zip(param_leaves, moved, strict=True)
            ]

        old = Records(
            state.gamma, state.gamma_hat, state.capped, state.steps_taken, state.steps_skipped
        )
        records = record_step(jnp, old, size)
        new_state = AliGState(
            momentum=treedef.unflatten(new_buffers) if keeps_buffers else None,
            gamma=records.gamma.astype(dtype),
            gamma_hat=records.gamma_hat.astype(dtype),
            capped=records.capped,
            steps_taken=records.steps_taken.astype(jnp.int32),
            steps_skipped=records.steps_skipped.astype(jnp.int32),
            momentum_convention=state.momentum_convention,
        )
        return treedef.unflatten(deltas), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_alig(
    max_lr: float | optax.Schedule | None = None,
    momentum: float = 0.0,
    **options: Unpack[StepOptions],
) -> optax.GradientTransformationExtraArgs:
    """The ALI-G step without the l2-ball projection: :func:`alig` with ``max_norm=None``.

    Takes :func:`alig`'s arguments but ``max_norm`` (``adjusted_momentum``, ``eps`` and
    ``f_star`` by keyword, with the same defaults); see there.
    """
    return alig(max_lr, momentum, max_norm=None, **options)


def alig(
    max_lr: float | optax.Schedule | None = None,
    momentum: float = 0.0,
    *,
    adjusted_momentum: bool = False,
    eps: float = 1e-5,
    f_star: float = 0.0,
    max_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ALI-G: SGD with the Polyak step size capped at ``max_lr``, as an optax transformation.

    .. math::

        \gamma_t = \min\left(\max\left(\frac{f(w_t) - f_\star}{\|g_t\|^2 + \epsilon},
        0\right), \eta\right)

    with :math:`\|g_t\|^2` the squared norm of the whole raw gradient tree (before momentum,
    accumulated in at least float32). Then, with buffer :math:`b` (zero at the start):

    * ``momentum == 0``: :math:`w \leftarrow w - \gamma g`;
    * standard (default): :math:`b \leftarrow \mu b - \gamma g`,
      :math:`w \leftarrow w - \gamma g + \mu b`;
    * ``adjusted_momentum=True`` (``optax.sgd(nesterov=True)`` with lr = gamma):
      :math:`b \leftarrow \mu b - g`, :math:`w \leftarrow w - \gamma g + \gamma\mu b`;

    and with ``max_norm``, :math:`w \leftarrow w \cdot \min(1, \text{max\_norm} / \|w\|)`
    over all parameters. The updates are the differences to apply with
    ``optax.apply_updates``; with ``max_norm`` they are ``projected - params``, so the
    parameters land on the projected point up to one rounding (a relative 1e-16 in
    float64). A step whose ``value`` or gradient norm is not finite is skipped: the
    updates are ``-0.0`` (``params + updates`` is ``params`` bit for bit), the state keeps
    its buffers and last step size, and ``steps_skipped`` goes up; all of it with
    ``jnp.where``, so it runs under ``jax.jit`` without recompiling.

    A leaf of the gradient tree that is ``None`` is a parameter without a gradient: its
    buffer stays as it was and its update is ``None`` (as in ``optax.sgd``; apply such
    updates leaf by leaf, since ``optax.apply_updates`` does not take ``None``), except
    with ``max_norm``, where the projection may move it: its update is then an array.

    Args:
      max_lr: the cap ``eta`` on the step size, a number or an optax schedule of the
        number of steps taken (``state.steps_taken``); ``None`` for no cap.
      momentum: ``mu``, with ``0 <= mu < 1``.
      adjusted_momentum: the momentum convention (see above): the two agree while gamma
        is constant (e.g. pinned at ``max_lr``) and differ when it moves.
      eps: ``delta``, added to the squared gradient norm.
      f_star: the lower bound of the loss.
      max_norm: radius of the l2-ball constraint; ``None`` for no projection. Project the
        initial parameters with :func:`project_onto_ball`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the loss as
      ``value=`` (required; other extra keyword arguments are ignored).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from alig_jax import alig
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> loss_fn = lambda p: jnp.sum(p["w"] ** 2)
      >>> tx = alig(max_lr=0.1, momentum=0.9)
      >>> state = tx.init(params)
      >>> loss, grads = jax.value_and_grad(loss_fn)(params)
      >>> updates, state = tx.update(grads, state, params, value=loss)
      >>> params = optax.apply_updates(params, updates)
      >>> round(float(state.gamma), 6), bool(state.capped)
      (0.1, True)

    .. warning::
        ALI-G assumes the model can (nearly) interpolate the data, i.e. drive the loss
        close to ``f_star`` on every minibatch; with a loss far from that the Polyak step
        is too small and ``max_lr`` does the work.

    References:
      L. Berrada, A. Zisserman, M. P. Kumar, "Training Neural Networks for and by
      Interpolation", ICML 2020, arXiv:1906.05661.
    """
    return _alig_transform(
        AliGConfig(
            max_lr=max_lr,
            momentum=momentum,
            adjusted_momentum=adjusted_momentum,
            eps=eps,
            f_star=f_star,
            max_norm=max_norm,
        )
    )


def project_onto_ball(params: optax.Params, max_norm: float) -> optax.Params:
    """Returns ``params`` scaled onto the l2 ball of radius ``max_norm`` (all leaves at once).

    ALI-G never changes parameters at initialisation: call this once on the initial
    parameters when training with ``max_norm``.

    Example:
      >>> [round(x, 6) for x in project_onto_ball({"w": jnp.array([3.0, 4.0])}, 1.0)["w"].tolist()]
      [0.6, 0.8]
    """
    alig_core.validate_max_norm(max_norm)
    leaves = jax.tree.leaves(params)
    if not leaves:
        return params
    sq_norm = sum_of_squares(leaves, accumulation_dtype(leaves))
    scale = projection_scale(jnp, sq_norm, max_norm)
    return jax.tree.map(lambda p: (p * scale.astype(p.dtype)).astype(p.dtype), params)
