r"""Extrapolation around any ``torch.optim.Optimizer``: glue around the core's procedure.

The procedure (phases, default ``lr_x``, linearised loss, skip rule, state) is
:func:`alig_core._extrapolation.extrapolation_step`; this module stores its state (the
anchor in the optimizer's ``state``, the phase and counters as Python ints), takes the loss
in (:class:`alig_torch._loss.LossIntake`, the one AliG has), computes the squared gradient
norm once (AliG's own, for an AliG base), makes the ranks agree under torch.distributed
(one collective per call), writes the parameters, and steps the base from the anchor. The
list operations run as ``torch._foreach`` kernels, and the skip flag is read on the host
(:class:`_Lists`), so the core branches. The user's guide is the "Extrapolation" section of
``docs/guides/torch.md``; the procedure is ``docs/extrapolation.md``'s.
"""

from __future__ import annotations

import contextlib
import math
import operator
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from alig_core import ExtrapolationConfig
from alig_core._config import describe_value
from alig_core._extrapolation import (
    ArrayLists,
    ExtrapolationCall,
    ExtrapolationState,
    current_anchor,
    extrapolation_step,
    noise_generator_seed,
)
from alig_core._extrapolation_config import validate_seed
from alig_core._scalars import python_scalars
from alig_torch import _distributed
from alig_torch._accumulation import Accumulation
from alig_torch._loss import LossIntake, LossNames, loss_as_tensor
from alig_torch._norms import accumulation_dtype
from alig_torch._optimizer import AliG

__all__ = ["ANCHOR_GRADIENTS", "Extrapolation"]

ANCHOR_GRADIENTS: tuple[str, ...] = ("all_reduced", "local")
"""Under data parallelism, which gradient at the anchor places ``w~`` in ``"gradient"`` mode."""

_LOSS_HELP = (
    "Hand the loss over as for any torch optimizer: opt.step(closure) with a closure that "
    "zeroes the gradients, computes the loss, calls loss.backward() and returns the loss, "
    "or opt.step(loss=loss) after loss.backward() (one evaluation per call: calls alternate "
    "between the anchor and the extrapolated point in mode='gradient'). With a GradScaler "
    "(which refuses closures): scaler.unscale_(opt); scaler.step(opt, loss=loss) with the "
    "unscaled loss."
)

_NAMES = LossNames(
    step="Extrapolation.step",
    who="Extrapolation",
    no_loss=(
        "Extrapolation around AliG got no loss: ALI-G computes its step size (and its default "
        f"lr_x) from the loss at every evaluation. {_LOSS_HELP}"
    ),
    loss_help=_LOSS_HELP,
)


class _HostScalars(type(python_scalars)):  # type: ignore[misc]
    """Python numbers as the core's ``xp`` (every tensor on the CPU): no 0-d tensor ops."""

    @staticmethod
    def logical_or(a: bool, b: bool) -> bool:
        return bool(a) or bool(b)


_HOST = _HostScalars()


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value))
    return math.isfinite(value)


def _sum_of_squares(grads: list[torch.Tensor], host: bool) -> Any:
    """``S`` for a base that takes no loss, where it decides the skip only.

    The gradients' norms (one foreach kernel, in float32 or float64 as AliG accumulates),
    squared and added in float64: a float on the host.
    """
    if not grads:
        return 0.0 if host else torch.zeros((), dtype=torch.float64)
    wide = any(g.dtype == torch.float64 for g in grads)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64 if wide else torch.float32)
    if host:
        return sum(float(n) ** 2 for n in norms)
    device = grads[0].device
    return torch.stack([n.to(device, torch.float64) for n in norms]).square().sum()


def _copy_into(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """``target.copy_(source)`` where they are not the same tensor: one foreach kernel."""
    same = list(map(operator.is_, targets, sources))
    if not any(same):
        torch._foreach_copy_(list(targets), list(sources))
    elif not all(same):
        pairs = [(t, s) for t, s, x in zip(targets, sources, same, strict=True) if not x]
        torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])


