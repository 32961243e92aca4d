"""Extrapolation around any optax transformation (``docs/extrapolation.md``).

The numbers come from :mod:`alig_core` (``extrapolate``, ``update_inputs``,
``finish_update``, ``select_call``), called with ``jax.numpy``. This module flattens the
trees, runs the base transformation from the anchor, keeps the state, draws the noise and
turns the parameters the core returns into optax updates. See ``docs/extrapolation.md``
for which details are the paper's and which are this project's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import alig_core
from alig_core import ExtrapolationConfig
from alig_jax._leaves import (
    accumulation_dtype,
    check_params,
    is_missing,
    loss_value,
    sum_of_squares,
)
from alig_jax._transform import AliGState

__all__ = ["ExtrapolationState", "extrapolation", "extrapolation_anchor"]

_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)

_HELP = (
    "Pass the loss of the minibatch whose gradients you pass, at the point the params hold: "
    "tx.update(grads, state, params, value=loss) (with flax.nnx: optimizer.update(model, "
    "grads, value=loss))."
)
_MISSING = f"extrapolation(alig(...)) needs the loss of the minibatch it steps with. {_HELP}"


class ExtrapolationState(NamedTuple):
    """State of :func:`extrapolation`: the anchor, the phase, the counters, the base's state."""

    anchor: optax.Params
    """A tree like the params (their shapes and dtypes): the anchor ``w_t`` while ``phase``
    is 1. In phase 0 the params themselves are the anchor and this tree is not read (read
    the anchor with :func:`extrapolation_anchor` in either phase)."""
    phase: jax.Array
    """() int32: 0 = the params hold the anchor ``w_t``; 1 = they hold ``w~_t`` and the next
    call updates."""
    iteration: jax.Array
    """() int32: iterations completed (base steps taken): the argument of an ``lr_x``
    schedule and the counter the noise key is folded with."""
    skipped: jax.Array
    """() int32: iterations skipped (a non-finite loss or gradient at either point)."""
    key: jax.Array | None
    """``mode="noise"``: the noise key's data (``jax.random.key_data``; (2,) uint32 for the
    default threefry key), ``None`` in the other modes."""
    base_state: optax.OptState
    """The base transformation's state; it advances once per iteration, from the anchor."""


# ---------------------------------------------------------------- reading the base's state


def _find(tree: Any, kind: type | tuple[type, ...]) -> list[Any]:
    """Every node of ``tree`` that is an instance of ``kind`` (outermost first)."""
    return [
        node
        for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
        if isinstance(node, kind)
    ]


def _is_alig(base_state: optax.OptState) -> bool:
    """Whether the base is ALI-G: its state holds an :class:`alig_jax.AliGState`."""
    return bool(_find(base_state, AliGState))


def _base_step_size(base_state: optax.OptState) -> tuple[jax.Array | None, str]:
    """The step size the base reports in ``base_state``, or ``None`` and why not.

    ALI-G (an ``AliGState`` anywhere in the state, under ``chain`` or
    ``inject_hyperparams`` included): its ``gamma``, the step size of the last step taken.
    Else the ``learning_rate`` hyperparameter of an ``optax.inject_hyperparams`` state: the
    value its last update used.
    """
    alig_states = _find(base_state, AliGState)
    if len(alig_states) == 1:
        return alig_states[0].gamma, ""
    if alig_states:
        return None, f"it holds {len(alig_states)} ALI-G states, and each has its own gamma"
    rates = [
        s.hyperparams["learning_rate"]
        for s in _find(base_state, _INJECT_STATES)
        if "learning_rate" in s.hyperparams
    ]
    if len(rates) == 1:
        return rates[0], ""
    if rates:
        return None, f"it holds {len(rates)} injected learning rates"
    return None, (
        "it keeps no step size in its state (optax.sgd keeps its learning rate in a closure "
        "unless it is built with optax.inject_hyperparams)"
    )


def _refuse_missing_lr_x(why: str) -> None:
    raise ValueError(
        "Invalid lr_x: got None, which takes the base transformation's own step size, and "
        f"it cannot be read from this base: {why}. Pass lr_x explicitly (a number >= 0 or a "
        "schedule of the iteration, e.g. the base's learning rate), or build the base with "
        "optax.inject_hyperparams(optax.sgd)(learning_rate=..., momentum=..., nesterov=True) "
        "so that its learning rate is in its state; ALI-G (alig_jax.alig) needs nothing."
    )


