"""AliG's param groups and their checkpoints: what a group may hold, what a saved one must prove.

The checks :class:`~alig_torch.AliG` runs in ``add_param_group`` and ``load_state_dict``: the
keys of other optimizers refused unless neutral, the hyperparameters validated by
:mod:`alig_core`, and a saved state's momentum convention read and checked (see
``docs/specification.md``, "Momentum conventions").
"""

from __future__ import annotations

import math
from typing import Any

import torch

import alig_core
from alig_core import AliGConfig
from alig_core._config import validate_max_lr, validate_momentum

__all__ = [
    "CONVENTION_KEY",
    "FRESH_STATE_HELP",
    "check_group_hyperparameters",
    "check_group_keys",
    "check_group_params",
    "check_keyword_options",
    "check_saved_group",
    "check_step_caps",
    "cap_argument",
    "stored_cap",
]

_NO_CAP = math.inf
"""How ``max_lr=None`` is stored in a group's ``lr`` (so LR schedulers keep working); the
core's :func:`alig_core.step_size` takes ``inf`` as no cap, so the step reads it as it is."""


def stored_cap(max_lr: Any) -> Any:
    """A ``max_lr`` as a group's ``lr`` holds it: ``None`` (no cap) becomes ``inf``.

    A one-element tensor becomes a 0-d one (as ``torch.optim``'s ``_to_scalar`` reads a
    tensor ``lr``); a tensor of several entries is refused, in torch's words.
    """
    if max_lr is None:
        return _NO_CAP
    if isinstance(max_lr, torch.Tensor) and max_lr.dim() != 0:
        if max_lr.numel() != 1:
            raise ValueError(
                f"Tensor lr must be 1-element, as in torch.optim: the cap max_lr (lr) got a "
                f"tensor of shape {tuple(max_lr.shape)}. Pass one number, e.g. max_lr=0.1 or "
                "max_lr=torch.tensor(0.1); give each param group its own cap with param-group "
                "dicts."
            )
        return max_lr.reshape(())
    return max_lr


def cap_argument(max_lr: Any, lr: Any, given: bool) -> Any:
    """The cap of ``AliG(params, max_lr=..., lr=...)``; not both.

    ``lr`` is another name of ``max_lr``: the key the param groups keep it under, as in
    every torch optimizer.
    """
    if not given:
        return max_lr
    if max_lr is not None:
        raise ValueError(
            f"AliG got both max_lr={alig_core._config.describe_value(max_lr)} and "
            f"lr={alig_core._config.describe_value(lr)}; they are two names of the same setting "
            "(the cap on the step size, kept as each param group's 'lr'): pass only one of them."
        )
    return lr


def given_cap(lr: Any) -> Any:
    """A group's ``lr`` as ``max_lr`` was given (``inf`` is ``None``), for validation."""
    return None if isinstance(lr, float) and lr == _NO_CAP else lr


CONVENTION_KEY = "momentum_convention"
"""The key :meth:`AliG.state_dict` adds to each saved param group: what its momentum
buffers hold, as :func:`alig_core.momentum_convention` codes it (0: no buffers, 1: the
standard convention's ``-gamma*g`` terms, 2: the adjusted one's ``-g`` terms)."""

_ALIG_GROUP_KEYS = ("lr", "momentum", "adjusted_momentum", "eps", "f_star")
"""The keys every param group of an AliG state_dict holds (every version of this code)."""

_WEIGHT_DECAY_HELP = (
    "ALI-G regularises with a constraint, not with weight decay (whose step would be taken "
    "at the cap, not at gamma): pass max_norm=r to AliG (the radius of the l2 ball on all "
    "parameters, as in the paper), or add the l2 penalty to the loss you pass, so that the "
    "loss and its gradient both include it."
)
_UNSUPPORTED_MODE_HELP = "AliG has no such mode: remove the key from the param group."