class _Lists(ArrayLists):
    """The core's list operations as ``torch._foreach`` kernels (one launch per list).

    :meth:`decide` reads the skip flag on the host (one synchronisation per call on an
    accelerator), agreed over the ranks under torch.distributed, so the core branches
    instead of selecting with ``where``. :meth:`inner_with_difference` keeps its result:
    under torch.distributed the ranks agree on the linearised loss.
    """

    def __init__(self, host: bool, agree: Callable[[Any, Any], bool]) -> None:
        super().__init__(torch)
        self.host = host
        self.agree = agree
        self.correction: Any = None

    def decide(self, flag: Any) -> bool:
        return self.agree(flag, self.correction)

    def add_scaled(
        self, xs: Sequence[Any], ys: Sequence[Any | None], scale: Any
    ) -> tuple[Any, ...]:
        index = [i for i, y in enumerate(ys) if y is not None]
        whole = len(index) == len(ys)
        ys_: list[Any] = list(ys) if whole else [ys[i] for i in index]
        if not ys_:
            return tuple(xs)
        xs_ = list(xs) if whole else [xs[i] for i in index]
        if isinstance(scale, torch.Tensor):  # a schedule's tensor: promoted as the core's
            moved = [x + scale * y for x, y in zip(xs_, ys_, strict=True)]
        else:  # x + (scale * y) as the core writes it (no fused multiply-add), in place
            dtype, device = ys_[0].dtype, ys_[0].device
            if all(y.dtype == dtype and y.device == device for y in ys_):
                # the scalar rounded to the tensors' dtype, as torch rounds a Python scalar
                # (the same bits); a 0-d tensor takes the fast foreach path
                scale = torch.full((), scale, dtype=dtype, device=device)
            moved = torch._foreach_mul(ys_, scale)
            torch._foreach_add_(moved, xs_)
        if whole:
            return tuple(moved)
        out = list(xs)
        for i, tensor in zip(index, moved, strict=True):
            out[i] = tensor
        return tuple(out)

    def inner_with_difference(
        self, grads: Sequence[Any | None], xs: Sequence[Any], ys: Sequence[Any]
    ) -> Any:
        index = [i for i, g in enumerate(grads) if g is not None]
        if not index:
            return None
        gs = [grads[i] for i in index]
        diffs = torch._foreach_sub([xs[i] for i in index], [ys[i] for i in index])
        if self.host:
            total: Any = 0.0
            for g, d in zip(gs, diffs, strict=True):
                total += float(torch.dot(g.reshape(-1), d.reshape(-1)))
        else:
            terms = [torch.sum(g * d) for g, d in zip(gs, diffs, strict=True)]  # type: ignore[operator]
            total = sum(terms[1:], terms[0])
        self.correction = total
        return total


