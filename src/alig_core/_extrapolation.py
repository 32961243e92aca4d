r"""The extrapolation procedure, written once for every framework (``docs/extrapolation.md``).

Seed: Lin, Kong, Stich, Jaggi, "Extrapolation for Large-batch Training in Deep Learning",
ICML 2020, arXiv:2006.05720. With ``w_t`` the anchor, a displacement ``d_t`` gives the
extrapolated point ``w~_t = w_t + d_t``; the loop evaluates the loss and the gradient
there, and the base optimizer steps *from the anchor* with ``g(w~_t)``.

One function, :func:`extrapolation_step`, makes one call of the wrapper: given the
configuration, the state, what the parameters hold, the gradients, the loss and ``S`` (the
squared gradient norm, computed once by the adapter) of this call, and a *base* that says
how it steps (:class:`ExtrapolationBase`), it decides the phase, every default-``lr_x``
rule, the linearised loss, the skip, the next point, and whether the base's state is kept.
An adapter stores the state, writes the parameters, and runs its framework's optimizer
inside :meth:`ExtrapolationBase.run`.

Design, the same as :mod:`alig_core._math`: the arithmetic goes through :class:`ArrayLists`,
operations on lists of arrays written once over an array namespace ``xp`` (``numpy``,
``jax.numpy``, ``torch``, ``keras.ops``) with only ``where``, ``isfinite``,
``logical_and``, ``logical_or``, ``logical_not`` and ``sum``; an adapter may pass a subclass
that does the same operations with its framework's fused kernels (torch's ``_foreach``).
Python branches look at the configuration, and at the phase and the skip flag only where
the adapter gives them as Python values (an eager adapter: torch); given as arrays, both
phases are computed and one selected with ``where``, so the same lines run under
``jax.jit`` and ``tf.function``.

``"past"`` needs no buffer for the past gradient: ``d_{t+1} = -lr_x * g(w~_t)`` is applied in
the call that used ``g(w~_t)``, so the parameters carry it (as ``w~ - w``) to the next call.
The noise ``xi`` is the adapter's (the framework owns its random numbers): iteration ``t``'s
is drawn with key counter ``t``, so a resumed run draws the same noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from alig_core._extrapolation_config import ExtrapolationConfig
from alig_core._math import keep_if_skipped

__all__ = [
    "ArrayLists",
    "ExtrapolationBase",
    "ExtrapolationCall",
    "ExtrapolationState",
    "current_anchor",
    "extrapolation_step",
    "initial_extrapolation_state",
    "noise_generator_seed",
]

Array = Any
"""An array or scalar of the framework in use (NumPy, JAX, torch, Keras tensors)."""


class ExtrapolationState(NamedTuple):
    """What the extrapolation wrapper carries between calls (its base's state is the base's)."""

    anchor: tuple[Array, ...]
    """``w_t``, one array per parameter; meaningful where ``phase`` is 1 (in phase 0 the
    parameters themselves hold the anchor and these arrays are not read)."""
    phase: Array
    """0 = the parameters hold the anchor; 1 = they hold ``w~_t``, and the next call updates.
    A Python ``int`` where the adapter branches on it (eager), else a 0-d integer array."""
    iteration: Array
    """Iterations completed (base steps taken): the argument of an ``lr_x`` schedule and the
    key counter of the noise."""
    skipped: Array
    """Iterations skipped (a non-finite loss or gradient at either point)."""


class ExtrapolationCall(NamedTuple):
    """The outcome of one call: what to store and apply."""

    params: tuple[Array, ...]
    """What the parameters hold after the call."""
    state: ExtrapolationState
    """The wrapper's new state."""
    skipped: Array
    """bool: this call skipped the iteration (parameters back at the anchor)."""
    base_stepped: Array
    """bool: keep the base's new state (else its old state, bit for bit)."""


