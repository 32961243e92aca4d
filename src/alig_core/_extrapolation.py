r"""Extrapolation around any base optimizer, written once and generic over ``xp``.

``docs/extrapolation.md`` (seed: Lin, Kong, Stich, Jaggi, ICML 2020, arXiv:2006.05720):
with ``w_t`` the anchor, a displacement ``d_t`` gives the extrapolated point
``w~_t = w_t + d_t``; the loop evaluates the loss and the gradient there, and the base
optimizer steps *from the anchor* with ``g(w~_t)``. See ``docs/extrapolation.md`` for which
details are the paper's and which are this project's.

Design, the same as :mod:`alig_core._math`: functions take the array namespace ``xp``
(``numpy``, ``jax.numpy``, ``torch``, ``keras.ops``) and use only ``where``, ``isfinite``,
``logical_and``, ``logical_or``, ``logical_not`` and, for the linearisation term, ``sum``;
everything else is arithmetic on the framework's arrays. Python branches look only at the
configuration (the mode, ``linearized``, whether ``lr_x`` is a schedule), never at an array
value, so the same lines run eagerly, under ``jax.jit``, ``torch.compile`` and
``tf.function``.

The state the wrapper keeps besides its base's (:class:`ExtrapolationState`): the anchor,
the phase, the iteration count and the skipped-iteration count. The base optimizer's own
state is the base's: the adapter keeps it, and keeps the old one where a call says the
base did not step (:attr:`ExtrapolationCall.base_stepped`).

One call per phase, so adapters only store and apply:

- ``"gradient"`` mode, phase 0 (the parameters hold the anchor ``w_t``), given
  ``l(w_t), g(w_t)``: :func:`extrapolate` returns ``w~_t`` and the state with the anchor
  stored, phase 1.
- The update (phase 1 in ``"gradient"`` mode; every call in ``"past"`` and ``"noise"``
  modes), given ``l(w~_t), g(w~_t)``: :func:`update_inputs` returns where the base steps
  from (the anchor), the loss to hand it (corrected for ALI-G) and the skip flag; the
  adapter runs its base there (keeping its old state where skipped); then
  :func:`finish_update` returns the parameters and the state: ``w_{t+1}`` (phase 0) in
  ``"gradient"`` mode, ``w~_{t+1} = w_{t+1} + d_{t+1}`` with the anchor ``w_{t+1}``
  (phase 1) in ``"past"`` and ``"noise"`` modes.

``"past"`` needs no buffer for the past gradient: ``d_{t+1} = -lr_x * g(w~_t)`` is applied in
the call that used ``g(w~_t)``, so the parameters carry it (as ``w~ - w``) to the next call.
The noise ``xi`` is the caller's (the framework owns its random numbers): the noise of
iteration ``t``'s displacement is drawn with key counter ``t`` (``state.iteration + 1`` when
:func:`finish_update` is called), so a resumed run draws the same noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

from alig_core._extrapolation_config import ExtrapolationConfig
from alig_core._math import StepSize, keep_if_skipped, step_size

__all__ = [  # in the order of this module: the state, the pieces, the calls of one phase
    "ExtrapolationState",
    "ExtrapolationCall",
    "UpdateInputs",
    "initial_extrapolation_state",
    "evaluation_skipped",
    "resolve_lr_x",
    "anchor_step_size",
    "gradient_displacement",
    "noise_displacement",
    "noise_generator_seed",
    "extrapolated_point",
    "current_anchor",
    "anchor_params",
    "linearization_term",
    "linearized_loss",
    "extrapolated_step_size",
    "extrapolate",
    "update_inputs",
    "finish_update",
    "select_call",
]

Array = Any
"""An array or scalar of the framework in use (NumPy, JAX, torch, Keras tensors)."""


class ExtrapolationState(NamedTuple):
    """What the extrapolation wrapper carries between calls (its base's state is the base's)."""

    anchor: tuple[Array, ...]
    """``w_t``, one array per parameter; meaningful where ``phase`` is 1 (in phase 0 the
    parameters themselves hold the anchor and these arrays are not read)."""
    phase: Array
    """0-d integer: 0 = the parameters hold the anchor; 1 = they hold ``w~_t``, and the next
    call updates."""
    iteration: Array
    """0-d integer: iterations completed (base steps taken); the argument of an ``lr_x``
    schedule and the key counter of the noise."""
    skipped: Array
    """0-d integer: iterations skipped (a non-finite loss or gradient at either point)."""


class ExtrapolationCall(NamedTuple):
    """The outcome of one call: what to store and apply."""

    params: tuple[Array, ...]
    """What the parameters hold after the call."""
    state: ExtrapolationState
    """The wrapper's new state."""
    skipped: Array
    """bool: this call skipped the iteration (parameters back at the anchor)."""
    base_stepped: Array
    """bool: the base's new state is to be kept (else the base's old state, bit for bit)."""


