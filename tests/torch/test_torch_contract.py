"""What torch.optim's users expect of any optimizer, and where AliG knowingly departs.

Issue 23, torch: the habits of ``torch.optim`` (``lr=``, the loss handed to ``step``, a
tensor ``lr``, ``load_state_dict`` pre-hooks, LR schedulers) kept, or refused with a
``ValueError`` that names the fix; a cap that turns negative at step time never moves a
parameter uphill. Each departure listed in ``docs/framework-contracts.md`` ("PyTorch") is
pinned by a test here whose docstring starts with "Departure".
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch

from alig_torch import AliG


def _params(*sizes: int, dtype: torch.dtype = torch.float64) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.arange(1.0, n + 1.0, dtype=dtype)) for n in (sizes or (2, 3))]


def _set_grads(params: list[torch.nn.Parameter], scale: float = 1.0) -> None:
    for i, p in enumerate(params):
        p.grad = scale * torch.linspace(-1.0, 1.0 + i, p.numel(), dtype=p.dtype)


def _trajectory(opt: AliG, params: list[torch.nn.Parameter], steps: int = 4) -> list[list[float]]:
    seen = []
    for t in range(steps):
        _set_grads(params, 0.5 + t)
        opt.step(loss=1.0 + t)
        seen.append([x for p in params for x in p.detach().tolist()])
    return seen


def _snapshot(opt: AliG, params: list[torch.nn.Parameter]) -> list[Any]:
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    records = [
        {k: g[k].clone() for k in ("gamma", "steps_taken", "steps_skipped") if k in g}
        for g in opt.param_groups
    ]
    return [[p.detach().clone() for p in params], state, records]


def _same(a: list[Any], b: list[Any]) -> bool:
    flat_a, flat_b = _flatten(a), _flatten(b)
    if len(flat_a) != len(flat_b):
        return False
    return all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))


def _flatten(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in _flatten(tree[k])]
    return [t for item in tree for t in _flatten(item)]


# ---------------------------------------------------------------- the cap's names: lr=


def test_lr_is_the_caps_other_name() -> None:
    """``AliG(params, lr=0.1)`` is ``AliG(params, max_lr=0.1)``: the param groups keep the
    cap as ``lr`` (as every torch optimizer), so schedulers and ``lr=`` habits work."""
    by_max_lr, by_lr = _params(), _params()
    runs = [
        _trajectory(AliG(by_max_lr, max_lr=0.1, momentum=0.9), by_max_lr),
        _trajectory(AliG(by_lr, lr=0.1, momentum=0.9), by_lr),
    ]
    assert runs[0] == runs[1]
    assert AliG(_params(), lr=0.1).param_groups[0]["lr"] == 0.1
    assert AliG(_params(), lr=None).param_groups[0]["lr"] == math.inf  # None: no cap


def test_lr_and_max_lr_together_are_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"both max_lr=0\.2 .*and lr=0\.1 .*pass only one"):
        AliG(_params(), max_lr=0.2, lr=0.1)
    a, b = _params()
    opt = AliG([a], lr=0.1)
    with pytest.raises(ValueError, match=r"Param group 1 sets both 'max_lr' = 0\.2.*'lr' = 0\.1"):
        opt.add_param_group({"params": [b], "max_lr": 0.2, "lr": 0.1})
    assert len(opt.param_groups) == 1


def test_lr_is_validated_as_max_lr() -> None:
    with pytest.raises(ValueError, match=r"Invalid max_lr: got -0\.1"):
        AliG(_params(), lr=-0.1)


# ---------------------------------------------------------------- other optimizers' keywords


REFUSED_KEYWORDS = [
    ("weight_decay", 1e-4, "max_norm=r"),
    ("nesterov", True, "Set adjusted_momentum instead"),
    ("nesterov", False, "Set adjusted_momentum instead"),
    ("dampening", 0.1, "no dampening"),
    ("maximize", True, "negation as the loss"),
    ("fused", True, "foreach=True"),
    ("capturable", True, "no such mode"),
    ("differentiable", True, "not differentiable"),
    ("betas", (0.9, 0.99), "momentum=mu"),
    ("decoupled_weight_decay", True, "max_norm=r"),
]


@pytest.mark.parametrize(("key", "value", "fix"), REFUSED_KEYWORDS)
def test_other_optimizers_keywords_are_a_value_error_naming_the_fix(key, value, fix) -> None:
    """As in a param group (the same table): never Python's bare ``TypeError``."""
    with pytest.raises(ValueError, match=rf"AliG got {key}={re.escape(repr(value))}.*{fix}"):
        AliG(_params(), max_lr=0.1, **{key: value})
    with pytest.raises(ValueError, match=rf"Param group 0 sets '{key}' = .*{fix}"):
        AliG([{"params": _params(), key: value}], max_lr=0.1)