class ExtrapolationBase(Protocol):
    """How the wrapped optimizer steps, as an adapter tells the core.

    ALI-G's adapters expose :meth:`step_size_at` themselves, so that the core never reads
    ALI-G's hyperparameters: an ALI-G option that changes the step size changes the default
    ``lr_x`` with it.
    """

    @property
    def takes_loss(self) -> bool:
        """Whether the base steps on the loss (ALI-G): it gets the linearised loss."""
        ...

    def step_size_at(self, loss: Array | None, sq_grad_norm: Array) -> Array | float:
        """The base's step size for an evaluation ``(l, S)``, moving nothing.

        ALI-G: its ``gamma`` (0 where the evaluation would be skipped); SGD: its ``lr``.
        The default ``lr_x`` of ``"gradient"`` mode, at the anchor.
        """
        ...

    def run(
        self,
        anchor: tuple[Array, ...],
        loss: Array | None,
        sq_grad_norm: Array,
        skipped: Array,
    ) -> tuple[Sequence[Array], Array | float]:
        """Steps the base from ``anchor`` with this call's gradients (the adapter's).

        Args:
          anchor: where the base steps from, one array per parameter.
          loss: the loss to step on (ALI-G: linearised where configured), or ``None``.
          sq_grad_norm: ``S`` of this call's gradients: ALI-G takes it as given and does
            not compute it again.
          skipped: whether the core discards this step (an array: a compiled adapter steps
            and keeps the base's old state where the call's ``base_stepped`` is False; where
            :meth:`ArrayLists.decide` gives a Python ``True``, ``run`` is not called).

        Returns:
          Every parameter after the step (one the base did not touch equals the anchor),
          and the step size taken (SGD: its ``lr``; ALI-G: its ``gamma``): the default
          ``lr_x`` of ``"past"`` mode.
        """
        ...


Noise = Callable[[Array], Sequence[Array]]
"""``noise(t) -> xi_t``: one standard normal array per parameter, for key counter ``t``."""


def initial_extrapolation_state(params: Sequence[Array], zero: Array) -> ExtrapolationState:
    """The state before the first call (phase 0: the parameters hold the anchor).

    Args:
      params: the parameters; their arrays stand in for the anchor until phase 1 (an
        adapter that updates in place stores copies of its own).
      zero: the counters' 0 (a Python ``0`` for an eager adapter, else a 0-d integer array).

    Example:
      >>> import numpy as np
      >>> s = initial_extrapolation_state([np.ones(2)], np.zeros((), np.int32))
      >>> int(s.phase), int(s.iteration), int(s.skipped)
      (0, 0, 0)
    """
    return ExtrapolationState(anchor=tuple(params), phase=zero, iteration=zero, skipped=zero)


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


def current_anchor(xp: Any, phase: Array, anchor: Array, param: Array) -> Array:
    """The anchor of one parameter: the stored one in phase 1, the parameter itself in phase 0.

    The way to evaluate and save at the anchor while the parameters hold ``w~``.

    Example:
      >>> import numpy as np
      >>> float(current_anchor(np, np.int32(1), np.float64(2.0), np.float64(3.0)))
      2.0
    """
    if isinstance(phase, int):
        return anchor if phase else param
    return xp.where(phase > 0, anchor, param)


class ArrayLists:
    """The operations of the procedure on lists of arrays, generic over ``xp``.

    An adapter may subclass it to run the same operations with fused kernels (one launch
    per list, e.g. torch's ``_foreach``) and, where it knows the skip flag on the host,
    to branch instead of selecting (:meth:`decide`).

    Args:
      xp: the array namespace.
    """

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def decide(self, flag: Array, loss: Array | None) -> Array:
        """The skip flag as the adapter branches on it: the array itself (compiled code).

        ``loss`` is the loss the call steps on (in an update around a base that takes the
        loss, the linearised one): an adapter whose ranks must agree on it gets it here.
        """
        return flag

    def keep(self, flag: Array, old: Sequence[Array], new: Sequence[Array]) -> tuple[Array, ...]:
        """``old`` where ``flag``, else ``new``, array by array, bit for bit."""
        if isinstance(flag, bool):
            return tuple(old if flag else new)
        return tuple(keep_if_skipped(self.xp, flag, a, b) for a, b in zip(old, new, strict=True))

    def add_scaled(
        self, xs: Sequence[Array], ys: Sequence[Array | None], scale: Array | float
    ) -> tuple[Array, ...]:
        """``x + scale * y`` for each pair (``x`` itself where ``y`` is ``None``)."""
        return tuple(x if y is None else x + scale * y for x, y in zip(xs, ys, strict=True))

    def inner_with_difference(
        self, grads: Sequence[Array | None], xs: Sequence[Array], ys: Sequence[Array]
    ) -> Array | None:
        """``sum_i <g_i, x_i - y_i>`` over the arrays with a gradient (``None``: there is none)."""
        terms = [
            self.xp.sum(g * (x - y)) for g, x, y in zip(grads, xs, ys, strict=True) if g is not None
        ]
        return sum(terms[1:], terms[0]) if terms else None


