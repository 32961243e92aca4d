"""ALI-G as an optax ``GradientTransformationExtraArgs``.

The numbers come from :mod:`alig_core`, called with ``jax.numpy``; this module flattens
the trees, keeps the state and turns the new parameters into optax updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import alig_core
from alig_core import AliGConfig
from alig_core._math import (
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

__all__ = ["AliGState", "AliGTransformation", "alig", "project_onto_ball", "scale_by_alig"]

_VALUE_HELP = (
    "Pass the loss of the minibatch whose gradients you pass as a keyword argument: "
    "updates, state = tx.update(grads, state, params, value=loss) (with "
    "flax.nnx.Optimizer: optimizer.update(model, grads, value=loss))."
)


class AliGState(NamedTuple):
    """State of :func:`alig`: momentum buffers, the last step size and the step counters."""

    momentum_buffer: optax.Updates | None
    """Momentum buffers, a tree like the params (``None`` without momentum: ``momentum``
    ``None`` or a Python ``0``); in the convention of ``adjusted_momentum`` (standard:
    ``-gamma * g`` terms; adjusted: ``-g``). Not named ``momentum``, the hyperparameter's
    name, so that ``optax.tree.get``/``set`` of ``"momentum"`` under
    ``optax.inject_hyperparams`` find the hyperparameter only."""
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


class GivenNorm:
    """``S`` handed to ALI-G by :func:`alig_jax.extrapolation`, and ALI-G's answer (private).

    The wrapper computes the squared norm of the gradients once and passes this object to
    its base's ``update`` as the extra argument :data:`GIVEN_NORM` (only where the base is
    ALI-G). An ALI-G update that receives the very gradient arrays the wrapper passed
    (``is``: no transformation changed them on the way, e.g. under ``optax.chain`` or
    ``optax.inject_hyperparams``) steps with ``sq_grad_norm`` instead of computing it
    again; an ALI-G update that :meth:`sees` the wrapper's gradients appends to
    :attr:`answers` its step size for an evaluation (the hyperparameters it runs with,
    schedules evaluated) and the gamma it took.

    Args:
      grads: the flattened gradient leaves the wrapper passes (``None`` kept).
      sq_grad_norm: their squared global norm (0-d).
    """

    def __init__(self, grads: list[Any], sq_grad_norm: jax.Array) -> None:
        self.grads = grads
        self.sq_grad_norm = sq_grad_norm
        self.answers: list[tuple[Any, jax.Array]] = []
        """``(step_size_at(loss, S) -> gamma, gamma taken)``, one per ALI-G update."""

    def takes(self, grads: list[Any]) -> bool:
        """Whether ``grads`` are the very arrays :attr:`sq_grad_norm` was computed from."""
        return len(grads) == len(self.grads) and all(
            a is b for a, b in zip(grads, self.grads, strict=True)
        )

    def sees(self, grads: list[Any]) -> bool:
        """Whether every array of ``grads`` is one the wrapper passed (or a part of them).

        A partition (``optax.multi_transform``) gives ALI-G a part: it runs in the wrapper's
        own trace and may answer. Not where a transformation made new gradients (a
        clipping, ``optax.MultiSteps``' accumulation, traced inside its ``cond``).
        """
        passed = {id(g) for g in self.grads if g is not None}
        return all(id(g) in passed for g in grads if g is not None)


GIVEN_NORM = "alig_jax_given_norm"
"""The extra argument that carries a :class:`GivenNorm` (other transformations ignore it)."""


def _step_size(
    config: AliGConfig, steps_taken: jax.Array, loss: Any, sq_grad_norm: Any, dtype: Any
) -> alig_core.StepSize:
    """ALI-G's step size for ``(loss, S)`` with ``config``, the cap at ``steps_taken``."""
    cap = config.max_lr(steps_taken) if callable(config.max_lr) else config.max_lr
    return alig_core.step_size(
        jnp,
        jnp.asarray(loss).astype(dtype),
        jnp.asarray(sq_grad_norm).astype(dtype),
        max_lr=cap,
        eps=config.eps,
        f_star=config.f_star,
    )


class AliGTransformation(optax.GradientTransformationExtraArgs):
    """What :func:`alig` and :func:`scale_by_alig` return: an optax transformation.

    It also tells its step size for an evaluation, moving nothing: :meth:`step_size_at`.
    """

    _config: AliGConfig

    @classmethod
    def build(cls, init: Any, update: Any, config: AliGConfig) -> AliGTransformation:
        """The transformation of ``init`` and ``update``, stepping with ``config``."""
        tx = cls(init, update)
        tx._config = config
        return tx

    def step_size_at(self, state: AliGState, loss: Any, sq_grad_norm: Any) -> jax.Array:
        r"""ALI-G's step size :math:`\gamma` for an evaluation ``(loss, S)``, moving nothing.

        The step size this transformation's next ``update`` would take with the loss
        ``loss`` and gradients of squared global norm ``sq_grad_norm`` (the cap of a
        ``max_lr`` schedule at ``state.steps_taken``; 0 where the step would be skipped).
        :func:`alig_jax.extrapolation` takes its default ``lr_x`` from it. Under
        ``optax.inject_hyperparams`` the hyperparameters live in the injected state:
        ``alig(**state.hyperparams).step_size_at(state.inner_state, loss, S)``.

        Args:
          state: this transformation's :class:`AliGState`.
          loss: the loss (a real scalar).
          sq_grad_norm: ``S``, the squared global norm of the gradients.

        Returns:
          ``gamma``, 0-d, in the dtype of ``state.gamma``.

        Raises:
          ValueError: ``state`` is not an :class:`AliGState`.

        Example:
          >>> import jax.numpy as jnp
          >>> tx = alig(max_lr=0.1)
          >>> state = tx.init(jnp.zeros(2))
          >>> round(float(tx.step_size_at(state, 1.0, 40.0)), 6)  # 1 / (40 + 1e-5)
          0.025
          >>> round(float(tx.step_size_at(state, 1.0, 4.0)), 6)  # the cap
          0.1
        """
        if not isinstance(state, AliGState):
            raise ValueError(
                f"step_size_at needs this transformation's AliGState, got {type(state).__name__}. "
                "Pass the state that tx.init / tx.update returned (under "
                "optax.inject_hyperparams: state.inner_state, with "
                "alig(**state.hyperparams).step_size_at)."
            )
        dtype = state.gamma.dtype
        return _step_size(self._config, state.steps_taken, loss, sq_grad_norm, dtype).gamma


_UNKNOWN = "unknown"
"""The name of the catch-all keyword parameter of :func:`alig` and :func:`scale_by_alig`."""

_CAP_INSTEAD = (
    "ALI-G computes its own step size (the Polyak step, from the loss and the gradient "
    "norm); the number you would give optax.sgd as its learning rate is the cap on that "
    "step: pass it as max_lr=, e.g. alig(max_lr={value!r}) (optax.inject_hyperparams(alig)"
    "(max_lr=...) to schedule it)."
)

_REFUSED_KEYWORDS: dict[str, str] = {
    "learning_rate": _CAP_INSTEAD,
    "lr": _CAP_INSTEAD,
    "nesterov": (
        "ALI-G's momentum is Nesterov's already: the default convention is "
        "optax.sgd(nesterov=True) with the step size inside the buffer, and "
        "adjusted_momentum=True is optax.sgd(learning_rate=gamma, momentum, nesterov=True) "
        "exactly. Drop nesterov= (and pass momentum=, e.g. momentum=0.9)."
    ),
    "weight_decay": (
        "ALI-G's step size comes from the loss, so a decay the loss does not see "
        "(optax.add_decayed_weights, or an AdamW-style weight_decay) would make the step "
        "inconsistent. Constrain the weights to an l2 ball instead, as the paper does: "
        "alig(max_lr=..., max_norm=r), with alig_jax.project_onto_ball(params, r) once at "
        "the start; or add an l2 penalty to the loss you pass as value=."
    ),
}
"""Keywords of optax's aliases that :func:`alig` does not take, and what to do instead."""


def _check_no_unknown(who: str, takes: str, unknown: dict[str, Any], **why: str) -> None:
    """Raises a ``ValueError`` for keyword arguments ``who`` does not take.

    Args:
      who: the factory, as the message names it (``"alig"``).
      takes: the arguments it takes, for the message.
      unknown: the keyword arguments Python did not bind to a parameter.
      **why: per argument name, why ``who`` refuses it (on top of :data:`_REFUSED_KEYWORDS`).

    Raises:
      ValueError: naming the argument, the value given, and what to pass instead.
    """
    # optax.inject_hyperparams binds the factory's signature (the catch-all included, as an
    # empty dict by default) and passes every argument back by keyword: unwrap that.
    if set(unknown) == {_UNKNOWN} and isinstance(unknown[_UNKNOWN], dict):
        unknown = unknown[_UNKNOWN]
    if not unknown:
        return
    reasons = _REFUSED_KEYWORDS | why
    name = next((n for n in unknown if n in reasons), sorted(unknown)[0])
    value = unknown[name]
    if name in reasons:
        raise ValueError(
            f"{who} does not take {name}= (got {name}={value!r}). "
            + reasons[name].format(value=value)
        )
    given = ", ".join(f"{n}={unknown[n]!r}" for n in sorted(unknown))
    raise ValueError(f"{who} got unexpected keyword argument(s) {given}. It takes {takes}.")


def _keeps_buffers(momentum: Any) -> bool:
    """Whether ``momentum`` needs buffers: all but ``None`` and a Python ``0``.

    The answer must not depend on a value that can be traced: under
    ``optax.inject_hyperparams`` a number becomes an array that may change (by a schedule,
    or by ``optax.tree.set``), so it keeps buffers even when it is 0 now; ``None`` (the
    default) is left static by ``inject_hyperparams``, so ``alig`` and
    ``inject_hyperparams(alig)`` have the same state without momentum.
    """
    if momentum is None:
        return False
    return not (isinstance(momentum, int | float) and momentum == 0)


def _alig_transform(config: AliGConfig, keeps_buffers: bool) -> AliGTransformation:
    """The transformation of a validated configuration (:func:`alig` builds it)."""
    convention = alig_core.momentum_convention(keeps_buffers, config.adjusted_momentum)

    def init_fn(params: optax.Params) -> AliGState:
        # An empty tree is a state, as optax.sgd's (optax.tree.map_params, a partition whose
        # alig label has no parameters): its steps move nothing.
        check_params(params, who="alig", verb="optimizes", allow_empty=True)
        dtype = accumulation_dtype(jax.tree.leaves(params))
        buffers = jax.tree.map(jnp.zeros_like, params) if keeps_buffers else None
        return AliGState(
            momentum_buffer=buffers,
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
        given = extra_args.get(GIVEN_NORM)  # optax convention: other extra arguments ignored
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
        takes_given = isinstance(given, GivenNorm) and given.takes(grads)
        if isinstance(given, GivenNorm) and takes_given:
            sq_grad_norm = jnp.asarray(given.sq_grad_norm).astype(dtype)
        else:
            sq_grad_norm = sum_of_squares(present, dtype)
        size = _step_size(config, state.steps_taken, loss, sq_grad_norm, dtype)
        skipped = size.skipped
        if isinstance(given, GivenNorm) and given.sees(grads):

            def step_size_at(at_loss: Any, at_sq_grad_norm: Any) -> jax.Array:
                at = at_sq_grad_norm if takes_given else sq_grad_norm  # S of what ALI-G sees
                return _step_size(config, state.steps_taken, at_loss, at, dtype).gamma

            given.answers.append((step_size_at, size.gamma))

        # The step as a delta: the core's update applied to a zero parameter.
        old_buffers = (
            treedef.flatten_up_to(state.momentum_buffer) if keeps_buffers else [None] * len(grads)
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
                c = alig_core._math.MomentumCoefficients(
                    *(jnp.asarray(x, dtype) for x in coefficients)
                )
                delta, buffer = momentum_update(jnp.zeros((), dtype), g.astype(dtype), b, c)
                new_buffers.append(jnp.where(skipped, b, buffer.astype(b.dtype)))
            else:
                delta = alig_core._math.sgd_update(
                    jnp.zeros((), dtype), g.astype(dtype), size.gamma
                )
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
            momentum_buffer=treedef.unflatten(new_buffers) if keeps_buffers else None,
            gamma=records.gamma.astype(dtype),
            gamma_hat=records.gamma_hat.astype(dtype),
            capped=records.capped,
            steps_taken=records.steps_taken.astype(jnp.int32),
            steps_skipped=records.steps_skipped.astype(jnp.int32),
            momentum_convention=state.momentum_convention,
        )
        return treedef.unflatten(deltas), new_state

    return AliGTransformation.build(init_fn, update_fn, config)


def scale_by_alig(
    max_lr: float | optax.Schedule | None = None,
    *,
    eps: float = 1e-5,
    f_star: float = 0.0,
    **unknown: Any,
) -> AliGTransformation:
    r"""Scales the updates by ALI-G's step size: a building block, as ``optax.scale_by_polyak``.

    Returns :math:`\gamma_t u` for the updates :math:`u` it is given, with
    :math:`\gamma_t` :func:`alig`'s step size computed from those updates (their squared
    norm) and the loss ``value=``. As optax's ``scale_by_*`` transformations, it keeps the
    sign: follow it with ``optax.scale(-1.0)`` to descend. Place it first in the chain, where
    the updates are the raw gradient (gamma needs its norm). It keeps no momentum and does not
    project: ``optax.chain(scale_by_alig(max_lr), optax.trace(decay=mu, nesterov=True),
    optax.scale(-1.0))`` is ``alig(max_lr, momentum=mu)`` (the default convention) up to
    rounding. A skipped step (``value`` or the norm not finite) gives zero updates; the
    transformations after it still run (``optax.trace`` then decays its buffer), as they do
    after any zero update. Its state is an :class:`AliGState` without buffers (the records
    and counters; ``max_lr`` as a schedule is evaluated at ``steps_taken``).

    Args:
      max_lr: the cap ``eta`` on the step size, a number or an optax schedule of the
        number of steps taken; ``None`` for no cap.
      eps: ``delta``, added to the squared norm.
      f_star: the lower bound of the loss.
      **unknown: refused with a ``ValueError`` that says what to do instead (e.g.
        ``momentum=``: chain ``optax.trace`` after it, or use :func:`alig`).

    Returns:
      An :class:`AliGTransformation` (an ``optax.GradientTransformationExtraArgs``) whose
      ``update`` takes the loss as ``value=``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_alig(max_lr=0.1), optax.scale(-1.0))
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(2 * params, tx.init(params), params, value=5.0)
      >>> [round(x, 6) for x in updates.tolist()], round(float(state[0].gamma), 6)
      ([-0.2, 0.4], 0.1)
    """
    _check_no_unknown(
        "scale_by_alig",
        "max_lr, eps and f_star (alig takes momentum and max_norm too)",
        unknown,
        momentum=(
            "scale_by_alig is optax's building block and keeps no momentum: chain optax's, "
            "optax.chain(scale_by_alig(max_lr), optax.trace(decay=momentum, nesterov=True), "
            "optax.scale(-1.0)), or use alig(max_lr, momentum=...)."
        ),
        adjusted_momentum=(
            "scale_by_alig keeps no momentum; use alig(max_lr, momentum=..., "
            "adjusted_momentum=True)."
        ),
        max_norm=("scale_by_alig does not project the parameters; use alig(max_lr, max_norm=...)."),
    )
    config = AliGConfig(max_lr=max_lr, momentum=0.0, eps=eps, f_star=f_star, max_norm=None)
    descent = _alig_transform(config, keeps_buffers=False)

    def update_fn(
        updates: optax.Updates,
        state: AliGState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AliGState]:
        # alig's updates are exactly -gamma * u (0 - gamma * u): their negation is gamma * u.
        steps, new_state = descent.update(updates, state, params, **extra_args)
        return jax.tree.map(jnp.negative, steps), new_state

    return AliGTransformation.build(descent.init, update_fn, config)


def alig(
    max_lr: float | optax.Schedule | None = None,
    momentum: float | None = None,
    *,
    adjusted_momentum: bool = False,
    eps: float = 1e-5,
    f_star: float = 0.0,
    max_norm: float | None = None,
    **unknown: Any,
) -> AliGTransformation:
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
      momentum: ``mu``, with ``0 <= mu < 1``; ``None`` (the default) or a Python ``0``
        for none (no buffers are kept). As ``optax.sgd``'s, a momentum given to
        ``optax.inject_hyperparams(alig)`` keeps buffers even at 0 (it can change later);
        leave it out there for none.
      adjusted_momentum: the momentum convention (see above): the two agree while gamma
        is constant (e.g. pinned at ``max_lr``) and differ when it moves.
      eps: ``delta``, added to the squared gradient norm.
      f_star: the lower bound of the loss.
      max_norm: radius of the l2-ball constraint; ``None`` for no projection. Project the
        initial parameters with :func:`project_onto_ball`.
      **unknown: refused with a ``ValueError`` that says what to do instead
        (``learning_rate=``: the cap is ``max_lr=``; ``nesterov=``, ``weight_decay=``).

    Returns:
      An :class:`AliGTransformation` (an ``optax.GradientTransformationExtraArgs``) whose
      ``update`` takes the loss as ``value=`` (required; other extra keyword arguments are
      ignored), and whose :meth:`~AliGTransformation.step_size_at` tells its step size.

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
    _check_no_unknown(
        "alig",
        "max_lr, momentum, adjusted_momentum, eps, f_star and max_norm",
        unknown,
    )
    return _alig_transform(
        AliGConfig(
            max_lr=max_lr,
            momentum=0.0 if momentum is None else momentum,
            adjusted_momentum=adjusted_momentum,
            eps=eps,
            f_star=f_star,
            max_norm=max_norm,
        ),
        keeps_buffers=_keeps_buffers(momentum),
    )


def project_onto_ball(params: optax.Params, max_norm: float) -> optax.Params:
    """Returns ``params`` scaled onto the l2 ball of radius ``max_norm`` (all leaves at once).

    ALI-G never changes parameters at initialisation: call this once on the initial
    parameters when training with ``max_norm``.

    Example:
      >>> [round(x, 6) for x in project_onto_ball({"w": jnp.array([3.0, 4.0])}, 1.0)["w"].tolist()]
      [0.6, 0.8]
    """
    alig_core._config.validate_max_norm(max_norm)
    leaves = jax.tree.leaves(params)
    if not leaves:
        return params
    sq_norm = sum_of_squares(leaves, accumulation_dtype(leaves))
    scale = projection_scale(jnp, sq_norm, max_norm)
    return jax.tree.map(lambda p: (p * scale.astype(p.dtype)).astype(p.dtype), params)