class UpdateInputs(NamedTuple):
    """What the base optimizer steps with, from :func:`update_inputs`."""

    anchor: tuple[Array, ...]
    """The anchor ``w_t``, one array per parameter: the base steps from here."""
    loss: Array | None
    """The loss to hand the base: ``l(w~) + <g(w~), w - w~>`` where linearised, else
    ``l(w~)`` (``None`` where none was given)."""
    correction: Array
    """``<g(w~), w - w~>`` summed over the parameters with a gradient; 0 where not linearised."""
    skipped: Array
    """bool: skip the iteration (the base must not step)."""


def initial_extrapolation_state(params: Sequence[Array], zero: Array) -> ExtrapolationState:
    """The state before the first call (phase 0: the parameters hold the anchor).

    Args:
      params: the parameters; their arrays stand in for the anchor until phase 1 (an
        adapter that updates in place stores copies of its own).
      zero: a 0-d integer array of the framework, 0 (the counters' dtype).

    Example:
      >>> import numpy as np
      >>> s = initial_extrapolation_state([np.ones(2)], np.zeros((), np.int32))
      >>> int(s.phase), int(s.iteration), int(s.skipped)
      (0, 0, 0)
    """
    return ExtrapolationState(anchor=tuple(params), phase=zero, iteration=zero, skipped=zero)


def evaluation_skipped(xp: Any, loss: Array | None, sq_grad_norm: Array) -> Array:
    """Whether an evaluation skips the iteration: a non-finite loss or gradient.

    The gradient is non-finite where its squared global norm ``S`` is (an entry NaN or
    infinite, or entries so large that ``S`` overflows: the test ALI-G's step makes).

    Args:
      xp: the array namespace.
      loss: 0-d array, or ``None`` for a base that takes no loss (only ``S`` is tested).
      sq_grad_norm: 0-d array, ``S``.

    Example:
      >>> import numpy as np
      >>> bool(evaluation_skipped(np, np.float64(np.nan), np.float64(1.0)))
      True
    """
    finite = xp.isfinite(sq_grad_norm)
    if loss is not None:
        finite = xp.logical_and(xp.isfinite(loss), finite)
    return xp.logical_not(finite)


def resolve_lr_x(lr_x: Any, iteration: Array, default: Array | float | None) -> Array:
    """The displacement's step size: ``lr_x``, its schedule at ``iteration``, or the default.

    Args:
      lr_x: the configured value: ``None`` (take ``default``), a number, or a schedule.
      iteration: the index of the iteration the displacement belongs to.
      default: the base's own step size (SGD: its ``lr``; ALI-G: :func:`anchor_step_size`
        in ``"gradient"`` mode, the gamma of the update just taken in ``"past"`` mode).

    Raises:
      TypeError: ``lr_x`` is ``None`` and no ``default`` is given (an adapter bug).

    Example:
      >>> resolve_lr_x(None, 3, 0.5), resolve_lr_x(0.1, 3, 0.5)
      (0.5, 0.1)
      >>> resolve_lr_x(lambda t: t / 10, 3, 0.5)
      0.3
    """
    if lr_x is None:
        if default is None:
            raise TypeError(
                "lr_x=None takes the base optimizer's step size, and none was given: pass "
                "default_lr_x (SGD: its lr; ALI-G: anchor_step_size(...) in 'gradient' mode, "
                "the gamma of the update just taken in 'past' mode)."
            )
        return default
    if callable(lr_x) and getattr(lr_x, "shape", None) is None:
        return lr_x(iteration)
    return lr_x