def extrapolation_step(
    xp: Any,
    config: ExtrapolationConfig,
    state: ExtrapolationState,
    params: Sequence[Array],
    grads: Sequence[Array | None],
    *,
    loss: Array | None,
    sq_grad_norm: Array,
    base: ExtrapolationBase,
    noise: Noise | None = None,
    lists: ArrayLists | None = None,
) -> ExtrapolationCall:
    r"""One call of the extrapolation wrapper: places ``w~_t``, or updates, or both, selected.

    In ``"gradient"`` mode, a call in phase 0 (the parameters hold the anchor ``w_t``) is
    at the anchor: ``d_t = -lr_x * g(w_t)``, ``w~_t = w_t + d_t``, the anchor stored, phase
    1; the base does not step. Every other call updates: the base steps from the anchor with
    ``g(w~_t)`` (ALI-G on the linearised loss ``l(w~) + <g(w~), w - w~>``, so that
    :math:`\hat\gamma = (l(\tilde w) - f_\star + \langle g(\tilde w), w - \tilde w\rangle)
    / (\|g(\tilde w)\|^2 + \delta)`); then ``"gradient"`` mode is back at ``w_{t+1}``,
    phase 0, and ``"past"``/``"noise"`` modes place ``w~_{t+1} = w_{t+1} + d_{t+1}`` with
    ``d_{t+1} = -lr_x * g(w~_t)`` or ``sigma * xi_{t+1}``, phase 1.

    ``lr_x`` is a number, a schedule of the iteration, or ``None``: the base's step size,
    :meth:`ExtrapolationBase.step_size_at` at the anchor in ``"gradient"`` mode and the
    step size :meth:`ExtrapolationBase.run` took in ``"past"`` mode. A non-finite loss or
    gradient (or linearised loss) skips the iteration: parameters back at the anchor, the
    stored anchor and the iteration count bit for bit, phase 0, the skipped counter up, the
    base's state kept. Projection, if any, is the base's: it applies to ``w_{t+1}``.

    Args:
      xp: the array namespace.
      config: the wrapper's options.
      state: the state the call begins with; a Python ``int`` phase branches, an array
        phase computes both phases of ``"gradient"`` mode and selects one.
      params: what the parameters hold (``w_t`` or ``w~_t``).
      grads: this call's gradient, one per parameter (``None``: no gradient).
      loss: this call's loss (0-d), or ``None`` for a base that takes none.
      sq_grad_norm: ``S``, the squared global norm of ``grads`` (the only one computed).
      base: how the base steps.
      noise: ``"noise"`` mode: ``noise(t) -> xi_t``.
      lists: the list operations (default: :class:`ArrayLists` of ``xp``).

    Returns:
      An :class:`ExtrapolationCall`.

    Raises:
      ValueError: a base that takes a loss and none was given, or ``"noise"`` mode without
        ``noise``.

    Example (EXTRAP-SGD on ``l(w) = w^2 / 2`` from ``w = 1``, SGD lr 0.1, ``lr_x`` 0.5):

      >>> import numpy as np
      >>> from alig_core import ExtrapolationConfig
      >>> class SGD:
      ...     takes_loss = False
      ...     def step_size_at(self, loss, sq_grad_norm):
      ...         return 0.1
      ...     def run(self, anchor, loss, sq_grad_norm, skipped):
      ...         return [a - 0.1 * g for a, g in zip(anchor, grads)], 0.1
      >>> config, params = ExtrapolationConfig(lr_x=0.5), (np.array([1.0]),)
      >>> state = initial_extrapolation_state(params, 0)
      >>> for _ in range(2):  # at the anchor, then the update
      ...     grads = params  # the gradient of w^2 / 2
      ...     call = extrapolation_step(np, config, state, params, grads, loss=None,
      ...                               sq_grad_norm=float(params[0] @ params[0]), base=SGD())
      ...     params, state = call.params, call.state
      ...     print(params[0].tolist(), state.phase)
      [0.5] 1
      [0.95] 0
    """
    if base.takes_loss and loss is None:
        raise ValueError(
            "The base optimizer steps on the loss (ALI-G), and no loss was given: pass the "
            "loss of the gradients this call holds."
        )
    if config.mode == "noise" and noise is None:
        raise ValueError(
            "mode='noise' displaces by sigma * xi, and no noise was given: pass "
            "noise=callable(t) -> [xi per parameter], standard normal."
        )
    ops = ArrayLists(xp) if lists is None else lists
    call = _Call(xp, ops, config, state, tuple(params), tuple(grads), loss, sq_grad_norm, base)
    if config.mode != "gradient":
        return call.update(noise)
    if isinstance(state.phase, int):
        return call.update(noise) if state.phase else call.extrapolate()
    return _select(xp, state.phase > 0, call.update(noise), call.extrapolate())


# ---------------------------------------------------------------- the two kinds of call