# ---------------------------------------------------------------- small helpers


def _key_data(key: Any) -> tuple[jax.Array, Any]:
    """A noise key (an int seed, a ``jax.random.key`` or a raw ``PRNGKey``) as (data, impl)."""
    if isinstance(key, bool) or not isinstance(key, int | jax.Array):
        raise ValueError(
            f"Invalid key: got {key!r} (type {type(key).__name__}); expected an int seed or "
            "a JAX random key. Pass e.g. key=0 or key=jax.random.key(0) with mode='noise'."
        )
    if isinstance(key, int):
        key = jax.random.key(key)
    elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return jax.random.key_data(key), jax.random.key_impl(key)


def draw_noise(
    key_data: jax.Array, impl: Any, iteration: jax.Array | int, like: Sequence[jax.Array]
) -> list[jax.Array]:
    """``xi_t``: one standard normal array per leaf of ``like``, from ``fold_in(key, t)``.

    The noise of iteration ``t`` depends on the key and ``t`` only (so a resumed run draws
    the same): ``jax.random.split(jax.random.fold_in(key, t), n)[i]`` for leaf ``i``.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=impl), iteration)
    keys = jax.random.split(key, len(like))
    return [jax.random.normal(k, jnp.shape(x), x.dtype) for k, x in zip(keys, like, strict=True)]


def _apply(param: jax.Array, update: jax.Array | None) -> jax.Array:
    """``optax.apply_updates`` on one leaf (``None``: no update)."""
    return param if update is None else jnp.asarray(param + update).astype(param.dtype)


def _keep_unless_stepped(stepped: jax.Array, old: Any, new: Any) -> Any:
    """One leaf of the base's state: the new one where the base stepped, else the old one.

    Where the new state has ``None`` in place of an array (``optax.trace`` given a ``None``
    gradient), the old array is kept: that parameter had no gradient, so its buffer does
    not move, and the state keeps its structure (a jitted update does not recompile).
    """
    if old is None or new is None:
        return old
    return alig_core._math.keep_if_skipped(jnp, jnp.logical_not(stepped), old, new)


def _delta(target: jax.Array, param: jax.Array) -> jax.Array:
    """The update that takes ``param`` to ``target``: ``target - param``, a signed 0 where equal.

    ``param + (target - param)`` is ``target`` exactly where ``target`` is within a factor
    of 2 of ``param`` (Sterbenz) or is ``param`` plus one rounded addition (a step computed
    eagerly), and within one rounding elsewhere. Where they are equal the update is a zero
    of ``target``'s sign, so that the params stay bit for bit.
    """
    return jnp.where(target == param, jnp.copysign(jnp.zeros_like(target), target), target - param)


# ---------------------------------------------------------------- the transformation


def extrapolation(
    base: optax.GradientTransformation,
    *,
    mode: str = "gradient",
    lr_x: float | optax.Schedule | None = None,
    sigma: float | None = None,
    linearized: bool = True,
    key: int | jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Extrapolated training around any optax transformation (EXTRAP-SGD and its variants).

    With :math:`w_t` the iterate (the *anchor*), each iteration takes the base's step from
    the anchor with the gradient at an extrapolated point:

    .. math::

        \tilde w_t = w_t + d_t, \qquad
        w_{t+1} = w_t + \mathrm{Base}\big(g(\tilde w_t)\big),

    where the displacement :math:`d_t` is, by ``mode``:

    * ``"gradient"`` (EXTRAP-SGD): :math:`d_t = -\text{lr\_x}\, g(w_t)`, a minibatch gradient
      at the anchor; calls alternate: the first of an iteration is made at :math:`w_t` and
      moves the params to :math:`\tilde w_t`, the second is made there and updates;
    * ``"past"``: :math:`d_t = -\text{lr\_x}\, g(\tilde w_{t-1})`, the gradient the previous
      update used (:math:`d_0 = 0`); every call updates and moves the params to
      :math:`\tilde w_{t+1}`: one gradient per iteration;
    * ``"noise"``: :math:`d_t = \sigma \xi_t`, :math:`\xi_t` standard normal from
      ``jax.random.fold_in(key, t)`` (the perturbation baseline); like ``"past"``, one call
      per iteration, and :math:`d_0 = 0`.

    The base's state moves once per iteration. A base that is ALI-G (:func:`alig_jax.alig`;
    detected by an :class:`alig_jax.AliGState` in its state, also under ``optax.chain`` or
    ``optax.inject_hyperparams``) takes the Polyak step of the linear model of the loss at
    :math:`\tilde w_t` seen from the anchor: the ``value=`` it receives is
    :math:`l(\tilde w_t) + \langle g(\tilde w_t), w_t - \tilde w_t\rangle` (with
    ``linearized=False``: :math:`l(\tilde w_t)`). Any other base receives ``value=`` (and
    every other extra argument) as given. Projection (``alig(max_norm=...)``) is the base's
    step, so it applies to :math:`w_{t+1}`, never to :math:`\tilde w_t`.

    ``update(grads, state, params, *, value=None, **extra_args)`` takes the gradient (and
    the loss: required for ALI-G, optional otherwise, where it joins the skip rule) at the
    point the params hold, and returns updates that land, with ``optax.apply_updates``, on
    what the params must hold next: :math:`\tilde w_t` after an extrapolating call,
    :math:`w_{t+1}` (``"gradient"``) or :math:`\tilde w_{t+1}` (``"past"``, ``"noise"``)
    after an update. The updates are ``new - params``, an array for every param (also one
    without a gradient: it may go back to the anchor); ``params + updates`` is ``new``
    exactly where the new value is within a factor of 2 of the old (the usual case), and
    within one rounding elsewhere.
    Both phases are computed and one is selected with ``jnp.where``, so a jitted update
    compiles once. Between calls the params may hold :math:`\tilde w_t`: evaluate and
    save at :func:`extrapolation_anchor`.

    A non-finite loss or gradient norm at either point skips the whole iteration: the
    stored anchor, the base's state and the iteration count stay bit for bit, the params go
    back to the anchor (bit for bit where they held it, else up to one rounding) and
    ``skipped`` goes up.

    Args:
      base: the optax transformation to wrap (``alig_jax.alig(...)``,
        ``optax.sgd(lr, momentum, nesterov=True)``, any other); its ``update`` gets the
        extra arguments (``optax.with_extra_args_support``).
      mode: ``"gradient"``, ``"past"`` or ``"noise"``.
      lr_x: the displacement's step size in the gradient modes: a number >= 0, a schedule
        of the iteration, or ``None`` (the default) for the base's own step size read from
        its state: ALI-G's ``gamma`` (in ``"gradient"`` mode its step size at the anchor,
        from the base's update on ``l(w_t)``, ``g(w_t)`` whose state is then discarded, so
        ALI-G's counters do not move; in ``"past"`` mode the gamma of the update just
        taken), else the ``learning_rate`` of an ``optax.inject_hyperparams`` base. Where it
        cannot be read (plain ``optax.sgd``), ``init`` refuses ``lr_x=None``. ``lr_x=0``
        makes the wrapper its base, bit for bit. ``None`` in ``"noise"`` mode.
      sigma: ``"noise"`` mode: the noise's standard deviation (>= 0; required there, and
        ``None`` elsewhere).
      linearized: ALI-G as the base: the linearised loss (``True``) or the plain loss at
        :math:`\tilde w_t` (``False``); other bases ignore it.
      key: ``"noise"`` mode: an int seed or a JAX random key (required there, ``None``
        elsewhere). It is kept in the state, so a restored state draws the same noise.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an :class:`ExtrapolationState`.

    Raises:
      ValueError: an invalid ``mode``, ``lr_x``, ``sigma``, ``linearized`` or ``key``, or a
        ``base`` that is not an optax transformation (here); ``lr_x=None`` with a base
        whose step size cannot be read (``init``); no ``params`` or, for ALI-G, no
        ``value`` (``update``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from alig_jax import alig, extrapolation, extrapolation_anchor
      >>> loss_fn = lambda w: 0.5 * jnp.sum(w ** 2)
      >>> params = jnp.array([1.0, -2.0])
      >>> tx = extrapolation(alig(max_lr=0.5, momentum=0.9))
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for _ in range(4):  # two iterations: extrapolate, update, extrapolate, update
      ...     loss, grads = jax.value_and_grad(loss_fn)(params)
      ...     updates, state = update(grads, state, params, value=loss)
      ...     params = optax.apply_updates(params, updates)
      >>> int(state.iteration), int(state.phase)
      (2, 0)
      >>> anchor = extrapolation_anchor(state, params)  # to evaluate and save

    References:
      T. Lin, L. Kong, S. U. Stich, M. Jaggi, "Extrapolation for Large-batch Training in
      Deep Learning", ICML 2020, arXiv:2006.05720 (the extrapolation); the details above
      that are this project's choices are listed in ``docs/extrapolation.md``.
    """
    config = ExtrapolationConfig(mode=mode, lr_x=lr_x, sigma=sigma, linearized=linearized)
    if not isinstance(base, optax.GradientTransformation):
        raise ValueError(
            f"Invalid base: got {base!r} (type {type(base).__name__}); expected an optax "
            "GradientTransformation. Pass e.g. alig_jax.alig(max_lr=0.1, momentum=0.9) or "
            "optax.sgd(0.1, momentum=0.9, nesterov=True)."
        )
    key_data, impl = None, None
    if mode == "noise":
        if key is None:
            raise ValueError(
                "Invalid key: got None with mode='noise'; expected an int seed or a JAX random "
                "key for the noise. Pass e.g. key=0 or key=jax.random.key(0)."
            )
        key_data, impl = _key_data(key)
    elif key is not None:
        raise ValueError(
            f"Invalid key: got {key!r} with mode={mode!r}; expected None: the key draws the "
            "noise of mode='noise' only. Leave key=None, or pass mode='noise'."
        )
    tx = optax.with_extra_args_support(base)
    reads_lr_x = config.mode != "noise" and config.lr_x is None

    def init_fn(params: optax.Params) -> ExtrapolationState:
        check_params(params, who="extrapolation", verb="displaces")
        base_state = tx.init(params)
        if reads_lr_x and _base_step_size(base_state)[0] is None:
            _refuse_missing_lr_x(_base_step_size(base_state)[1])
        zero = jnp.zeros((), jnp.int32)
        return ExtrapolationState(
            anchor=jax.tree.map(jnp.array, params),  # a copy
            phase=zero,
            iteration=zero,
            skipped=zero,
            key=key_data if config.mode == "noise" else None,
            base_state=base_state,
        )

    def update_fn(
        updates: optax.Updates,
        state: ExtrapolationState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ExtrapolationState]:
        value = extra_args.pop("value", None)  # the base gets its own (base_kwargs)
        if params is None:
            raise ValueError(
                "extrapolation steps from the anchor and needs the params: call "
                "tx.update(grads, state, params, value=loss)."
            )
        is_alig = _is_alig(state.base_state)
        if reads_lr_x and _base_step_size(state.base_state)[0] is None:
            _refuse_missing_lr_x(_base_step_size(state.base_state)[1])
        treedef: Any  # a jax PyTreeDef (flatten_up_to, unflatten: not in jax's stubs)
        grads, treedef = jax.tree.flatten(updates, is_leaf=is_missing)
        leaves = treedef.flatten_up_to(params)
        dtype = accumulation_dtype(leaves)

        def up(x: jax.Array) -> jax.Array:  # the core computes in the accumulation dtype
            return jnp.asarray(x).astype(dtype)

        def down(xs: Sequence[jax.Array]) -> list[jax.Array]:  # back to each param's dtype
            return [x.astype(p.dtype) for x, p in zip(xs, leaves, strict=True)]

        points = tuple(up(p) for p in leaves)
        gradients = tuple(None if g is None else up(g) for g in grads)
        core_state = alig_core._extrapolation.ExtrapolationState(
            anchor=tuple(up(a) for a in treedef.flatten_up_to(state.anchor)),
            phase=state.phase,
            iteration=state.iteration,
            skipped=state.skipped,
        )
        loss = None
        if value is not None or is_alig:
            loss = loss_value(value, dtype, who="extrapolation", missing=_MISSING, value_help=_HELP)
        sq_grad_norm = sum_of_squares([g for g in gradients if g is not None], dtype)

        def base_kwargs(base_value: Any) -> dict[str, Any]:
            return extra_args if base_value is None else {**extra_args, "value": base_value}

        def base_update(at: Sequence[jax.Array], base_value: Any) -> tuple[Any, Any]:
            """The base's step from ``at`` with the given gradient: (new params, new state)."""
            at_leaves = down(at)
            steps, new_state = tx.update(
                updates, state.base_state, treedef.unflatten(at_leaves), **base_kwargs(base_value)
            )
            moved = [
                _apply(a, u) for a, u in zip(at_leaves, treedef.flatten_up_to(steps), strict=True)
            ]
            return tuple(up(m) for m in moved), new_state

        # The update: every call in "past"/"noise" mode, phase 1 in "gradient" mode.
        inputs = alig_core._extrapolation.update_inputs(
            jnp,
            core_state,
            points,
            gradients,
            loss=loss,
            sq_grad_norm=sq_grad_norm,
            linearized=config.linearized and is_alig,
        )
        stepped, new_base_state = base_update(inputs.anchor, inputs.loss if is_alig else value)
        default = None
        if config.mode == "past" and config.lr_x is None:
            default = _base_step_size(new_base_state)[0]  # the step size of this update
        noise = None
        if config.mode == "noise":  # d_{t+1} = sigma * xi_{t+1}
            if state.key is None:
                raise ValueError(
                    "This ExtrapolationState holds no noise key (key=None: it was made by a "
                    "wrapper of another mode), and mode='noise' draws its noise from it. "
                    "Restore the state of a mode='noise' wrapper, or start from tx.init(params)."
                )
            noise = draw_noise(state.key, impl, state.iteration + 1, points)
        call = alig_core._extrapolation.finish_update(
            jnp,
            config,
            core_state,
            inputs,
            stepped,
            gradients,
            default_lr_x=default,
            noise=noise,
        )
        if config.mode == "gradient":  # phase 0: the call at the anchor, w_t -> w~_t
            default = None
            if config.lr_x is None:  # the base's step size at the anchor; its state is dropped
                _, probe = tx.update(updates, state.base_state, params, **base_kwargs(value))
                default = _base_step_size(probe)[0]
            extrapolating = alig_core._extrapolation.extrapolate(
                jnp,
                config,
                core_state,
                points,
                gradients,
                loss=loss,
                sq_grad_norm=sq_grad_norm,
                default_lr_x=default,
            )
            call = alig_core._extrapolation.select_call(jnp, state.phase > 0, call, extrapolating)

        base_state = jax.tree.map(
            lambda old, new: _keep_unless_stepped(call.base_stepped, old, new),
            state.base_state,
            new_base_state,
            is_leaf=is_missing,
        )
        targets = down(call.params)
        new_state = ExtrapolationState(
            anchor=treedef.unflatten(down(call.state.anchor)),
            phase=call.state.phase.astype(jnp.int32),
            iteration=call.state.iteration.astype(jnp.int32),
            skipped=call.state.skipped.astype(jnp.int32),
            key=state.key,
            base_state=base_state,
        )
        deltas = [_delta(t, p) for t, p in zip(targets, leaves, strict=True)]
        return treedef.unflatten(deltas), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def extrapolation_anchor(state: Any, params: optax.Params) -> optax.Params:
    """The anchor ``w_t``: the params to evaluate and save while they may hold ``w~_t``.

    The stored anchor where the state is in phase 1, ``params`` themselves in phase 0
    (``alig_core._extrapolation.current_anchor``, leaf by leaf, with ``jnp.where``: it runs under ``jit``).

    Args:
      state: the :class:`ExtrapolationState` of :func:`extrapolation`, or a tree holding
        exactly one (e.g. a ``chain``'s state; with flax.nnx:
        ``nnx.as_pure(optimizer.opt_state)``).
      params: what the params hold now.

    Returns:
      A tree like ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from alig_jax import extrapolation, extrapolation_anchor
      >>> tx = extrapolation(optax.sgd(0.1), lr_x=0.5)
      >>> params = jnp.array([1.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)  # the gradient of w**2/2 is w
      >>> params = optax.apply_updates(params, updates)  # w~ = 1 - 0.5 * 1
      >>> params.tolist(), extrapolation_anchor(state, params).tolist()
      ([0.5], [1.0])
    """
    found = _find(state, ExtrapolationState)
    if len(found) != 1:
        raise ValueError(
            f"extrapolation_anchor needs the state of alig_jax.extrapolation, and the state "
            f"given holds {len(found)} ExtrapolationState(s) (type {type(state).__name__}). "
            "Pass the state that tx.init / tx.update returned (with flax.nnx: "
            "nnx.as_pure(optimizer.opt_state))."
        )
    s = found[0]
    return jax.tree.map(
        lambda a, p: alig_core._extrapolation.current_anchor(jnp, s.phase, a, p), s.anchor, params
    )
