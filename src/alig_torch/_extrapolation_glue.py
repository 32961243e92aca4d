"""How torch meets :func:`alig_core._extrapolation.extrapolation_step` (for :mod:`._extrapolation`).

The core's two protocols, implemented for torch: :class:`ForeachLists` (its
``ArrayLists``: the list operations as ``torch._foreach`` kernels, the skip flag read on
the host, agreed over the ranks) and the bases (its ``ExtrapolationBase``):
:class:`AliGBase` steps AliG with the ``(loss, S)`` given, through AliG's private entry
point; :class:`ForeignBase` steps any other ``torch.optim.Optimizer`` with ``step()``.
Also the checks of the wrapper's options, parameters and checkpoints, and the guard that
refuses the base's ``step()`` called past the wrapper.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from alig_core._config import describe_value
from alig_core._extrapolation import ArrayLists
from alig_core._scalars import python_scalars
from alig_torch import _distributed
from alig_torch._loss import LossNames, loss_as_tensor
from alig_torch._norms import accumulation_dtype

__all__ = [
    "ANCHOR_GRADIENTS",
    "HOST",
    "LOSS_HELP",
    "NAMES",
    "WRAPPED",
    "AliGBase",
    "ForeachLists",
    "ForeignBase",
    "Guard",
    "check_checkpoint",
    "check_options",
    "check_param",
    "copy_into",
    "foreign_evaluation",
    "gradients",
    "sum_of_squares",
]

ANCHOR_GRADIENTS: tuple[str, ...] = ("all_reduced", "local")
"""Under data parallelism, which gradient at the anchor places ``w~`` in ``"gradient"`` mode."""


LOSS_HELP = (
    "Hand the loss over as for any torch optimizer: opt.step(closure) with a closure that "
    "zeroes the gradients, computes the loss, calls loss.backward() and returns the loss, "
    "or opt.step(loss=loss) after loss.backward() (one evaluation per call: calls alternate "
    "between the anchor and the extrapolated point in mode='gradient'). With a GradScaler "
    "(which refuses closures): scaler.unscale_(opt); scaler.step(opt, loss=loss) with the "
    "unscaled loss."
)

NAMES = LossNames(
    step="Extrapolation.step",
    who="Extrapolation",
    no_loss=(
        "Extrapolation around AliG got no loss: ALI-G computes its step size (and its default "
        f"lr_x) from the loss at every evaluation. {LOSS_HELP}"
    ),
    loss_help=LOSS_HELP,
)
"""How the wrapper's loss intake (AliG's, around AliG) names it in its errors."""


class _HostScalars(type(python_scalars)):  # type: ignore[misc]
    """Python numbers as the core's ``xp`` (every tensor on the CPU): no 0-d tensor ops."""

    @staticmethod
    def logical_or(a: bool, b: bool) -> bool:
        return bool(a) or bool(b)


HOST = _HostScalars()
"""The core's ``xp`` where the loss and ``S`` are Python floats (every tensor on the CPU)."""


@functools.lru_cache(maxsize=16)
def _scalar(value: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``float.fromhex(value)`` as a 0-d tensor, kept (read only).

    A constant ``lr_x`` makes none per call; keyed by the bits, so -0.0 is not 0.0.
    """
    return torch.full((), float.fromhex(value), dtype=dtype, device=device)


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value))
    return math.isfinite(value)


def sum_of_squares(grads: list[torch.Tensor], host: bool) -> Any:
    """``S`` for a base that takes no loss, where it decides the skip only.

    The gradients' norms (one foreach kernel, in float32 or float64 as AliG accumulates),
    then their ``hypot`` squared (float64): a float on the host, not finite where an entry
    is not (or where it overflows).
    """
    if not grads:
        return 0.0 if host else torch.zeros((), dtype=torch.float64)
    wide = any(g.dtype == torch.float64 for g in grads)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64 if wide else torch.float32)
    if host:  # inf where any entry is (hypot(inf, nan) = inf), nan where one is nan
        return math.hypot(*map(float, norms)) ** 2
    device = grads[0].device
    return torch.stack([n.to(device, torch.float64) for n in norms]).square().sum()


def gradients(params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each parameter's ``.grad`` (``None`` where it has none); a sparse one is refused."""
    grads = [p.grad for p in params]
    for p, grad in zip(params, grads, strict=True):
        if grad is not None and grad.is_sparse:
            raise ValueError(
                f"Extrapolation does not support sparse gradients (a parameter of shape "
                f"{tuple(p.shape)} has one). Use a dense embedding (sparse=False)."
            )
    return grads


def foreign_evaluation(
    params: list[torch.Tensor], grads: list[torch.Tensor | None], loss: Any, host: bool
) -> tuple[Any, Any]:
    """``(loss, S)`` of a call around a base that takes no loss.

    The loss checked (or ``None``) and :func:`sum_of_squares`: Python floats on the host.
    """
    sq = sum_of_squares([g for g in grads if g is not None], host)
    if loss is None:
        return None, sq
    device, dtype = params[0].device, accumulation_dtype(params)
    loss_t = loss_as_tensor(loss, device, dtype, who="Extrapolation", loss_help=LOSS_HELP)
    return (float(loss_t) if host else loss_t), sq


def copy_into(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """``target.copy_(source)`` where they are not the same tensor: one foreach kernel."""
    same = list(map(operator.is_, targets, sources))
    if not any(same):
        torch._foreach_copy_(list(targets), list(sources))
    elif not all(same):
        pairs = [(t, s) for t, s, x in zip(targets, sources, same, strict=True) if not x]
        torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])