def anchor_step_size(xp: Any, loss: Array, sq_grad_norm: Array, **hyperparameters: Any) -> Array:
    """ALI-G's step size at the anchor, the default ``lr_x`` of ALI-G in ``"gradient"`` mode.

    The core's formula (:func:`alig_core.step_size`) on ``l(w_t)`` and ``S(w_t)``, a pure
    function: ALI-G's counters and records do not move for it. 0 where the evaluation is
    not finite (that iteration is skipped anyway). ``hyperparameters`` are
    :func:`alig_core.step_size`'s: ``max_lr``, ``eps`` and ``f_star``.

    Example:
      >>> import numpy as np
      >>> float(anchor_step_size(np, np.float64(0.5), np.float64(1.0), max_lr=None, eps=0.0,
      ...                        f_star=0.0))
      0.5
    """
    return step_size(xp, loss, sq_grad_norm, **hyperparameters).gamma


def gradient_displacement(grad: Array, lr_x: Array | float) -> Array:
    """The displacement of the gradient modes: ``-lr_x * g`` (``g(w_t)`` or ``g(w~_{t-1})``).

    >>> gradient_displacement(2.0, 0.25)
    -0.5
    """
    return -lr_x * grad


def noise_displacement(noise: Array, sigma: Array | float) -> Array:
    """The displacement of ``"noise"`` mode: ``sigma * xi``, ``xi`` standard normal (the caller's).

    >>> noise_displacement(-1.5, 0.1)
    -0.15000000000000002
    """
    return sigma * noise


def noise_generator_seed(seed: int, iteration: int) -> int:
    """The seed of a stateful generator that draws iteration ``iteration``'s noise ``xi``.

    A function of ``(seed, iteration)`` only (a hash of both, 63 bits), for the backends
    whose generators take one integer seed (torch's ``torch.Generator.manual_seed``): a
    resumed run, or another process, draws the same noise for the same iteration.

    Example:
      >>> noise_generator_seed(0, 1) == noise_generator_seed(0, 1) != noise_generator_seed(0, 2)
      True
    """
    digest = hashlib.blake2b(
        f"alig-extrapolation-noise:{seed}:{iteration}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") >> 1


def extrapolated_point(anchor: Array, displacement: Array) -> Array:
    """``w~ = w + d`` (a displacement of exactly 0 leaves ``w`` bit for bit, but for ``-0.0``).

    >>> extrapolated_point(1.0, -0.5)
    0.5
    """
    return anchor + displacement


def current_anchor(xp: Any, phase: Array, anchor: Array, param: Array) -> Array:
    """The anchor of one parameter: the stored one in phase 1, the parameter itself in phase 0.

    This is the way to evaluate and save at the anchor while the parameters hold ``w~``.

    Example:
      >>> import numpy as np
      >>> float(current_anchor(np, np.int32(1), np.float64(2.0), np.float64(3.0)))
      2.0
    """
    return xp.where(phase > 0, anchor, param)


def anchor_params(xp: Any, state: ExtrapolationState, params: Sequence[Array]) -> tuple[Array, ...]:
    """:func:`current_anchor` of every parameter: the weights to evaluate and save."""
    return tuple(
        current_anchor(xp, state.phase, a, p) for a, p in zip(state.anchor, params, strict=True)
    )


def linearization_term(xp: Any, grad: Array, displacement: Array) -> Array:
    r"""One parameter's share of ``<g(w~), w - w~> = -<g(w~), d>``.

    Sum it over the parameters with a gradient (or compute the same sum with the
    framework's fused kernels). ``displacement`` is the one actually applied,
    ``w~ - w`` (the parameters minus the anchor), exactly 0 where the parameters hold the
    anchor.

    Example:
      >>> import numpy as np
      >>> float(linearization_term(np, np.array([1.0, 2.0]), np.array([-0.5, -1.0])))
      2.5
    """
    return -xp.sum(grad * displacement)


def linearized_loss(loss: Array, correction: Array, *, linearized: bool) -> Array:
    """The loss ALI-G takes at ``w~``: ``l(w~) + <g(w~), w - w~>``, or ``l(w~)`` if not linearised.

    Handing this to ALI-G's step size gives exactly the contract's
    ``gamma_hat = (l(w~) - f_star + <g(w~), w - w~>) / (||g(w~)||^2 + eps)``.

    >>> linearized_loss(0.125, 0.25, linearized=True)
    0.375
    >>> linearized_loss(0.125, 0.25, linearized=False)
    0.125
    """
    return loss + correction if linearized else loss