def test_keywords_that_change_nothing_are_accepted_and_change_nothing() -> None:
    """``weight_decay=0``, ``maximize=False``, ``fused=None``, ``differentiable=False``, ...
    (what generic code passes to any torch optimizer) give the plain step."""
    neutral = {
        "weight_decay": 0.0,
        "dampening": 0,
        "maximize": False,
        "fused": None,
        "capturable": False,
        "differentiable": False,
    }
    plain, tagged = _params(), _params()
    runs = [
        _trajectory(AliG(plain, max_lr=0.1, momentum=0.9), plain),
        _trajectory(AliG(tagged, max_lr=0.1, momentum=0.9, **neutral), tagged),
    ]
    assert runs[0] == runs[1]


def test_an_unknown_keyword_is_a_value_error_listing_the_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown keyword argument momentun=0\.9.*momentum, "):
        AliG(_params(), max_lr=0.1, momentun=0.9)


# ---------------------------------------------------------------- the loss: step(loss)


@pytest.mark.parametrize(
    "positional",
    [2.5, torch.tensor(2.5, dtype=torch.float64), [1.0, 1.5]],
    ids=["float", "tensor", "list"],
)
def test_step_takes_the_loss_positionally(positional) -> None:
    """``opt.step(loss)``: a loss (not callable) in the closure's place is the loss (a
    list: the losses of the backward passes, summed); the step equals
    ``opt.step(loss=2.5)`` and returns the loss it used."""
    by_keyword, by_position = _params(), _params()
    opt_keyword = AliG(by_keyword, max_lr=10.0, momentum=0.9)
    opt_position = AliG(by_position, max_lr=10.0, momentum=0.9)
    _set_grads(by_keyword)
    _set_grads(by_position)
    opt_keyword.step(loss=2.5)
    returned = opt_position.step(positional)
    assert [p.tolist() for p in by_keyword] == [p.tolist() for p in by_position]
    assert float(opt_position.gamma) == float(opt_keyword.gamma) > 0
    assert float(returned) == 2.5


def test_a_positional_loss_and_loss_keyword_together_are_refused() -> None:
    params = _params()
    opt = AliG(params, max_lr=0.1)
    _set_grads(params)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"got a loss positionally \(1\.0 .*and loss= as well"):
        opt.step(1.0, loss=1.0)
    assert _same(_snapshot(opt, params), before)


def test_a_callable_stays_the_closure() -> None:
    params = _params()
    opt = AliG(params, max_lr=0.1)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        _set_grads(params)
        return torch.tensor(1.0)

    with torch.no_grad():
        opt.step(closure)
    assert calls == [True]


# ---------------------------------------------------------------- params and tensor caps


def test_a_single_tensor_as_params_is_refused_as_torch_optimizers_refuse_it() -> None:
    """Not three row views of a matrix: torch's ``TypeError``, in torch's words."""
    tensor = torch.randn(3, 2)
    with pytest.raises(TypeError) as ours:
        AliG(tensor, max_lr=0.1)
    with pytest.raises(TypeError) as torchs:
        torch.optim.SGD(tensor, lr=0.1)
    assert str(ours.value) == str(torchs.value)
    assert "iterable of Tensors or dicts, but got torch.FloatTensor" in str(ours.value)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_a_one_element_tensor_cap_is_taken_as_torch_takes_a_tensor_lr(shape) -> None:
    """``torch.optim.SGD`` takes ``lr=torch.tensor([0.1])``; AliG keeps it as a 0-d tensor
    (as torch's ``_to_scalar`` reads it) and steps as with the float."""
    cap = torch.full(shape, 0.1, dtype=torch.float64)
    torch.optim.SGD(_params(), lr=cap)  # torch accepts it
    as_tensor, as_float = _params(), _params()
    opt = AliG(as_tensor, max_lr=cap, momentum=0.9)
    assert opt.param_groups[0]["lr"].shape == ()
    runs = [
        _trajectory(opt, as_tensor),
        _trajectory(AliG(as_float, lr=0.1, momentum=0.9), as_float),
    ]
    assert runs[0] == runs[1]
    a, b = _params()
    grouped = AliG([{"params": [a], "lr": torch.tensor([[0.2]])}], max_lr=0.1)
    grouped.add_param_group({"params": [b], "max_lr": torch.tensor([0.3])})
    assert [g["lr"].shape for g in grouped.param_groups] == [(), ()]