class ForeachLists(ArrayLists):
    """The core's list operations as ``torch._foreach`` kernels (one launch per list).

    :meth:`decide` reads the skip flag on the host (one synchronisation per call on an
    accelerator), agreed over the ranks under torch.distributed (``agree``), so the core
    branches instead of selecting with ``where``. The core hands :meth:`decide` the loss it
    steps on (linearised in an update): under torch.distributed the ranks agree on it.

    Args:
      host: the numbers are Python floats (every tensor on the CPU).
      agree: ``(flag, loss) -> bool``, the flag as every rank takes it (``loss``: the
        loss the core steps on, linearised in an update).
    """

    def __init__(self, host: bool, agree: Callable[[Any, Any], bool]) -> None:
        super().__init__(torch)
        self.host = host
        self.agree = agree

    def decide(self, flag: Any, loss: Any) -> bool:
        return self.agree(flag, loss)

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
            moved: Sequence[Any] = [x + scale * y for x, y in zip(xs_, ys_, strict=True)]
        else:  # x + (scale * y) as the core writes it (no fused multiply-add), in place
            dtype, device = ys_[0].dtype, ys_[0].device
            if all(y.dtype == dtype and y.device == device for y in ys_):
                # the scalar rounded to the tensors' dtype, as torch rounds a Python scalar
                # (the same bits); a 0-d tensor takes the fast foreach path
                scale = _scalar(float(scale).hex(), dtype, device)
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
        gs: list[Any] = [grads[i] for i in index]
        diffs = torch._foreach_sub([xs[i] for i in index], [ys[i] for i in index])
        if self.host:
            total: Any = 0.0
            for g, d in zip(gs, diffs, strict=True):
                total += float(torch.dot(g.reshape(-1), d.reshape(-1)))
        else:
            terms = [torch.sum(g * d) for g, d in zip(gs, diffs, strict=True)]
            total = sum(terms[1:], terms[0])
        return total


class Guard:
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


WRAPPED: weakref.WeakKeyDictionary[Optimizer, weakref.ref[Any]] = weakref.WeakKeyDictionary()
"""Each base optimizer's live wrapper (a base is wrapped at most once)."""


class ForeignBase:
    """A base that takes no loss (SGD, Adam, ...), as the core sees it: its ``lr``.

    Args:
      optimizer: the base.
      guard: its step guard.
      params: every parameter, in the param groups' order.
      past_default: ``"past"`` mode with ``lr_x=None``: :meth:`run` reports the ``lr``.
    """

    takes_loss = False

    def __init__(
        self, optimizer: Optimizer, guard: Guard, params: list[torch.Tensor], past_default: bool
    ) -> None:
        self.optimizer, self.guard, self.params = optimizer, guard, params
        self.past_default = past_default

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        groups = self.optimizer.param_groups
        values = {repr(group.get("lr")) for group in groups} if len(groups) > 1 else {""}
        if len(values) != 1 or "lr" not in groups[0]:
            raise ValueError(
                f"lr_x=None takes the base optimizer's step size, and its param groups "
                f"disagree on 'lr' ({sorted(values)}): the displacement takes one. Pass "
                "lr_x=... (a number or a schedule) to the Extrapolation."
            )
        lr = groups[0]["lr"]
        if isinstance(lr, int | float) and not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(
                f"lr_x=None takes the base optimizer's step size, and its param groups have "
                f"'lr' = {lr!r} at this call (set by an LR scheduler or by hand): the "
                "displacement needs a finite lr >= 0 (below 0 it would point uphill). Nothing "
                "was changed. Keep the groups' lr >= 0, or pass lr_x=... to the Extrapolation."
            )
        return lr

    def run(self, anchor: Sequence[Any], loss: Any, sq_grad_norm: Any, skipped: Any) -> Any:
        if skipped:
            return anchor, 0.0
        copy_into(self.params, anchor)  # the base steps from w_t
        # The step's body, past torch's step hooks and profiler label (the guard is one of
        # those hooks; the wrapper's own step has the others: register hooks there).
        step = type(self.optimizer).step
        body = getattr(step, "__wrapped__", None)
        if getattr(step, "hooked", False) and body is not None:
            body(self.optimizer)
        else:
            self.guard.stepping = True
            try:
                self.optimizer.step()
            finally:
                self.guard.stepping = False
        return self.params, self.step_size_at(loss, sq_grad_norm) if self.past_default else 0.0


