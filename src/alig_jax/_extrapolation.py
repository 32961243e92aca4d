"""Extrapolation around any optax transformation: glue around the core's procedure.

The procedure is :func:`alig_core._extrapolation.extrapolation_step`, called with
``jax.numpy`` and an array phase (both phases of ``"gradient"`` mode computed and one
selected, so a jitted update compiles once). This module flattens the trees, computes the
squared gradient norm once, runs the base transformation from the anchor (handing ALI-G
that norm), keeps the base's state where the core says, draws the noise, and turns the
parameters the core returns into optax updates. ``docs/guides/optax.md`` ("Extrapolation")
says how to use it; ``docs/extrapolation.md`` which details are the paper's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from alig_core import EXTRAPOLATION_MODES, ExtrapolationConfig
from alig_core._extrapolation import ExtrapolationState as CoreState
from alig_core._extrapolation import extrapolation_step
from alig_core._math import keep_if_skipped
from alig_jax._leaves import (
    accumulation_dtype,
    check_params,
    is_missing,
    loss_value,
    sum_of_squares,
)
from alig_jax._noise import draw_noise, noise_key
from alig_jax._transform import GIVEN_NORM, AliGState, GivenNorm

__all__ = ["ExtrapolationState", "anchor_params", "extrapolation", "extrapolation_anchor"]

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
    """The anchor ``w_t`` where ``phase`` is 1 or ``after_skip`` is True (else the params
    are the anchor; :func:`anchor_params` reads it in either case)."""
    phase: jax.Array
    """() int32: 0 = the params hold ``w_t``; 1 = they hold ``w~_t``: the next call updates."""
    iteration: jax.Array
    """() int32: iterations completed: the argument of an ``lr_x`` schedule and the noise's."""
    skipped: jax.Array
    """() int32: iterations skipped (a non-finite loss or gradient at either point)."""
    after_skip: jax.Array
    """() bool: a skip sent the params back from ``w~`` (``params + updates`` may miss the
    anchor by a rounding): the stored anchor is the anchor until the next call."""
    key: jax.Array | None
    """``mode="noise"``: the data of the key made from ``seed``, else ``None``."""
    config_code: jax.Array
    """int8 zeros of length 1 + 2 * (``mode``'s index in ``EXTRAPOLATION_MODES``) +
    ``linearized``: a shape, static under ``jit``, so ``update`` refuses a state of another
    ``mode`` or ``linearized`` even when traced."""
    base_state: optax.OptState
    """The base transformation's state; it advances once per iteration, from the anchor."""


def _config_code(config: ExtrapolationConfig) -> int:
    return 2 * EXTRAPOLATION_MODES.index(config.mode) + int(config.linearized)


def _describe_code(code: int) -> str:
    index = code // 2
    mode = EXTRAPOLATION_MODES[index] if 0 <= index < len(EXTRAPOLATION_MODES) else "?"
    return f"mode={mode!r}, linearized={bool(code % 2)}"


def _find(tree: Any, kind: type | tuple[type, ...]) -> list[Any]:
    """Every node of ``tree`` that is an instance of ``kind`` (outermost first)."""
    return [
        node
        for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
        if isinstance(node, kind)
    ]


def _injected_learning_rate(base_state: optax.OptState) -> tuple[jax.Array | None, str]:
    """The ``learning_rate`` of an ``optax.inject_hyperparams`` state, or ``None`` and why."""
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


def _check_lr_x_readable(base_state: optax.OptState) -> None:
    """Refuses ``lr_x=None`` where the base's step size cannot be read."""
    alig_states = len(_find(base_state, AliGState))
    if alig_states == 1:
        return
    why = f"it holds {alig_states} ALI-G states, and each has its own step size"
    if not alig_states:
        rate, why = _injected_learning_rate(base_state)
        if rate is not None:
            return
    raise ValueError(
        "Invalid lr_x: got None, which takes the base transformation's own step size, and "
        f"it cannot be read from this base: {why}. Pass lr_x explicitly (a number >= 0 or a "
        "schedule of the iteration, e.g. the base's learning rate), or build the base with "
        "optax.inject_hyperparams(optax.sgd)(learning_rate=..., momentum=..., nesterov=True) "
        "so that its learning rate is in its state; ALI-G (alig_jax.alig) needs nothing."
    )


def _keep_unless_stepped(stepped: jax.Array, old: Any, new: Any) -> Any:
    """One leaf of the base's state: the new one where the base stepped, else the old one.

    A ``None`` in place of an array (``optax.trace`` given a ``None`` gradient) keeps the
    old array: its buffer does not move, and the state keeps its structure.
    """
    if old is None or new is None:
        return old
    return keep_if_skipped(jnp, jnp.logical_not(stepped), old, new)