class _Call(NamedTuple):
    """The inputs of one call, and its two kinds: at the anchor, and the update."""

    xp: Any
    ops: ArrayLists
    config: ExtrapolationConfig
    state: ExtrapolationState
    params: tuple[Array, ...]
    grads: tuple[Array | None, ...]
    loss: Array | None
    sq_grad_norm: Array
    base: ExtrapolationBase

    def evaluation_skipped(self) -> Array:
        """A non-finite loss or gradient (``S`` is not finite where an entry is, or overflows)."""
        xp = self.xp
        finite = xp.isfinite(self.sq_grad_norm)
        if self.loss is not None:
            finite = xp.logical_and(xp.isfinite(self.loss), finite)
        return xp.logical_not(finite)

    def lr_x(self, iteration: Array, default: Callable[[], Any]) -> Any:
        """``lr_x``, its schedule at ``iteration``, or (``None``) the base's step size."""
        lr_x = self.config.lr_x
        if lr_x is None:
            return default()
        if callable(lr_x) and getattr(lr_x, "shape", None) is None:
            return lr_x(iteration)
        return lr_x

    def counter(self, flag: Array, if_true: Array, if_false: Array) -> Array:
        """``where`` on a counter; Python ints stay Python ints where ``flag`` is a bool."""
        if isinstance(flag, bool):
            return if_true if flag else if_false
        return self.xp.where(flag, if_true, if_false)

    def extrapolate(self) -> ExtrapolationCall:
        """At the anchor (``"gradient"`` mode, phase 0): ``w~_t = w_t - lr_x * g(w_t)``."""
        ops, state = self.ops, self.state
        skipped = ops.decide(self.evaluation_skipped(), self.loss)
        lr_x = self.lr_x(
            state.iteration, lambda: self.base.step_size_at(self.loss, self.sq_grad_norm)
        )
        points = ops.add_scaled(self.params, self.grads, -lr_x)
        return ExtrapolationCall(
            params=ops.keep(skipped, self.params, points),
            state=ExtrapolationState(
                anchor=ops.keep(skipped, state.anchor, self.params),
                phase=self.counter(skipped, state.phase, state.phase * 0 + 1),
                iteration=state.iteration,
                skipped=self.counter(skipped, state.skipped + 1, state.skipped),
            ),
            skipped=skipped,
            base_stepped=False
            if isinstance(skipped, bool)
            else self.xp.logical_and(skipped, self.xp.logical_not(skipped)),
        )

    def update(self, noise: Noise | None) -> ExtrapolationCall:
        """The base steps from the anchor with ``g(w~_t)``; then ``w_{t+1}`` or ``w~_{t+1}``."""
        xp, ops, config, state = self.xp, self.ops, self.config, self.state
        if isinstance(state.phase, int):
            anchor = state.anchor if state.phase else self.params
        else:
            anchor = ops.keep(state.phase > 0, state.anchor, self.params)
        skipped = self.evaluation_skipped()
        loss = self.loss
        if config.linearized and self.base.takes_loss:  # l(w~) + <g(w~), w - w~>
            correction = ops.inner_with_difference(self.grads, anchor, self.params)
            if correction is not None:
                loss = loss + correction
                skipped = xp.logical_or(skipped, xp.logical_not(xp.isfinite(loss)))
        skipped = ops.decide(skipped, loss)
        stepped: tuple[Array, ...] = anchor
        step_size: Array | float = 0.0
        if skipped is not True:  # (True: decided on the host; the base does not run)
            ran, step_size = self.base.run(anchor, loss, self.sq_grad_norm, skipped)
            stepped = tuple(ran)
        if config.mode == "gradient":
            new_params = ops.keep(skipped, anchor, stepped)
            new_anchor, phase = state.anchor, state.phase * 0
        else:
            if config.mode == "past":
                lr_x = self.lr_x(state.iteration + 1, lambda: step_size)
                points = ops.add_scaled(stepped, self.grads, -lr_x)
            else:
                assert noise is not None
                points = ops.add_scaled(stepped, noise(state.iteration + 1), config.sigma)
            new_params = ops.keep(skipped, anchor, points)
            new_anchor = ops.keep(skipped, state.anchor, stepped)
            phase = self.counter(skipped, state.phase * 0, state.phase * 0 + 1)
        return ExtrapolationCall(
            params=new_params,
            state=ExtrapolationState(
                anchor=new_anchor,
                phase=phase,
                iteration=self.counter(skipped, state.iteration, state.iteration + 1),
                skipped=self.counter(skipped, state.skipped + 1, state.skipped),
            ),
            skipped=skipped,
            base_stepped=(not skipped) if isinstance(skipped, bool) else xp.logical_not(skipped),
        )


def _select(
    xp: Any, condition: Array, if_true: ExtrapolationCall, if_false: ExtrapolationCall
) -> ExtrapolationCall:
    """One of two calls, leaf by leaf, bit for bit (``xp.where``): no branch on an array."""

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