class _Guard:
    """The base's step pre-hook: refuses ``base.step()`` called past the wrapper."""

    __slots__ = ("stepping",)

    def __init__(self) -> None:
        self.stepping = False

    def __call__(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if not self.stepping:
            raise RuntimeError(
                f"This {type(optimizer).__name__} is wrapped by alig_torch.Extrapolation, and "
                "its step() was called directly: the base must step only through the "
                "wrapper (from the anchor, once per iteration). Call the wrapper's step() "
                "instead (and hand the wrapper, not its base, to GradScaler, LR schedulers "
                "and trainers)."
            )


_WRAPPED: weakref.WeakKeyDictionary[Optimizer, weakref.ref[Extrapolation]] = (
    weakref.WeakKeyDictionary()
)
"""Each base optimizer's live wrapper (a base is wrapped at most once)."""


class _ForeignBase:
    """A base that takes no loss (SGD, Adam, ...), as the core sees it: its ``lr``."""

    takes_loss = False

    def __init__(self, wrapper: Extrapolation, params: list[torch.Tensor]) -> None:
        self.wrapper, self.params = wrapper, params

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        return self.wrapper._group_lr()

    def run(self, anchor: Sequence[Any], loss: Any, sq_grad_norm: Any, skipped: Any) -> Any:
        if skipped:
            return anchor, 0.0
        _copy_into(self.params, anchor)  # the base steps from w_t
        self.wrapper._step_base()
        wrapper = self.wrapper
        past_default = wrapper._config.mode == "past" and wrapper._config.lr_x is None
        return self.params, wrapper._group_lr() if past_default else 0.0


class _AliGBase:
    """AliG as the core sees it: its own step size, and a step with the ``(loss, S)`` given."""

    takes_loss = True

    def __init__(self, wrapper: Extrapolation, params: list[torch.Tensor], evaluation: Any):
        self.wrapper, self.params, self.evaluation = wrapper, params, evaluation
        self.agreed = False  # the ranks agreed on (loss, S): use the evaluation's

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        if self.agreed:
            loss, sq_grad_norm = self.evaluation.loss, self.evaluation.sq_grad_norm
        return self.wrapper.base_optimizer.step_size_at(loss, sq_grad_norm)

    def run(self, anchor: Sequence[Any], loss: Any, sq_grad_norm: Any, skipped: Any) -> Any:
        if skipped:
            return anchor, 0.0
        _copy_into(self.params, anchor)  # the base steps from w_t
        evaluation = self.evaluation
        if not self.agreed:
            evaluation = evaluation._replace(loss=loss, sq_grad_norm=sq_grad_norm)
        gamma = self.wrapper.base_optimizer._step_with(evaluation)
        return self.params, gamma


class Extrapolation(Optimizer):
    r"""Extrapolated steps around any ``torch.optim.Optimizer`` (EXTRAP-SGD and relatives).

    With :math:`w_t` the iterate (the *anchor*), each iteration evaluates the loss and the
    gradient at an extrapolated point and lets the base optimizer step **from the anchor**
    with that gradient:

    .. math::

        \tilde w_t = w_t + d_t, \qquad
        w_{t+1} = \mathrm{Base}\big(w_t,\ g(\tilde w_t)\big)

    with :math:`d_t = -\mathrm{lr_x}\, g(w_t)` (``"gradient"``, two evaluations per
    iteration), :math:`-\mathrm{lr_x}\, g(\tilde w_{t-1})` (``"past"``) or
    :math:`\sigma \xi_t` (``"noise"``). Around :class:`~alig_torch.AliG`, ALI-G steps on
    the linearised loss :math:`l(\tilde w) + \langle g(\tilde w), w_t - \tilde w\rangle`.
    A non-finite loss or gradient skips the iteration (parameters back at the anchor, the
    base's state untouched). The call forms, ``lr_x=None``, the parameters between calls
    (:meth:`at_anchor`), checkpoints, DDP and the pitfalls: the "Extrapolation" section of
    the PyTorch guide (``docs/guides/torch.md``); the procedure: ``docs/extrapolation.md``.

    Args:
      base_optimizer: the optimizer to wrap (its ``param_groups`` are shared).
      mode: ``"gradient"``, ``"past"`` or ``"noise"``.
      lr_x: the displacement's step size: ``None`` (the base's), a number >= 0 (0: the
        wrapper is its base, bit for bit) or a schedule of the iteration count.
      sigma: the noise scale (``"noise"`` mode only, required there).
      linearized: around AliG, the linearised loss (``True``) or the plain one.
      alternate: ``step(closure)`` in ``"gradient"`` mode calls the closure once per step
        and alternates (``True``), or twice on the same batch (``False``).
      anchor_gradient: ``"all_reduced"`` or ``"local"`` (under DDP).
      seed: the noise's seed (``"noise"`` mode; default 0).

    Raises:
      ValueError: an invalid option, or a base that cannot be wrapped.

    Example:
      >>> import torch
      >>> from alig_torch import AliG, Extrapolation
      >>> model = torch.nn.Linear(3, 1)
      >>> opt = Extrapolation(AliG(model.parameters(), max_lr=0.1, momentum=0.9))
      >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
      >>> def closure():
      ...     opt.zero_grad()
      ...     loss = (model(x) - y).square().mean()
      ...     loss.backward()
      ...     return loss
      >>> loss = opt.step(closure)  # at the anchor, then at the extrapolated point
      >>> opt.iteration, opt.is_extrapolated
      (1, False)

    Reference:
      T. Lin, L. Kong, S. U. Stich, M. Jaggi, "Extrapolation for Large-batch Training in
      Deep Learning", ICML 2020, arXiv:2006.05720.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        mode: str = "gradient",
        *,
        lr_x: float | Callable[[int], Any] | None = None,
        sigma: float | None = None,
        linearized: bool = True,
        alternate: bool = False,
        anchor_gradient: str = "all_reduced",
        seed: int | None = None,
    ) -> None:
        config = ExtrapolationConfig(mode=mode, lr_x=lr_x, sigma=sigma, linearized=linearized)
        if not isinstance(base_optimizer, Optimizer):
            raise ValueError(
                f"Invalid base_optimizer: got {describe_value(base_optimizer)}; expected a "
                "torch.optim.Optimizer (e.g. torch.optim.SGD(params, lr=0.1, momentum=0.9, "
                "nesterov=True) or alig_torch.AliG(params, max_lr=0.1)). Build the optimizer "
                "first, then wrap it."
            )
        if isinstance(base_optimizer, Extrapolation):
            raise ValueError(
                "Invalid base_optimizer: got an Extrapolation; expected the optimizer it "
                "wraps. Extrapolation does not nest: wrap the base optimizer once."
            )
        previous = _WRAPPED.get(base_optimizer)
        if previous is not None and previous() is not None:
            raise ValueError(
                f"This {type(base_optimizer).__name__} is already wrapped by another "
                "Extrapolation: two wrappers would each step it. Use the existing wrapper, "
                "or build a new base optimizer."
            )
        if not isinstance(alternate, bool):
            raise ValueError(
                f"Invalid alternate: got {describe_value(alternate)}; expected True or False. Pass "
                "alternate=True for one closure call per step (calls alternate between the "
                "anchor and the extrapolated point), False for both on the same batch."
            )
        if anchor_gradient not in ANCHOR_GRADIENTS:
            raise ValueError(
                f"Invalid anchor_gradient: got {describe_value(anchor_gradient)}; expected "
                "'all_reduced' (the anchor pass is an ordinary DDP backward: every rank "
                "extrapolates along the averaged gradient) or 'local' (the anchor pass runs "
                "under ddp_model.no_sync(): each rank along its own)."
            )
        self._config = config
        self.alternate = alternate
        self.anchor_gradient = anchor_gradient
        self.seed = validate_seed(seed, mode=config.mode)
        self.base_optimizer = base_optimizer
        self._is_alig = isinstance(base_optimizer, AliG)
        self._constructing = True
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self._constructing = False
        self.param_groups = base_optimizer.param_groups  # one list: additions show in both
        self.defaults = base_optimizer.defaults
        self._phase = 0
        self._iteration = 0
        self._skipped = 0
        self._in_anchor_context = False
        for p in self._params():
            self._check_param(p)
            self.state[p]["anchor"] = p.detach().clone()
        self._guard = _Guard()
        self._install_guard()
        self._own_intake = LossIntake(Accumulation(self), self._loss_device_and_dtype)

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _check_param(p: torch.Tensor) -> None:
        if p.is_complex() or not p.is_floating_point():
            raise ValueError(
                f"Extrapolation moves real floating-point parameters; got one of dtype "
                f"{p.dtype} and shape {tuple(p.shape)}. Optimize torch.view_as_real(p) for a "
                "complex parameter; leave integer tensors out of the optimizer."
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from torch.distributed.tensor import DTensor

            if isinstance(p, DTensor):
                raise ValueError(
                    "Extrapolation does not support DTensor (FSDP2, tensor parallel) "
                    f"parameters yet (got one of shape {tuple(p.shape)}): its gradient norm "
                    "and displacement would be a shard's. Use DDP, or the base optimizer "
                    "without extrapolation."
                )

    def _install_guard(self) -> None:
        handle = self.base_optimizer.register_step_pre_hook(self._guard)
        weakref.finalize(self, handle.remove)
        _WRAPPED[self.base_optimizer] = weakref.ref(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group to the base optimizer (the groups are shared).

        Raises:
          RuntimeError: while the parameters hold the extrapolated point (the new
            parameters would have no anchor): add it when :attr:`is_extrapolated` is False.
        """
        if getattr(self, "_constructing", False):  # Optimizer.__init__: the base's groups
            self.param_groups.append(param_group)
            return
        if self._phase:
            raise RuntimeError(
                "Extrapolation.add_param_group() while the parameters hold the extrapolated "
                "point: add the group when opt.is_extrapolated is False (after an update in "
                "mode='gradient')."
            )
        self.base_optimizer.add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._check_param(p)
            self.state[p]["anchor"] = p.detach().clone()

    def __getstate__(self) -> dict[str, Any]:
        dropped = ("_guard", "_own_intake", "_cached")
        return {k: v for k, v in self.__dict__.items() if k not in dropped}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._guard = _Guard()
        self._install_guard()
        self._own_intake = LossIntake(Accumulation(self), self._loss_device_and_dtype)

    def __repr__(self) -> str:
        c = self._config
        options = f"mode={c.mode!r}, lr_x={c.lr_x!r}, sigma={c.sigma!r}, linearized={c.linearized}"
        return f"Extrapolation({options},\n  base_optimizer={self.base_optimizer!r})"

    # ------------------------------------------------------------------ public state

    @property
    def config(self) -> ExtrapolationConfig:
        """The validated options (mode, lr_x, sigma, linearized), the core's."""
        return self._config

    @property
    def mode(self) -> str:
        """``"gradient"``, ``"past"`` or ``"noise"``."""
        return self._config.mode

    @property
    def is_extrapolated(self) -> bool:
        """Whether the parameters hold the extrapolated point ``w~_t`` (the core's phase 1)."""
        return bool(self._phase)

    @property
    def anchor_pass(self) -> bool:
        """Whether the evaluation being made (between calls: the next) places ``w~_t``.

        True at the anchor in ``"gradient"`` mode: the gradient to compute under
        ``ddp_model.no_sync()`` with ``anchor_gradient="local"``.
        """
        return self._config.mode == "gradient" and not self._phase

    @property
    def iteration(self) -> int:
        """Iterations completed (base steps taken): the argument of an ``lr_x`` schedule."""
        return self._iteration

    @property
    def iterations_skipped(self) -> int:
        """Iterations skipped (a non-finite loss or gradient at either point)."""
        return self._skipped

    def anchor_params(self) -> list[torch.Tensor]:
        """Copies of the anchor ``w_t``, one per parameter (in the param groups' order)."""
        with torch.no_grad():
            return [
                current_anchor(torch, self._phase, self.state[p]["anchor"], p).detach().clone()
                for p in self._params()
            ]

    @contextlib.contextmanager
    def at_anchor(self) -> Iterator[None]:
        """Puts the anchor ``w_t`` into the parameters for the block, then ``w~_t`` back.

        For evaluation and saving between calls (save inside the block:
        ``model.state_dict()`` holds references to the parameters). Stepping inside the
        block raises. Where the parameters hold the anchor already, nothing moves.
        """
        if self._in_anchor_context:
            raise RuntimeError("Extrapolation.at_anchor() is already active; do not nest it.")
        params = self._params()
        held: list[torch.Tensor] = []
        self._in_anchor_context = True
        try:
            if self._phase:
                with torch.no_grad():
                    held = [p.detach().clone() for p in params]
                    _copy_into(params, [self.state[p]["anchor"] for p in params])
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, held, strict=False):
                    p.copy_(w)
            self._in_anchor_context = False

    def noise(self, iteration: int) -> list[torch.Tensor]:
        """``xi_t`` of iteration ``iteration``: one standard normal tensor per parameter.

        Drawn on each parameter's device and in its dtype, from a generator seeded with
        ``(seed, iteration)`` only, so a resumed run draws the same noise. The update of
        iteration ``t`` places ``w~_{t+1} = w_{t+1} + sigma * noise(t + 1)``.
        """
        generators: dict[torch.device, torch.Generator] = {}
        xi = []
        for p in self._params():
            generator = generators.get(p.device)
            if generator is None:
                generator = torch.Generator(device=p.device)
                generator.manual_seed(noise_generator_seed(self.seed, int(iteration)))
                generators[p.device] = generator
            xi.append(torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device))
        return xi

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients (the base optimizer's ``zero_grad``); forgets added losses."""
        self.base_optimizer.zero_grad(set_to_none)
        self._intake().forget()

    def add_loss(self, loss: Any) -> None:
        """Adds the loss of one backward pass to the loss of the next call.

        With gradient accumulation, call it after each ``backward()`` with the loss as it
        was backpropagated (e.g. already divided by the number of micro-batches), then
        ``opt.step()``: the call uses their sum, the loss of the summed gradient, as
        ``opt.step(loss=[loss_1, ..., loss_k])`` does. Around AliG it is AliG's
        :meth:`~alig_torch.AliG.add_loss` (one intake, one count of the backward passes).
        :meth:`zero_grad` and :meth:`step` forget the added losses.

        Example:
          >>> import torch
          >>> from alig_torch import AliG, Extrapolation
          >>> model = torch.nn.Linear(3, 1)
          >>> opt = Extrapolation(AliG(model.parameters(), max_lr=0.1), mode="past")
          >>> opt.zero_grad()
          >>> for x, y in [(torch.randn(4, 3), torch.randn(4, 1))] * 2:  # 2 micro-batches
          ...     loss = (model(x) - y).square().mean() / 2
          ...     loss.backward()
          ...     opt.add_loss(loss)
          >>> _ = opt.step()
        """
        self._intake().add(loss, _NAMES)

    # ------------------------------------------------------------------ state_dict

    def state_dict(self) -> dict[str, Any]:
        """The base's ``state_dict`` and the wrapper's state: phase, counters, anchor, seed.

        The anchor is saved where the parameters hold ``w~_t`` (phase 1), as one tensor per
        parameter in the param groups' order. Loads with ``torch.load(weights_only=True)``.
        """
        anchor = None
        if self._phase:
            anchor = [self.state[p]["anchor"].detach().clone() for p in self._params()]
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "extrapolation": {
                "mode": self._config.mode,
                "linearized": self._config.linearized,
                "phase": self._phase,
                "iteration": self._iteration,
                "skipped": self._skipped,
                "seed": self.seed,
                "anchor": anchor,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads :meth:`state_dict` (load the parameters as they were saved, too).

        Raises:
          ValueError: not an Extrapolation state_dict (e.g. the base's alone), one of
            another ``mode`` or ``linearized``, or an anchor that does not fit the
            parameters. Nothing is loaded then.
        """
        if not (
            isinstance(state_dict, dict)
            and "extrapolation" in state_dict
            and "base_optimizer" in state_dict
        ):
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)
            raise ValueError(
                f"Not an Extrapolation state_dict (keys {keys}); expected the dict of "
                "Extrapolation.state_dict(), with 'base_optimizer' and 'extrapolation'. To "
                "start extrapolating from a base optimizer's checkpoint, load it into the "
                "base first: base.load_state_dict(sd); opt = Extrapolation(base, ...)."
            )
        saved = state_dict["extrapolation"]
        for key in ("mode", "linearized"):
            ours = getattr(self._config, key)
            if saved.get(key) != ours:
                raise ValueError(
                    f"This checkpoint was saved with {key}={saved.get(key)!r}, and this "
                    f"Extrapolation has {key}={ours!r}: resuming would change the run. Build "
                    f"the wrapper with {key}={saved.get(key)!r} to resume."
                )
        params = self._params()
        anchor = saved.get("anchor")
        phase = int(saved["phase"])
        if phase:
            shapes = [tuple(a.shape) for a in anchor] if isinstance(anchor, list) else None
            if shapes != [tuple(p.shape) for p in params]:
                raise ValueError(
                    f"This checkpoint's anchor has shapes {shapes}; the parameters have "
                    f"{[tuple(p.shape) for p in params]}. Load it into a wrapper of the same "
                    "parameters, in the same param groups."
                )
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        with torch.no_grad():
            if phase:
                for p, a in zip(params, anchor, strict=True):
                    self.state[p]["anchor"].copy_(a)
        self._phase = phase
        self._iteration = int(saved["iteration"])
        self._skipped = int(saved["skipped"])
        self.seed = int(saved["seed"])

    # ------------------------------------------------------------------ the step

    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One call: extrapolates, updates, or both (see the PyTorch guide).

        Args:
          closure: zeroes the gradients, computes the loss, calls ``backward()`` and
            returns the loss (called under ``torch.enable_grad()``; twice in
            ``"gradient"`` mode unless ``alternate``). A loss that is not callable is
            taken as ``loss=``.
          loss: the loss of the gradient in ``.grad`` (a float or a 0-d tensor, unscaled
            under loss scaling); with gradient accumulation, the list of the losses of the
            backward passes (summed; or :meth:`add_loss`). AliG as the base needs one.

        Returns:
          The loss of the first evaluation of the call (the closure's, or the loss used).
        """
        if self._in_anchor_context:
            raise RuntimeError(
                "Extrapolation.step() inside opt.at_anchor(): the parameters hold the anchor "
                "only for evaluation and saving. Step after the with-block."
            )
        intake = self._intake()
        closure, closure_loss, loss = intake.evaluate(closure, loss, _NAMES)
        used = intake.resolve(closure, closure_loss, loss, _NAMES, required=self._is_alig)
        first = closure_loss if closure_loss is not None else used
        if not self.anchor_pass:
            self._call(used)
            return first
        skipped = self._call(used)
        self.base_optimizer.zero_grad()  # g(w_t) must not add into g(w~_t)
        if closure is None or self.alternate or skipped:
            return first
        closure, closure_loss, _ = intake.evaluate(closure, None, _NAMES)
        self._call(intake.resolve(closure, closure_loss, None, _NAMES, required=self._is_alig))
        return first

    def _step_base(self) -> None:
        """Runs the base's ``step`` body, past torch's step hooks and profiler label.

        The guard is one of those hooks; the wrapper's own ``step`` has the others
        (register step hooks on the wrapper).
        """
        base = self.base_optimizer
        body = getattr(type(base).step, "__wrapped__", None)
        if getattr(type(base).step, "hooked", False) and body is not None:
            body(base)
            return
        self._guard.stepping = True
        try:
            base.step()
        finally:
            self._guard.stepping = False

    def _intake(self) -> LossIntake:
        """AliG's intake around AliG (one count of the backward passes), else the wrapper's."""
        if self._is_alig:
            intake: LossIntake = self.base_optimizer._intake  # type: ignore[attr-defined]
            return intake
        return self._own_intake

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _loss_device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        params = self._params()
        if not params:
            raise ValueError("Extrapolation has no parameters: its param groups are empty.")
        return params[0].device, accumulation_dtype(params)

    def _group_lr(self) -> Any:
        """A foreign base's step size (``lr_x=None``): the ``lr`` of every param group."""
        values = {repr(group.get("lr")) for group in self.param_groups}
        if len(values) != 1 or "lr" not in self.param_groups[0]:
            raise ValueError(
                f"lr_x=None takes the base optimizer's step size, and its param groups "
                f"disagree on 'lr' ({sorted(values)}): the displacement takes one. Pass "
                "lr_x=... (a number or a schedule) to the Extrapolation."
            )
        return self.param_groups[0]["lr"]

    def _tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
        """The parameters, their stored anchors, and whether all are on the CPU.

        Cached while the param groups hold the same tensors.
        """
        params = self._params()
        cached = self.__dict__.get("_cached")
        if cached is not None:
            known = cached[0]
            if len(known) == len(params) and all(map(operator.is_, known, params)):
                return cached  # type: ignore[no-any-return]
        if not params:
            raise ValueError("Extrapolation has no parameters: its param groups are empty.")
        anchors = [self.state[p]["anchor"] for p in params]
        self._cached = (params, anchors, all(p.device.type == "cpu" for p in params))
        return self._cached

    @torch.no_grad()
    def _call(self, loss: Any) -> bool:
        """One call of the core on this evaluation; returns whether it skipped."""
        params, anchors, on_cpu = self._tensors()
        grads: list[torch.Tensor | None] = []
        for p in params:
            grad = p.grad
            if grad is not None and grad.is_sparse:
                raise ValueError(
                    f"Extrapolation does not support sparse gradients (a parameter of shape "
                    f"{tuple(p.shape)} has one). Use a dense embedding (sparse=False)."
                )
            grads.append(grad)
        base: _AliGBase | _ForeignBase
        if self._is_alig:  # AliG's checks, path and S (one norm), not yet agreed
            evaluation = self.base_optimizer._evaluation(loss, agree=False)  # type: ignore[attr-defined]
            base = _AliGBase(self, params, evaluation)
            host, loss_n, sq = evaluation.path.on_host, evaluation.loss, evaluation.sq_grad_norm
        else:
            base = _ForeignBase(self, params)
            host = on_cpu
            sq = _sum_of_squares([g for g in grads if g is not None], host)
            loss_n = None
            if loss is not None:
                device, dtype = params[0].device, accumulation_dtype(params)
                loss_n = loss_as_tensor(
                    loss, device, dtype, who="Extrapolation", loss_help=_LOSS_HELP
                )
                loss_n = float(loss_n) if host else loss_n
        anchor_pass = self.anchor_pass
        state = ExtrapolationState(
            anchor=tuple(anchors),
            phase=self._phase,
            iteration=self._iteration,
            skipped=self._skipped,
        )
        call = extrapolation_step(
            _HOST if host else torch,
            self._config,
            state,
            params,
            grads,
            loss=loss_n,
            sq_grad_norm=sq,
            base=base,
            noise=self.noise,
            lists=_Lists(
                host, lambda flag, correction: self._agree(flag, correction, base, anchor_pass)
            ),
        )
        return self._apply(params, anchors, call)

    def _agree(self, flag: Any, correction: Any, base: Any, anchor_pass: bool) -> bool:
        """The skip flag on the host; under torch.distributed, the ranks' (one collective).

        Around AliG (but the local anchor pass), the ranks agree on ALI-G's ``(loss, S)``
        through AliG's own collective, on the loss the core steps on (linearised in an
        update: this rank's displacement, the mean over the ranks); every other call
        all-reduces the flag.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return bool(flag)
        if isinstance(base, _AliGBase) and not (anchor_pass and self.anchor_gradient == "local"):
            evaluation = base.evaluation
            if evaluation.norms.ranks is None:
                return bool(flag)
            loss = evaluation.loss
            if correction is not None:  # the loss the core linearised: the same sum
                loss = loss + correction
            agreed = self.base_optimizer._agreed(evaluation, loss)  # type: ignore[attr-defined]
            base.evaluation, base.agreed = agreed, True
            return bool(flag) or not (_finite(agreed.loss) and _finite(agreed.sq_grad_norm))
        group = None
        if isinstance(base, _AliGBase):
            group = _distributed.active_group(self.base_optimizer.process_group)  # type: ignore[attr-defined]
        elif dist.get_world_size() > 1:
            group = dist.group.WORLD
        if group is None:
            return bool(flag)
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        value = torch.tensor([1.0 if bool(flag) else 0.0], dtype=torch.float64, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        return bool(value[0] > 0)

    def _apply(
        self, params: list[torch.Tensor], anchors: list[torch.Tensor], call: ExtrapolationCall
    ) -> bool:
        """Stores the call's state and writes its parameters; returns whether it skipped."""
        _copy_into(anchors, call.state.anchor)
        _copy_into(params, call.params)
        self._phase = int(call.state.phase)
        self._iteration = int(call.state.iteration)
        self._skipped = int(call.state.skipped)
        return bool(call.skipped)