def _delta(target: jax.Array, param: jax.Array) -> jax.Array:
    """The update that takes ``param`` to ``target``: ``target - param``, a signed 0 where equal.

    Where they are equal the update is a zero of ``target``'s sign, so that the params stay
    bit for bit; elsewhere ``param + (target - param)`` is ``target`` within one rounding.
    """
    return jnp.where(target == param, jnp.copysign(jnp.zeros_like(target), target), target - param)


@dataclass
class _Base:
    """The base transformation as the core's ``ExtrapolationBase``: one update per call.

    Under the array phase the core runs the update (:meth:`run`) before it asks for the
    step size at the anchor (:meth:`step_size_at`), so both come from the one base update:
    ALI-G's answer through :class:`alig_jax._transform.GivenNorm` (the hyperparameters its
    update ran with), another base's ``learning_rate`` from the state its update made.
    """

    tx: optax.GradientTransformationExtraArgs
    state: ExtrapolationState
    updates: optax.Updates
    treedef: Any
    leaves: list[jax.Array]
    grads: list[Any]
    dtype: Any
    value: Any
    extra_args: dict[str, Any]
    takes_loss: bool
    reads_lr_x: bool
    given: GivenNorm | None = None
    new_state: optax.OptState | None = None

    def run(
        self, anchor: tuple[Any, ...], loss: Any, sq_grad_norm: Any, skipped: Any
    ) -> tuple[list[jax.Array], Any]:
        kwargs = dict(self.extra_args)
        if self.takes_loss:  # ALI-G: the (linearised) loss, and S as given
            self.given = GivenNorm(self.grads, sq_grad_norm)
            kwargs |= {"value": loss, GIVEN_NORM: self.given}
        elif self.value is not None:
            kwargs["value"] = self.value
        at = [a.astype(p.dtype) for a, p in zip(anchor, self.leaves, strict=True)]
        steps, self.new_state = self.tx.update(
            self.updates, self.state.base_state, self.treedef.unflatten(at), **kwargs
        )
        moved = [
            a if u is None else jnp.asarray(a + u).astype(a.dtype)
            for a, u in zip(at, self.treedef.flatten_up_to(steps), strict=True)
        ]
        step_size = self._step_size(lambda at, size: size) if self.reads_lr_x else 0.0
        return [m.astype(self.dtype) for m in moved], step_size

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        return self._step_size(lambda at, size: at(loss, sq_grad_norm))

    def _step_size(self, alig_answer: Any) -> Any:
        """ALI-G's answer (its one :class:`GivenNorm` answer), else the injected lr."""
        if self.new_state is None:
            raise RuntimeError("internal: the base's step size is read before its update ran")
        if self.given is not None:
            if len(self.given.answers) != 1:  # (two ALI-G's: init refused lr_x=None)
                raise ValueError(
                    "Invalid lr_x: got None, which takes ALI-G's own step size, and the ALI-G "
                    "in this base steps on gradients another transformation made (e.g. a "
                    "clipping before it, or an accumulation around it), so it cannot say its "
                    "step size for the wrapper's. Pass lr_x explicitly (a number >= 0 or a "
                    "schedule of the iteration), or wrap ALI-G alone."
                )
            return alig_answer(*self.given.answers[0])
        rate, why = _injected_learning_rate(self.new_state)
        if rate is None:  # init saw one; the update's state has none
            raise ValueError(f"Invalid lr_x: got None, and the base's step size: {why}.")
        return rate