def extrapolated_step_size(
    xp: Any,
    loss: Array,
    sq_grad_norm: Array,
    correction: Array,
    *,
    max_lr: Array | float | None,
    eps: Array | float,
    f_star: Array | float,
    linearized: bool,
) -> StepSize:
    r"""ALI-G's step size at the extrapolated point, seen from the anchor (its proximal form).

    .. math::

        \hat\gamma = \frac{l(\tilde w) - f_\star + \langle g(\tilde w), w - \tilde w\rangle}
                          {\|g(\tilde w)\|^2 + \delta}, \qquad
        \gamma = \min(\max(\hat\gamma, 0), \eta)

    (without the inner product where ``linearized=False``): :func:`alig_core.step_size` on
    :func:`linearized_loss`. With ``d = 0`` the correction is 0 and this is ALI-G exactly.

    Example (``l = ||w||^2 / 2`` from ``w = 1`` with ``d = -0.5``: the linear model at
    ``w~ = 0.5`` seen from ``w`` is ``0.375``):

      >>> import numpy as np
      >>> s = extrapolated_step_size(np, np.float64(0.125), np.float64(0.25), np.float64(0.25),
      ...                            max_lr=None, eps=0.0, f_star=0.0, linearized=True)
      >>> float(s.gamma)
      1.5
    """
    return step_size(
        xp,
        linearized_loss(loss, correction, linearized=linearized),
        sq_grad_norm,
        max_lr=max_lr,
        eps=eps,
        f_star=f_star,
    )


def _false(xp: Any, flag: Array) -> Array:
    return xp.logical_and(flag, xp.logical_not(flag))


def extrapolate(
    xp: Any,
    config: ExtrapolationConfig,
    state: ExtrapolationState,
    params: Sequence[Array],
    grads: Sequence[Array | None],
    *,
    loss: Array | None,
    sq_grad_norm: Array,
    default_lr_x: Array | float | None = None,
) -> ExtrapolationCall:
    """The call at the anchor in ``"gradient"`` mode (phase 0): from ``w_t`` to ``w~_t``.

    ``d_t = -lr_x * g(w_t)`` (0 for a parameter without a gradient), ``w~_t = w_t + d_t``;
    the anchor ``w_t`` is stored and the phase becomes 1. A non-finite ``l(w_t)`` or
    ``g(w_t)`` skips the iteration: parameters and anchor bit for bit, phase 0, the skipped
    counter up.

    Args:
      xp: the array namespace.
      config: the wrapper's options (``mode`` must be ``"gradient"``).
      state: the state, in phase 0.
      params: the parameters (the anchor).
      grads: ``g(w_t)``, one per parameter (``None``: no gradient).
      loss: ``l(w_t)`` (0-d), or ``None`` where the loop gives none (then only the
        gradient is tested for the skip rule).
      sq_grad_norm: ``S(w_t)``, the squared global norm of ``grads``.
      default_lr_x: the base's step size, used where ``config.lr_x`` is ``None``: SGD's
        ``lr``, or :func:`anchor_step_size` of ``l(w_t)``, ``S(w_t)`` for ALI-G.

    Returns:
      An :class:`ExtrapolationCall` (``base_stepped`` is False: the base does not move).

    Example:
      >>> import numpy as np
      >>> from alig_core import ExtrapolationConfig
      >>> config = ExtrapolationConfig(lr_x=0.5)
      >>> state = initial_extrapolation_state([np.ones(1)], np.zeros((), np.int32))
      >>> call = extrapolate(np, config, state, [np.ones(1)], [np.ones(1)],
      ...                    loss=np.float64(0.5), sq_grad_norm=np.float64(1.0))
      >>> call.params[0].tolist(), call.state.anchor[0].tolist(), int(call.state.phase)
      ([0.5], [1.0], 1)
    """
    if config.mode != "gradient":
        raise ValueError(
            f"extrapolate() is the anchor call of mode='gradient'; this wrapper has "
            f"mode={config.mode!r}, which places the next point in finish_update(). Call "
            "update_inputs() and finish_update() on every call instead."
        )
    skipped = evaluation_skipped(xp, loss, sq_grad_norm)
    lr_x = resolve_lr_x(config.lr_x, state.iteration, default_lr_x)
    new_params, new_anchor = [], []
    for p, g, a in zip(params, grads, state.anchor, strict=True):
        point = p if g is None else extrapolated_point(p, gradient_displacement(g, lr_x))
        new_params.append(keep_if_skipped(xp, skipped, p, point))
        new_anchor.append(keep_if_skipped(xp, skipped, a, p))
    new_state = ExtrapolationState(
        anchor=tuple(new_anchor),
        phase=xp.where(skipped, state.phase, state.phase * 0 + 1),
        iteration=state.iteration,
        skipped=xp.where(skipped, state.skipped + 1, state.skipped),
    )
    return ExtrapolationCall(
        params=tuple(new_params),
        state=new_state,
        skipped=skipped,
        base_stepped=_false(xp, skipped),
    )