def test_a_tensor_cap_of_several_entries_is_refused_as_torch_refuses_it() -> None:
    cap = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        torch.optim.SGD(_params(), lr=cap)
    with pytest.raises(ValueError, match=r"Tensor lr must be 1-element.*shape \(2,\)"):
        AliG(_params(), max_lr=cap)
    a, b = _params()
    opt = AliG([a], max_lr=0.1)
    with pytest.raises(ValueError, match=r"Tensor lr must be 1-element"):
        opt.add_param_group({"params": [b], "lr": cap})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------- load_state_dict pre-hooks


def _trained(**kwargs: Any) -> tuple[list[torch.nn.Parameter], AliG]:
    params = _params()
    opt = AliG(params, max_lr=0.1, **kwargs)
    _trajectory(opt, params, steps=3)
    return params, opt


def test_a_load_pre_hook_can_mend_an_old_checkpoint() -> None:
    """torch runs ``register_load_state_dict_pre_hook`` hooks before loading: AliG checks
    the state they return, so a hook can add what an old checkpoint lacks."""
    _, trained = _trained(momentum=0.9)
    old = trained.state_dict()
    for group in old["param_groups"]:
        del group["adjusted_momentum"], group["momentum_convention"]
    target = AliG(_params(), max_lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="has no 'adjusted_momentum'"):
        target.load_state_dict(old)

    def mend(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        groups = [{**g, "adjusted_momentum": False} for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    target.register_load_state_dict_pre_hook(mend)
    target.load_state_dict(old)
    buffer = next(iter(trained.state.values()))["momentum_buffer"]
    assert torch.equal(next(iter(target.state.values()))["momentum_buffer"], buffer)


@pytest.mark.parametrize("prepend", [False, True])
def test_a_load_pre_hook_that_flips_the_convention_is_refused(prepend) -> None:
    _, trained = _trained(momentum=0.9)
    target = AliG(_params(), max_lr=0.1, momentum=0.9)
    before = _snapshot(target, target.param_groups[0]["params"])

    def flip(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        for group in state_dict["param_groups"]:
            group["momentum_convention"] = 2  # the adjusted convention's -g terms

    target.register_load_state_dict_pre_hook(flip, prepend=prepend)
    with pytest.raises(ValueError, match=r"says its momentum buffers are in the convention"):
        target.load_state_dict(trained.state_dict())
    assert _same(_snapshot(target, target.param_groups[0]["params"]), before)
    assert len(target._optimizer_load_state_dict_pre_hooks) == 1  # AliG's own check is gone


# ---------------------------------------------------------------- the cap at step time


def test_a_cap_set_below_zero_by_hand_is_refused_before_anything_moves() -> None:
    """SPEC "One step" 3: never an ascent step. A Python-float ``lr`` below 0 in any group
    raises, naming the group, the key and the value; no group has moved."""
    a, b = _params()
    opt = AliG([{"params": [a]}, {"params": [b]}], max_lr=0.1, momentum=0.9)
    _trajectory(opt, [a, b], steps=2)
    opt.param_groups[1]["lr"] = -0.1
    _set_grads([a, b])
    before = _snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=r"param group 1 has 'lr' = -0\.1 at this step"):
        opt.step(loss=1.0)
    assert _same(_snapshot(opt, [a, b]), before)


def test_the_issues_example_takes_no_ascent_step() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = AliG([w], max_lr=0.1)
    opt.param_groups[0]["lr"] = -0.1
    w.grad = torch.tensor([-2.0, -4.0])
    with pytest.raises(ValueError, match=r"'lr' = -0\.1"):
        opt.step(loss=1.0)
    assert w.tolist() == [1.0, 2.0]


def test_a_scheduler_that_drives_the_cap_below_zero_is_refused() -> None:
    params = _params()
    opt = AliG(params, max_lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.6 * t)
    _trajectory(opt, params, steps=1)
    scheduler.step()
    _trajectory(opt, params, steps=1)  # factor 0.4: a cap of 0.04
    scheduler.step()  # factor -0.2
    _set_grads(params)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param group 0 has 'lr' = -0\.0\d+ at this step"):
        opt.step(loss=1.0)
    assert _same(_snapshot(opt, params), before)


@pytest.mark.parametrize("path", ["host", "single_tensor", "foreach"])
def test_a_tensor_cap_below_zero_gives_gamma_zero_without_a_host_read(path) -> None:
    """A tensor ``lr`` is not read back (no synchronisation): the core's clamp at 0 after
    the cap makes the step ``gamma = 0``, and the parameters stay."""
    params = _params()
    opt = AliG(params, max_lr=0.1)
    opt._step_path = path
    opt.param_groups[0]["lr"] = torch.tensor(-0.1, dtype=torch.float64)
    _set_grads(params)
    before = [p.detach().clone() for p in params]
    opt.step(loss=1.0)
    assert float(opt.gamma) == 0.0
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))