_FOREIGN_GROUP_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    # key: (values that change nothing, what to do instead)
    "weight_decay": ((0,), _WEIGHT_DECAY_HELP),
    "decoupled_weight_decay": ((False,), _WEIGHT_DECAY_HELP),
    "nesterov": (
        (),
        "ALI-G's momentum always has the Nesterov form (p moves by -gamma*g + mu*b); what "
        "differs is the convention of its buffers: adjusted_momentum=True is the convention of "
        "torch.optim.SGD(nesterov=True) driven with lr = gamma, adjusted_momentum=False (the "
        "default) the paper's. Set adjusted_momentum instead.",
    ),
    "dampening": ((0,), "ALI-G's momentum has no dampening: remove the key."),
    "maximize": (
        (False,),
        "ALI-G minimises a loss bounded below by f_star: to maximise an objective, pass its "
        "negation as the loss (and differentiate that).",
    ),
    "betas": (
        (),
        "betas belong to Adam-type optimizers; ALI-G has one momentum coefficient: set "
        "momentum=mu (0 <= mu < 1).",
    ),
    "amsgrad": ((False,), "amsgrad belongs to Adam; ALI-G has no second moment: remove it."),
    "momentum_decay": ((), "momentum_decay belongs to NAdam; ALI-G has no such schedule."),
    "centered": ((False,), "centered belongs to RMSprop; ALI-G has no second moment."),
    "rho": ((), "rho belongs to Adadelta; ALI-G has no running averages."),
    "lr_decay": ((0,), "lr_decay belongs to Adagrad; ALI-G sets its step size from the loss."),
    "initial_accumulator_value": ((0,), "initial_accumulator_value belongs to Adagrad."),
    "lambd": ((), "lambd belongs to ASGD; ALI-G has no averaging."),
    "t0": ((), "t0 belongs to ASGD; ALI-G has no averaging."),
    "etas": ((), "etas belong to Rprop; ALI-G sets its step size from the loss."),
    "step_sizes": ((), "step_sizes belong to Rprop; ALI-G sets its step size from the loss."),
    "beta2_decay": ((), "beta2_decay belongs to Adafactor; ALI-G has no second moment."),
    "fused": (
        (None, False),
        "AliG has no fused implementation: its fast path is foreach=True (the default on "
        "CPU and GPU).",
    ),
    "capturable": ((False,), _UNSUPPORTED_MODE_HELP),
    "differentiable": (
        (False,),
        "AliG's step runs under torch.no_grad() and is not differentiable: remove the key.",
    ),
}
"""Param-group keys of other torch optimizers that AliG would ignore or that would change
what a step means: refused unless they hold a value that changes nothing (e.g.
``weight_decay=0``). Keys not listed here (a user's own, such as ``"name"``, and those LR
schedulers write: ``initial_lr``, ``max_lr``, ``min_lr``, ``max_momentum``,
``base_momentum``, ``swa_lr``) are kept as torch keeps them."""


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of the values that change nothing (plain numbers only)."""
    if isinstance(value, bool) or value is None:
        return any(value is n for n in neutral)
    if isinstance(value, int | float):
        return any(not isinstance(n, bool | None) and value == n for n in neutral)
    return False


def check_group_keys(group: dict[str, Any], where: str) -> None:
    """Refuses the keys of :data:`_FOREIGN_GROUP_KEYS` that would change or be lost."""
    for key, (neutral, help_text) in _FOREIGN_GROUP_KEYS.items():
        if key in group and not _is_neutral(group[key], neutral):
            raise ValueError(
                f"{where} sets {key!r} = {group[key]!r}, a setting of another optimizer that "
                f"ALI-G does not have: AliG would ignore it or take a different step than "
                f"the one asked for. {help_text}"
            )


_KEYWORDS = (
    "max_lr (or lr), momentum, adjusted_momentum, eps, f_star, max_norm, foreach, "
    "all_reduce_loss, partitioned, process_group"
)


def check_keyword_options(options: dict[str, Any]) -> None:
    """Refuses keyword arguments ``AliG`` does not have, as a ``ValueError`` with the fix.

    The options of other torch optimizers (:data:`_FOREIGN_GROUP_KEYS`) are accepted with a
    value that changes nothing (``weight_decay=0``, ``maximize=False``, ``fused=None``, ...)
    and refused otherwise with what to use instead, as in a param group; any other name is
    refused with the list of AliG's arguments (never a bare ``TypeError`` from Python).
    """
    for key, value in options.items():
        if key in _FOREIGN_GROUP_KEYS:
            neutral, help_text = _FOREIGN_GROUP_KEYS[key]
            if not _is_neutral(value, neutral):
                raise ValueError(
                    f"AliG got {key}={value!r}, an option of another optimizer that ALI-G "
                    f"does not have: it would be ignored or take a different step than the "
                    f"one asked for. {help_text}"
                )
            continue
        raise ValueError(
            f"AliG got an unknown keyword argument {key}={value!r}. Its arguments are params, "
            f"{_KEYWORDS}; see help(alig_torch.AliG)."
        )


def check_step_caps(groups: list[dict[str, Any]]) -> None:
    """Refuses, before a step moves anything, a cap that cannot be stepped with.

    That is a group ``lr`` that is a Python number below 0 or NaN, or one built with no
    cap under an LR scheduler (which then does nothing).

    A tensor ``lr`` is not read (that would synchronise with the device): the core's clamp
    at 0 after the cap keeps such a step from ever going uphill (``gamma = 0``).
    """
    for index, group in enumerate(groups):
        lr = group["lr"]
        if isinstance(lr, torch.Tensor | bool):
            continue
        where = f"AliG param group {index} has 'lr' = {lr!r} at this step"
        initial = group.get("initial_lr")
        if isinstance(initial, float) and initial == _NO_CAP:
            raise ValueError(
                f"{where} and an LR scheduler was built on it with no cap (max_lr=None, "
                "initial_lr=inf). A schedule of an infinite cap stays infinite (or NaN), so the "
                "scheduler would do nothing. Nothing was changed. Give a finite max_lr to "
                "schedule (e.g. AliG(params, max_lr=0.1)), or drop the scheduler: ALI-G sets "
                "its step size from the loss and needs none."
            )
        if isinstance(lr, int | float) and (math.isnan(lr) or lr < 0):
            raise ValueError(
                f"{where} (set by an LR scheduler or by hand): the cap on the step size must "
                "be >= 0 (0 stops the steps, inf is no cap), and a cap below 0 would be an "
                "ascent step. Nothing was changed. Give the group a cap >= 0, or a schedule "
                "that stays >= 0 (e.g. a smaller decay, or eta_min >= 0)."
            )


def check_group_hyperparameters(group: dict[str, Any], *, saved: bool = False) -> None:
    """The core's validation of a group's ALI-G hyperparameters (``lr = inf``: no cap).

    A ``saved`` group (from a checkpoint) may hold a cap of exactly 0: where a schedule
    that decays to 0 (transformers' linear one, say) leaves it, and what a step accepts.
    """
    lr = group["lr"]
    if not (saved and isinstance(lr, int | float | torch.Tensor) and bool(lr == 0)):
        validate_max_lr(given_cap(lr))
    validate_momentum(group["momentum"])
    AliGConfig(
        momentum=group["momentum"],
        adjusted_momentum=group["adjusted_momentum"],
        eps=group["eps"],
        f_star=group["f_star"],
    )


FRESH_STATE_HELP = (
    "To start ALI-G from such a checkpoint, load only the model's weights "
    "(model.load_state_dict(...)) and leave the optimizer's state fresh (its momentum "
    "buffers start at zero); to resume ALI-G, load a state_dict saved by alig_torch.AliG."
)


def check_saved_group(index: int, saved: Any, saved_state: Any) -> None:
    """Refuses a saved param group that does not prove it was written by AliG.

    An AliG group holds :data:`_ALIG_GROUP_KEYS` (state_dicts of every version) and, when
    saved by this version, :data:`CONVENTION_KEY`, which must agree with the group's
    ``adjusted_momentum`` and with whether the state holds buffers for its parameters.
    """
    if not isinstance(saved, dict):
        raise ValueError(
            f"This state_dict's param group {index} is a {type(saved).__name__}, not a dict: "
            f"it is not an optimizer state_dict. {FRESH_STATE_HELP}"
        )
    where = f"This state_dict's param group {index}"
    missing = [key for key in _ALIG_GROUP_KEYS if key not in saved]
    if missing:
        keys = sorted(k for k in saved if k != "params")
        if set(missing) == {"adjusted_momentum"}:
            raise ValueError(
                f"{where} has no 'adjusted_momentum': its momentum convention cannot be read. "
                "The buffers of the two conventions hold different quantities (-gamma*g "
                "terms with adjusted_momentum=False, -g terms with True), so loading them "
                "under a guessed one would silently change the trajectory. If you know how "
                f"it was trained, set state_dict['param_groups'][{index}]['adjusted_momentum'] "
                "to that value before loading."
            )
        sign_note = (
            " torch.optim.SGD's momentum_buffer holds +(mu*b + g): the opposite sign of both "
            "ALI-G conventions (-gamma*g or -g terms), so it cannot be reused."
            if "nesterov" in saved or "dampening" in saved
            else ""
        )
        raise ValueError(
            f"{where} is not an AliG one: it lacks {missing} and has keys {keys}, so it was "
            "saved by another optimizer (or by code that does not record ALI-G's momentum "
            f"convention, such as the paper's own AliG).{sign_note} {FRESH_STATE_HELP}"
        )
    check_group_keys(saved, where)
    try:
        check_group_hyperparameters(saved, saved=True)
    except ValueError as error:
        raise ValueError(f"{where} holds an invalid setting: {error}") from None
    if CONVENTION_KEY not in saved:
        return  # saved before the marker existed: its adjusted_momentum says it all
    code = saved[CONVENTION_KEY]
    states = saved_state if isinstance(saved_state, dict) else {}
    has_buffers = any(
        isinstance(states.get(i), dict) and "momentum_buffer" in states[i]
        for i in saved.get("params", [])
    )
    expected = alig_core.momentum_convention(has_buffers, bool(saved["adjusted_momentum"]))
    if isinstance(code, bool) or not isinstance(code, int) or code != expected:
        described = (
            alig_core.describe_momentum_convention(code)
            if isinstance(code, int) and not isinstance(code, bool)
            else repr(code)
        )
        raise ValueError(
            f"{where} says its momentum buffers are in the convention {described} "
            f"({CONVENTION_KEY}={code!r}), but it has "
            f"adjusted_momentum={saved['adjusted_momentum']} and "
            f"{'buffers' if has_buffers else 'no buffers'} for its parameters "
            f"({alig_core.describe_momentum_convention(expected)}): the state_dict was edited "
            "or written by other code, and its buffers cannot be trusted. Load a state_dict "
            "as AliG.state_dict() returned it."
        )


def check_group_params(group: dict[str, Any]) -> None:
    """Refuses parameters ALI-G cannot step (complex or not floating point)."""
    for p in group["params"]:
        if p.is_complex() or not p.is_floating_point():
            raise ValueError(
                f"ALI-G optimizes real floating-point parameters; got a parameter of dtype "
                f"{p.dtype} and shape {tuple(p.shape)}. For a complex parameter, optimize "
                "torch.view_as_real(p) (its real and imaginary parts) instead; leave integer "
                "buffers out of the optimizer."
            )