def update_inputs(
    xp: Any,
    state: ExtrapolationState,
    params: Sequence[Array],
    grads: Sequence[Array | None],
    *,
    loss: Array | None,
    sq_grad_norm: Array,
    linearized: bool,
) -> UpdateInputs:
    """The first half of an update call, given ``l(w~_t)`` and ``g(w~_t)``.

    Returns the anchor the base steps from (:func:`current_anchor` of every parameter),
    the loss to hand it and whether the iteration is skipped: a non-finite ``l(w~)`` or
    ``g(w~)``, or, where linearised, a non-finite corrected loss.

    Args:
      xp: the array namespace.
      state: the state (phase 1, or phase 0 in ``"past"``/``"noise"`` mode at the first
        call and after a skip: then the parameters are the anchor and ``d = 0``).
      params: what the parameters hold, ``w~_t``.
      grads: ``g(w~_t)``, one per parameter (``None``: no gradient).
      loss: ``l(w~_t)`` (0-d), or ``None`` for a base that takes none.
      sq_grad_norm: ``S(w~_t)``.
      linearized: add ``<g(w~), w - w~>`` to the loss (pass ``config.linearized`` for
        ALI-G as the base, ``False`` for a base that takes no loss).

    Example:
      >>> import numpy as np
      >>> state = initial_extrapolation_state([np.ones(1)], np.zeros((), np.int32))
      >>> state = state._replace(phase=np.ones((), np.int32))   # anchor 1, point 0.5
      >>> inputs = update_inputs(np, state, [np.array([0.5])], [np.array([0.5])],
      ...                        loss=np.float64(0.125), sq_grad_norm=np.float64(0.25),
      ...                        linearized=True)
      >>> inputs.anchor[0].tolist(), float(inputs.loss), bool(inputs.skipped)
      ([1.0], 0.375, False)
    """
    if linearized and loss is None:
        raise ValueError(
            "linearized=True corrects the loss at the extrapolated point, and no loss was "
            "given: pass loss=l(w~), or linearized=False for a base that takes no loss."
        )
    anchor = anchor_params(xp, state, params)
    skipped = evaluation_skipped(xp, loss, sq_grad_norm)
    terms = []
    if linearized:
        terms = [
            linearization_term(xp, g, p - a)
            for p, g, a in zip(params, grads, anchor, strict=True)
            if g is not None
        ]
    correction = sum(terms[1:], terms[0]) if terms else xp.where(skipped, 0.0, 0.0)
    base_loss = loss
    if linearized:
        base_loss = linearized_loss(loss, correction, linearized=True)
        skipped = xp.logical_or(skipped, xp.logical_not(xp.isfinite(base_loss)))
    return UpdateInputs(anchor=anchor, loss=base_loss, correction=correction, skipped=skipped)