def extrapolation(
    base: optax.GradientTransformation,
    *,
    mode: str = "gradient",
    lr_x: float | optax.Schedule | None = None,
    sigma: float | None = None,
    linearized: bool = True,
    seed: int | jax.Array | None = None,
    key: int | jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Extrapolated training around any optax transformation (EXTRAP-SGD and its variants).

    With :math:`w_t` the anchor, each iteration takes the base's step from the anchor with
    the gradient at an extrapolated point:

    .. math::

        \tilde w_t = w_t + d_t, \qquad
        w_{t+1} = w_t + \mathrm{Base}\big(g(\tilde w_t)\big),

    with :math:`d_t = -\text{lr\_x}\, g(w_t)` (``mode="gradient"``: two calls per
    iteration, at :math:`w_t` then at :math:`\tilde w_t`), :math:`-\text{lr\_x}\,
    g(\tilde w_{t-1})` (``"past"``: one call) or :math:`\sigma \xi_t` (``"noise"``: one
    call). ALI-G as the base steps on the linearised loss :math:`l(\tilde w_t) + \langle
    g(\tilde w_t), w_t - \tilde w_t\rangle`. ``update(grads, state, params, value=loss)``
    takes the gradient and loss at the point the params hold and returns the updates to
    what they must hold next; evaluate and save at :func:`anchor_params`. The details (the
    default ``lr_x``, skipped iterations, jit, checkpoints) are in the optax guide,
    ``docs/guides/optax.md``, "Extrapolation".

    Args:
      base: the optax transformation to wrap (``alig_jax.alig(...)``,
        ``optax.sgd(lr, momentum, nesterov=True)``, any other).
      mode: ``"gradient"``, ``"past"`` or ``"noise"``.
      lr_x: the displacement's step size in the gradient modes: a number >= 0, a schedule
        of the iteration, or ``None`` for the base's own (ALI-G's
        :meth:`~alig_jax.AliGTransformation.step_size_at`, else the ``learning_rate`` of
        an ``optax.inject_hyperparams`` base; refused at ``init`` where neither exists).
      sigma: ``"noise"`` mode: the noise's standard deviation (>= 0).
      linearized: ALI-G as the base: the linearised loss (``True``) or the plain loss.
      seed: ``"noise"`` mode: an int >= 0 (``None``: 0) or a JAX random key.
      key: deprecated name of ``seed`` (warns ``DeprecationWarning``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an :class:`ExtrapolationState`.

    Raises:
      ValueError: an invalid option or ``base`` (here); ``lr_x=None`` with a base whose
        step size cannot be read (``init``); no ``params``, for ALI-G no ``value``, or a
        state made by a wrapper of another ``mode`` or ``linearized`` (``update``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from alig_jax import alig, anchor_params, extrapolation
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
      >>> anchor = anchor_params(state, params)  # to evaluate and save

    References:
      T. Lin, L. Kong, S. U. Stich, M. Jaggi, "Extrapolation for Large-batch Training in
      Deep Learning", ICML 2020, arXiv:2006.05720.
    """
    config = ExtrapolationConfig(mode=mode, lr_x=lr_x, sigma=sigma, linearized=linearized)
    if not isinstance(base, optax.GradientTransformation):
        raise ValueError(
            f"Invalid base: got {base!r} (type {type(base).__name__}); expected an optax "
            "GradientTransformation. Pass e.g. alig_jax.alig(max_lr=0.1, momentum=0.9) or "
            "optax.sgd(0.1, momentum=0.9, nesterov=True)."
        )
    key_data, impl = noise_key(seed, key, config.mode)
    tx = optax.with_extra_args_support(base)
    reads_lr_x = config.mode != "noise" and config.lr_x is None
    code = _config_code(config)

    def init_fn(params: optax.Params) -> ExtrapolationState:
        check_params(params, who="extrapolation", verb="displaces")
        base_state = tx.init(params)
        if reads_lr_x:
            _check_lr_x_readable(base_state)
        zero = jnp.zeros((), jnp.int32)
        return ExtrapolationState(
            anchor=jax.tree.map(jnp.array, params),  # a copy
            phase=zero,
            iteration=zero,
            skipped=zero,
            after_skip=jnp.zeros((), bool),
            key=key_data,
            config_code=jnp.zeros((code + 1,), jnp.int8),
            base_state=base_state,
        )

    def update_fn(
        updates: optax.Updates,
        state: ExtrapolationState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ExtrapolationState]:
        value = extra_args.pop("value", None)  # the base gets its own (_Base.run)
        if params is None:
            raise ValueError(
                "extrapolation steps from the anchor and needs the params: call "
                "tx.update(grads, state, params, value=loss)."
            )
        _check_state(state)
        treedef: Any  # a jax PyTreeDef (flatten_up_to, unflatten: not in jax's stubs)
        grads, treedef = jax.tree.flatten(updates, is_leaf=is_missing)
        leaves = treedef.flatten_up_to(params)
        dtype = accumulation_dtype(leaves)
        anchor = [a.astype(dtype) for a in treedef.flatten_up_to(state.anchor)]
        # After a skip the stored anchor is the anchor, exactly (the params may be a rounding off).
        points = [
            jnp.where(state.after_skip, a, p.astype(dtype))
            for a, p in zip(anchor, leaves, strict=True)
        ]
        gradients = [None if g is None else g.astype(dtype) for g in grads]
        takes_loss = bool(_find(state.base_state, AliGState))  # ALI-G
        base = _Base(
            tx,
            state,
            updates,
            treedef,
            leaves,
            grads,
            dtype,
            value,
            extra_args,
            takes_loss,
            reads_lr_x,
        )
        loss = None
        if value is not None or takes_loss:
            loss = loss_value(value, dtype, who="extrapolation", missing=_MISSING, value_help=_HELP)
        sq_grad_norm = sum_of_squares([g for g in gradients if g is not None], dtype)
        noise = None
        if config.mode == "noise":
            state_key = state.key
            if state_key is None:
                raise ValueError(
                    "This ExtrapolationState holds no noise key (it was made by a wrapper of "
                    "another mode), and mode='noise' draws its noise from it. Restore the "
                    "state of a mode='noise' wrapper, or start from tx.init(params)."
                )
            noise = lambda t: draw_noise(state_key, impl, t, points)  # noqa: E731
        call = extrapolation_step(
            jnp,
            config,
            CoreState(tuple(anchor), state.phase, state.iteration, state.skipped),
            points,
            gradients,
            loss=loss,
            sq_grad_norm=sq_grad_norm,
            base=base,
            noise=noise,
        )
        base_state = jax.tree.map(
            lambda old, new: _keep_unless_stepped(call.base_stepped, old, new),
            state.base_state,
            base.new_state,
            is_leaf=is_missing,
        )
        targets = [t.astype(p.dtype) for t, p in zip(call.params, leaves, strict=True)]
        new_state = ExtrapolationState(
            anchor=treedef.unflatten(
                [a.astype(p.dtype) for a, p in zip(call.state.anchor, leaves, strict=True)]
            ),
            phase=call.state.phase.astype(jnp.int32),
            iteration=call.state.iteration.astype(jnp.int32),
            skipped=call.state.skipped.astype(jnp.int32),
            after_skip=jnp.logical_and(
                call.skipped, jnp.logical_or(state.phase > 0, state.after_skip)
            ),
            key=state.key,
            config_code=state.config_code,
            base_state=base_state,
        )
        deltas = [_delta(t, p) for t, p in zip(targets, leaves, strict=True)]
        return treedef.unflatten(deltas), new_state

    def _check_state(state: ExtrapolationState) -> None:
        marker = getattr(state, "config_code", None)
        saved = () if marker is None else jnp.shape(marker)
        if saved != (code + 1,):
            made_by = _describe_code(saved[0] - 1) if len(saved) == 1 else "an unknown wrapper"
            raise ValueError(
                f"This ExtrapolationState was made by extrapolation({made_by}), and this "
                f"wrapper has {_describe_code(code)}: resuming would change the run. Build "
                "the wrapper with the checkpoint's mode and linearized to resume from it."
            )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def anchor_params(state: Any, params: optax.Params) -> optax.Params:
    """The anchor ``w_t``: the params to evaluate and save while they may hold ``w~_t``.

    The stored anchor where the state is in phase 1 or just after a skipped iteration
    (then bit for bit), ``params`` themselves otherwise; leaf by leaf with ``jnp.where``,
    so it runs under ``jit``.

    Args:
      state: the :class:`ExtrapolationState` of :func:`extrapolation`, or a tree holding
        exactly one (e.g. a ``chain``'s state; with flax.nnx:
        ``nnx.as_pure(optimizer.opt_state)``).
      params: what the params hold now.

    Returns:
      A tree like ``params``.

    Raises:
      ValueError: ``state`` holds no :class:`ExtrapolationState`, or several.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from alig_jax import anchor_params, extrapolation
      >>> tx = extrapolation(optax.sgd(0.1), lr_x=0.5)
      >>> params = jnp.array([1.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)  # the gradient of w**2/2 is w
      >>> params = optax.apply_updates(params, updates)  # w~ = 1 - 0.5 * 1
      >>> params.tolist(), anchor_params(state, params).tolist()
      ([0.5], [1.0])
    """
    found = _find(state, ExtrapolationState)
    if len(found) != 1:
        raise ValueError(
            f"anchor_params needs the state of alig_jax.extrapolation, and the state "
            f"given holds {len(found)} ExtrapolationState(s) (type {type(state).__name__}). "
            "Pass the state that tx.init / tx.update returned (with flax.nnx: "
            "nnx.as_pure(optimizer.opt_state))."
        )
    s = found[0]
    stored = jnp.logical_or(s.phase > 0, s.after_skip)
    return jax.tree.map(lambda a, p: jnp.where(stored, a, p), s.anchor, params)


def extrapolation_anchor(state: Any, params: optax.Params) -> optax.Params:
    """Deprecated name of :func:`anchor_params` (warns ``DeprecationWarning``)."""
    warnings.warn(
        "alig_jax.extrapolation_anchor is deprecated: use alig_jax.anchor_params(state, params).",
        DeprecationWarning,
        stacklevel=2,
    )
    return anchor_params(state, params)