@pytest.mark.parametrize("path", ["host", "single_tensor", "foreach"])
def test_the_capped_record_at_a_cap_of_zero_and_at_gamma_hat_equal_to_the_cap(path) -> None:
    """``capped`` is ``gamma_hat >= cap`` (after the clamp at 0): a cap of exactly 0 (a
    scheduler's end) is hit by every step, and so is a cap equal to ``gamma_hat``."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = AliG([w], max_lr=0.5, eps=0.0)
    opt._step_path = path
    w.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)  # S = 25 on every path
    opt.step(loss=12.5)  # gamma_hat = 12.5 / 25 = 0.5 = the cap
    assert (float(opt.gamma_hat), float(opt.gamma), bool(opt.capped)) == (0.5, 0.5, True)
    assert w.tolist() == [-0.5, 0.0]
    opt.param_groups[0]["lr"] = 0.0
    opt.step(loss=12.5)
    assert (float(opt.gamma_hat), float(opt.gamma), bool(opt.capped)) == (0.5, 0.0, True)
    assert w.tolist() == [-0.5, 0.0]
    assert int(opt.steps_taken) == 2


def test_a_scheduler_on_no_cap_is_refused_naming_the_fix() -> None:
    """``max_lr=None`` is stored as ``lr = inf``: a scheduler on it would silently do
    nothing (inf times any factor), so the first step raises and asks for a finite cap."""
    params = _params()
    opt = AliG(params)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _set_grads(params)
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"initial_lr=inf.*Give a finite max_lr to schedule"):
        opt.step(loss=1.0)
    assert _same(_snapshot(opt, params), before)
    capped = AliG(_params(), max_lr=0.1)
    torch.optim.lr_scheduler.StepLR(capped, step_size=1, gamma=0.5)
    _trajectory(capped, capped.param_groups[0]["params"], steps=1)  # a finite cap: fine


def test_departure_reduce_lr_on_plateau_on_no_cap_cannot_be_seen() -> None:
    """Departure (a limit): ReduceLROnPlateau writes nothing AliG could read but ``lr``, so
    on ``max_lr=None`` it stays ``inf`` and nothing says so. Give a finite ``max_lr``."""
    params = _params()
    opt = AliG(params)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for _ in range(3):
        _trajectory(opt, params, steps=1)
        scheduler.step(1.0)
    assert opt.param_groups[0]["lr"] == math.inf


# ---------------------------------------------------------------- departures


@pytest.mark.parametrize("adjusted", [False, True], ids=["standard", "adjusted"])
def test_departure_the_papers_momentum_keeps_coasting_at_a_cap_of_zero(adjusted) -> None:
    """Departure: with ``torch.optim.SGD`` a scheduler that drives ``lr`` to 0 stops the
    parameters. ALI-G's standard convention (the paper's) keeps ``-gamma*g`` terms in its
    buffers, so the parameters coast on ``mu * b`` at ``gamma = 0``; the adjusted one
    (``mu * gamma * b``) stops, as SGD does."""
    params = _params()
    opt = AliG(params, max_lr=0.1, momentum=0.9, adjusted_momentum=adjusted)
    _trajectory(opt, params, steps=3)
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    _trajectory(opt, params, steps=1)
    assert float(opt.gamma) == 0.0
    moved = any(not torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert moved is not adjusted


def test_departure_step_without_a_loss_is_an_error() -> None:
    """Departure: ``torch.optim.SGD.step()`` needs no argument; ALI-G needs the loss (its
    step size is the Polyak step), so ``step()`` alone raises and shows every way."""
    params = _params()
    opt = AliG(params, max_lr=0.1)
    _set_grads(params)
    with pytest.raises(ValueError, match=r"got no loss.*step\(closure\).*step\(loss=loss\)"):
        opt.step()


def test_departure_step_returns_the_loss_it_used() -> None:
    """Departure: torch's ``step()`` returns the closure's loss or ``None``; AliG returns the
    closure's loss, else the loss it was handed (so ``loss = opt.step(loss=...)`` reads)."""
    params = _params()
    opt = AliG(params, max_lr=0.1)
    _set_grads(params)
    assert opt.step(loss=1.25) == 1.25