def finish_update(
    xp: Any,
    config: ExtrapolationConfig,
    state: ExtrapolationState,
    inputs: UpdateInputs,
    base_params: Sequence[Array],
    grads: Sequence[Array | None],
    *,
    default_lr_x: Array | float | None = None,
    noise: Sequence[Array] | None = None,
) -> ExtrapolationCall:
    """The second half of an update call, once the base has stepped from the anchor.

    ``"gradient"`` mode: the parameters hold ``w_{t+1}``, phase 0. ``"past"`` mode:
    ``d_{t+1} = -lr_x * g(w~_t)`` (``lr_x`` resolved for iteration ``t+1``), ``"noise"``
    mode: ``d_{t+1} = sigma * xi_{t+1}``; the parameters hold ``w_{t+1} + d_{t+1}``, the
    anchor ``w_{t+1}``, phase 1. Projection, if any, is the base's: it applies to
    ``w_{t+1}``, not to the extrapolated point. Where ``inputs.skipped``: the parameters
    back at the anchor, the stored anchor and the iteration count bit for bit, phase 0,
    the skipped counter up, ``base_stepped`` False.

    Args:
      xp: the array namespace.
      config: the wrapper's options.
      state: the state the call began with.
      inputs: :func:`update_inputs` of this call.
      base_params: ``w_{t+1}``, the base's step from ``inputs.anchor`` (every parameter;
        those the base did not touch equal the anchor).
      grads: ``g(w~_t)`` (``"past"`` mode displaces along them; ``None``: no displacement).
      default_lr_x: ``"past"`` mode with ``lr_x=None``: the base's step size of this update
        (SGD: its ``lr``; ALI-G: the gamma it just took).
      noise: ``"noise"`` mode: ``xi_{t+1}``, one standard normal array per parameter, drawn
        with key counter ``state.iteration + 1``.

    Returns:
      An :class:`ExtrapolationCall`.

    Example:
      >>> import numpy as np
      >>> from alig_core import ExtrapolationConfig
      >>> config = ExtrapolationConfig(mode="past", lr_x=0.5)
      >>> state = initial_extrapolation_state([np.ones(1)], np.zeros((), np.int32))
      >>> inputs = update_inputs(np, state, [np.ones(1)], [np.ones(1)], loss=None,
      ...                        sq_grad_norm=np.float64(1.0), linearized=False)
      >>> call = finish_update(np, config, state, inputs, [np.array([0.9])], [np.ones(1)])
      >>> call.params[0].tolist(), call.state.anchor[0].tolist(), int(call.state.iteration)
      ([0.4], [0.9], 1)
    """
    skipped = inputs.skipped
    displacement: list[Array | None] | None = None
    if config.mode == "past":
        lr_x = resolve_lr_x(config.lr_x, state.iteration + 1, default_lr_x)
        displacement = [None if g is None else gradient_displacement(g, lr_x) for g in grads]
    elif config.mode == "noise":
        if noise is None:
            raise ValueError(
                "mode='noise' displaces by sigma * xi, and no noise was given: pass "
                "noise=[xi per parameter], standard normal, drawn with key counter "
                "state.iteration + 1."
            )
        displacement = [noise_displacement(xi, config.sigma) for xi in noise]
    zero = state.phase * 0
    if displacement is None:
        params = tuple(
            keep_if_skipped(xp, skipped, a, b)
            for a, b in zip(inputs.anchor, base_params, strict=True)
        )
        anchor = state.anchor
        phase = zero
    else:
        params = tuple(
            keep_if_skipped(xp, skipped, a, b if d is None else extrapolated_point(b, d))
            for a, b, d in zip(inputs.anchor, base_params, displacement, strict=True)
        )
        anchor = tuple(
            keep_if_skipped(xp, skipped, old, b)
            for old, b in zip(state.anchor, base_params, strict=True)
        )
        phase = xp.where(skipped, zero, zero + 1)
    new_state = ExtrapolationState(
        anchor=anchor,
        phase=phase,
        iteration=xp.where(skipped, state.iteration, state.iteration + 1),
        skipped=xp.where(skipped, state.skipped + 1, state.skipped),
    )
    return ExtrapolationCall(
        params=params, state=new_state, skipped=skipped, base_stepped=xp.logical_not(skipped)
    )


def select_call(
    xp: Any, condition: Array, if_true: ExtrapolationCall, if_false: ExtrapolationCall
) -> ExtrapolationCall:
    """Picks one of two calls, leaf by leaf, bit for bit (``xp.where``).

    For an adapter that cannot branch on the phase (a compiled alternating ``update``)
    and computes both the extrapolating and the updating call: select with
    ``state.phase > 0``.
    """

    def pick(a: Array, b: Array) -> Array:
        return xp.where(condition, a, b)

    def pick_all(a: Sequence[Array], b: Sequence[Array]) -> tuple[Array, ...]:
        return tuple(pick(x, y) for x, y in zip(a, b, strict=True))

    t, f = if_true.state, if_false.state
    return ExtrapolationCall(
        params=pick_all(if_true.params, if_false.params),
        state=ExtrapolationState(
            anchor=pick_all(t.anchor, f.anchor),
            phase=pick(t.phase, f.phase),
            iteration=pick(t.iteration, f.iteration),
            skipped=pick(t.skipped, f.skipped),
        ),
        skipped=pick(if_true.skipped, if_false.skipped),
        base_stepped=pick(if_true.base_stepped, if_false.base_stepped),
    )