class AliGBase:
    """AliG as the core sees it: its own ``step_size_at``, and a step with ``(loss, S)``.

    The step goes through ``AliG._step_with``: no second norm, no second loss intake.

    Args:
      optimizer: the AliG.
      params: every parameter, in the param groups' order.
      evaluation: AliG's checked evaluation of this call (``AliG._evaluation``).
    """

    takes_loss = True

    def __init__(self, optimizer: Any, params: list[torch.Tensor], evaluation: Any) -> None:
        self.optimizer, self.params, self.evaluation = optimizer, params, evaluation
        self.agreed = False  # the ranks agreed on (loss, S): the evaluation's are the step's

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        if self.agreed:
            loss, sq_grad_norm = self.evaluation.loss, self.evaluation.sq_grad_norm
        return self.optimizer.step_size_at(loss, sq_grad_norm)

    def run(self, anchor: Sequence[Any], loss: Any, sq_grad_norm: Any, skipped: Any) -> Any:
        if skipped:
            return anchor, 0.0
        copy_into(self.params, anchor)  # the base steps from w_t
        evaluation = self.evaluation
        if not self.agreed:
            evaluation = evaluation._replace(loss=loss, sq_grad_norm=sq_grad_norm)
        return self.params, self.optimizer._step_with(evaluation)


def agree(flag: Any, loss: Any, base: AliGBase | ForeignBase, local_anchor: bool) -> bool:
    """The skip flag on the host; under torch.distributed, every rank's (one collective).

    Around AliG (but at a ``"local"`` anchor pass), the ranks agree on ALI-G's ``(loss,
    S)`` through AliG's own collective, on the loss the core steps on (in an update, the
    linearised one: this rank's displacement; ALI-G takes the ranks' mean); every other
    call all-reduces the flag.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    if isinstance(base, AliGBase) and not local_anchor:
        evaluation = base.evaluation
        if evaluation.norms.ranks is None:
            return bool(flag)
        base.evaluation, base.agreed = base.optimizer._agreed(evaluation, loss), True
        agreed = base.evaluation
        return bool(flag) or not (_finite(agreed.loss) and _finite(agreed.sq_grad_norm))
    if isinstance(base, AliGBase):
        group = _distributed.active_group(base.optimizer.process_group)
    else:
        group = dist.group.WORLD if dist.get_world_size() > 1 else None
    if group is None:
        return bool(flag)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1.0 if bool(flag) else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return bool(value[0] > 0)


def check_options(
    base_optimizer: Any, wrapper_type: type, alternate: Any, anchor_gradient: Any
) -> None:
    """Refuses a base that cannot be wrapped and the wrapper's torch-only options."""
    if not isinstance(base_optimizer, Optimizer):
        raise ValueError(
            f"Invalid base_optimizer: got {describe_value(base_optimizer)}; expected a "
            "torch.optim.Optimizer (e.g. torch.optim.SGD(params, lr=0.1, momentum=0.9, "
            "nesterov=True) or alig_torch.AliG(params, max_lr=0.1)). Build the optimizer "
            "first, then wrap it."
        )
    if isinstance(base_optimizer, wrapper_type):
        raise ValueError(
            "Invalid base_optimizer: got an Extrapolation; expected the optimizer it "
            "wraps. Extrapolation does not nest: wrap the base optimizer once."
        )
    previous = WRAPPED.get(base_optimizer)
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


def check_param(p: torch.Tensor) -> None:
    """Refuses a parameter the wrapper cannot move: complex, integer, or a DTensor."""
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


def check_checkpoint(
    state_dict: Any, ours: dict[str, Any], params: list[torch.Tensor]
) -> dict[str, Any]:
    """The wrapper's part of a checkpoint, refused where it would not resume this run.

    Args:
      state_dict: what ``Extrapolation.load_state_dict`` got.
      ours: this wrapper's ``mode`` and ``linearized``.
      params: the wrapper's parameters, in the param groups' order.

    Raises:
      ValueError: not an Extrapolation state_dict (e.g. the base's alone), one of another
        ``mode`` or ``linearized``, or an anchor that does not fit the parameters.
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
    saved: dict[str, Any] = state_dict["extrapolation"]
    for key, value in ours.items():
        if saved.get(key) != value:
            raise ValueError(
                f"This checkpoint was saved with {key}={saved.get(key)!r}, and this "
                f"Extrapolation has {key}={value!r}: resuming would change the run. Build "
                f"the wrapper with {key}={saved.get(key)!r} to resume."
            )
    anchor = saved.get("anchor")
    if int(saved["phase"]):
        shapes = [tuple(a.shape) for a in anchor] if isinstance(anchor, list) else None
        if shapes != [tuple(p.shape) for p in params]:
            raise ValueError(
                f"This checkpoint's anchor has shapes {shapes}; the parameters have "
                f"{[tuple(p.shape) for p in params]}. Load it into a wrapper of the same "
                "parameters, in the same param groups."
            )
    return saved
