"""Foreign checkpoints and other optimizers' options: refused clearly, or made right.

docs/specification.md, section 6: a checkpoint of another optimizer,
or one whose momentum convention cannot be read, is refused on load; a framework option
that changes the step is refused with what to use instead. And the claim of the docs that
``torch.optim.SGD(nesterov=True)`` driven with ``lr = gamma`` is the *adjusted*
convention, shown with a moving gamma.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch

from alig_cases import initial_params, make_sequence, max_relative_deviation
from alig_core import AliGConfig
from alig_core.oracle import OracleState, oracle_step
from alig_torch import AliG

FOREIGN_STEP_EVENTS = (None, "zero_grads", "loss_below_f_star", "missing_grad")
"""The steps of the shared sequence that a foreign SGD can take too (no skipped step)."""


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in initial_params()]


def _sequence(steps: int = 60) -> list[Any]:
    return [s for s in make_sequence(steps) if s.event in FOREIGN_STEP_EVENTS]


def _set_grads(params: list[torch.nn.Parameter], grads: tuple[Any, ...]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else torch.from_numpy(np.array(g))


def _trained(steps: int = 12, **kwargs: Any) -> tuple[list[torch.nn.Parameter], AliG]:
    params = _params()
    opt = AliG(params, **kwargs)
    for step in _sequence()[:steps]:
        _set_grads(params, step.grads)
        opt.step(loss=step.loss)
    return params, opt


def _bytes(params: list[torch.nn.Parameter]) -> list[bytes]:
    return [p.detach().numpy().tobytes() for p in params]


def _weights_only_round_trip(state_dict: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_untouched(opt: AliG, adjusted: bool) -> None:
    assert len(opt.state) == 0
    assert opt.param_groups[0]["adjusted_momentum"] is adjusted
    assert "momentum_convention" not in opt.param_groups[0]


# ---------------------------------------------------------------- AliG's own checkpoints


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"max_lr": 0.05}, 0),
        ({"max_lr": 0.05, "momentum": 0.9}, 1),
        ({"max_lr": 0.05, "momentum": 0.9, "adjusted_momentum": True}, 2),
    ],
    ids=["no_momentum", "standard", "adjusted"],
)
def test_state_dict_records_the_momentum_convention_of_each_group(kwargs, code) -> None:
    _, opt = _trained(**kwargs)
    saved = opt.state_dict()
    assert [g["momentum_convention"] for g in saved["param_groups"]] == [code]
    assert "momentum_convention" not in opt.param_groups[0]  # only in what is saved
    fresh = AliG(_params(), **kwargs)
    fresh.load_state_dict(_weights_only_round_trip(saved))
    assert "momentum_convention" not in fresh.param_groups[0]


@pytest.mark.parametrize("adjusted", [False, True], ids=["standard", "adjusted"])
def test_state_dict_saved_by_the_previous_code_loads_and_resumes_bitwise(adjusted) -> None:
    """The code before the marker returned ``torch.optim.Optimizer.state_dict`` unchanged:
    its checkpoints (every ALI-G key, no marker) still resume exactly."""
    kwargs = {"max_lr": 0.05, "momentum": 0.9, "adjusted_momentum": adjusted}
    sequence = _sequence()
    params, opt = _trained(steps=20, **kwargs)
    previous_format = torch.optim.Optimizer.state_dict(opt)  # what main's AliG saved
    assert "momentum_convention" not in previous_format["param_groups"][0]
    assert {"adjusted_momentum", "eps", "f_star"} <= set(previous_format["param_groups"][0])
    saved_params = [p.detach().clone() for p in params]

    resumed = _params()
    with torch.no_grad():
        for p, value in zip(resumed, saved_params, strict=True):
            p.copy_(value)
    resumed_opt = AliG(resumed, **kwargs)
    resumed_opt.load_state_dict(_weights_only_round_trip(previous_format))
    for step in sequence[20:]:
        for ps, o in ((params, opt), (resumed, resumed_opt)):
            _set_grads(ps, step.grads)
            o.step(loss=step.loss)
    assert _bytes(resumed) == _bytes(params)
    assert torch.equal(resumed_opt.steps_taken, opt.steps_taken)


@pytest.mark.parametrize("target_adjusted", [False, True], ids=["into_standard", "into_adjusted"])
def test_a_state_without_its_momentum_convention_is_refused(target_adjusted) -> None:
    """An adjusted-convention state stripped of ``adjusted_momentum`` (and of the marker)
    used to load as the standard convention."""
    _, opt = _trained(max_lr=0.05, momentum=0.9, adjusted_momentum=True)
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["adjusted_momentum"], group["momentum_convention"]
    target = AliG(_params(), max_lr=0.05, momentum=0.9, adjusted_momentum=target_adjusted)
    with pytest.raises(ValueError, match="has no 'adjusted_momentum': its momentum convention"):
        target.load_state_dict(state)
    _assert_untouched(target, adjusted=target_adjusted)


@pytest.mark.parametrize("marker", [1, 0, 7, True, "adjusted"])
def test_a_marker_that_contradicts_the_state_is_refused(marker) -> None:
    _, opt = _trained(max_lr=0.05, momentum=0.9, adjusted_momentum=True)
    state = opt.state_dict()
    assert state["param_groups"][0]["momentum_convention"] == 2
    state["param_groups"][0]["momentum_convention"] = marker
    target = AliG(_params(), max_lr=0.05, momentum=0.9, adjusted_momentum=True)
    with pytest.raises(ValueError, match="says its momentum buffers are in the convention"):
        target.load_state_dict(state)
    _assert_untouched(target, adjusted=True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"weight_decay": 1e-2}, "'weight_decay' = 0.01.*max_norm"),
        ({"nesterov": True}, "'nesterov' = True.*adjusted_momentum"),
        ({"momentum": 1.5}, "invalid setting: Invalid momentum"),
        ({"eps": -1.0}, "invalid setting: Invalid eps"),
        ({"lr": -0.1}, "invalid setting: Invalid max_lr"),
    ],
)
def test_an_edited_alig_state_is_refused(edit, message) -> None:
    _, opt = _trained(max_lr=0.05, momentum=0.9)
    state = opt.state_dict()
    state["param_groups"][0].update(edit)
    target = AliG(_params(), max_lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    _assert_untouched(target, adjusted=False)


def test_a_checkpoint_whose_schedule_reached_a_cap_of_zero_loads_and_steps_nowhere() -> None:
    # a schedule decaying to 0 (transformers' linear one) leaves lr = 0 in the last checkpoint
    _, opt = _trained(max_lr=0.05, momentum=0.0)
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 0.0
    params = _params()
    target = AliG(params, max_lr=0.05)
    target.load_state_dict(state)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    target.step(loss=torch.tensor(1.0))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert float(target.param_groups[0]["gamma"]) == 0.0


# ---------------------------------------------------------------- other optimizers' states


def _official_alig_state() -> dict[str, Any]:
    """The shape of the paper's own PyTorch AliG state: its convention is an attribute of
    the optimizer, never saved (groups hold max_lr, momentum, step_size)."""
    params = _params()
    return {
        "state": {i: {"momentum_buffer": torch.zeros_like(p)} for i, p in enumerate(params)},
        "param_groups": [
            {"max_lr": 0.05, "momentum": 0.9, "step_size": 0.01, "params": list(range(4))}
        ],
    }


def _foreign_state(name: str) -> dict[str, Any]:
    if name == "official_alig":
        return _official_alig_state()
    params = _params()
    foreign: torch.optim.Optimizer
    if name == "sgd_nesterov":
        foreign = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True)
    elif name == "sgd":
        foreign = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    else:
        foreign = torch.optim.Adam(params, lr=1e-3)
    for step in _sequence()[:5]:
        _set_grads(params, step.grads)
        foreign.step()
    return foreign.state_dict()


@pytest.mark.parametrize("name", ["sgd_nesterov", "sgd", "adam", "official_alig"])
@pytest.mark.parametrize("adjusted", [False, True], ids=["standard", "adjusted"])
def test_another_optimizers_state_is_refused(name, adjusted) -> None:
    state = _weights_only_round_trip(_foreign_state(name))
    target = AliG(_params(), max_lr=0.05, momentum=0.9, adjusted_momentum=adjusted)
    with pytest.raises(ValueError, match="is not an AliG one") as info:
        target.load_state_dict(state)
    text = str(info.value)
    assert "it lacks ['" in text  # says what is missing
    assert "'adjusted_momentum'" in text
    assert "load only the model's weights" in text
    if name.startswith("sgd"):
        assert "opposite sign" in text
    _assert_untouched(target, adjusted=adjusted)


def test_something_that_is_not_a_state_dict_is_refused() -> None:
    target = AliG(_params(), max_lr=0.05)
    with pytest.raises(ValueError, match=r"needs an optimizer state_dict.*keys \['model'\]"):
        target.load_state_dict({"model": {}})


# ---------------------------------------------------------------- param-group keys


REFUSED_KEYS = [
    ("weight_decay", 1e-4, "max_norm"),
    ("decoupled_weight_decay", True, "max_norm"),
    ("nesterov", True, "adjusted_momentum"),
    ("nesterov", False, "adjusted_momentum"),
    ("dampening", 0.1, "no dampening"),
    ("maximize", True, "negation as the loss"),
    ("betas", (0.9, 0.999), "momentum=mu"),
    ("amsgrad", True, "Adam"),
    ("momentum_decay", 4e-3, "NAdam"),
    ("centered", True, "RMSprop"),
    ("lr_decay", 0.1, "Adagrad"),
    ("fused", True, "foreach=True"),
    ("capturable", True, "no such mode"),
    ("differentiable", True, "no_grad"),
]


@pytest.mark.parametrize(("key", "value", "advice"), REFUSED_KEYS)
def test_other_optimizers_keys_are_refused_in_param_groups(key, value, advice) -> None:
    a, b = _params()[:2]
    with pytest.raises(ValueError, match=rf"Param group 0 sets '{key}' = .*{advice}"):
        AliG([{"params": [a], key: value}], max_lr=0.1)
    opt = AliG([a], max_lr=0.1)
    with pytest.raises(ValueError, match=rf"Param group 1 sets '{key}'.*{advice}"):
        opt.add_param_group({"params": [b], key: value})
    assert len(opt.param_groups) == 1


NEUTRAL_KEYS = {
    "weight_decay": 0.0,
    "dampening": 0,
    "maximize": False,
    "amsgrad": False,
    "fused": None,
    "capturable": False,
    "differentiable": False,
    "lr_decay": 0.0,
}


def test_keys_that_change_nothing_and_users_own_keys_are_kept() -> None:
    """``weight_decay=0`` and the like are allowed (param-group builders write them for
    biases); a user's own keys stay; the step is the one without them."""
    plain, tagged = _params(), _params()
    opt = AliG(plain, max_lr=0.05, momentum=0.9)
    tagged_opt = AliG(
        [{"params": tagged, "name": "everything", **NEUTRAL_KEYS}], max_lr=0.05, momentum=0.9
    )
    for step in _sequence()[:10]:
        for ps, o in ((plain, opt), (tagged, tagged_opt)):
            _set_grads(ps, step.grads)
            o.step(loss=step.loss)
    assert _bytes(plain) == _bytes(tagged)
    saved = _weights_only_round_trip(tagged_opt.state_dict())
    assert saved["param_groups"][0]["name"] == "everything"
    resumed = AliG(_params(), max_lr=0.05, momentum=0.9)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["name"] == "everything"


def test_an_invalid_group_is_not_left_behind() -> None:
    a, b = _params()[:2]
    opt = AliG([a], max_lr=0.1)
    with pytest.raises(ValueError, match="Invalid momentum"):
        opt.add_param_group({"params": [b], "momentum": 1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=30),
        lambda opt: torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=0.01, max_lr=0.05, step_size_up=4
        ),
    ],
    ids=["OneCycleLR", "CyclicLR"],
)
@pytest.mark.parametrize("adjusted", [False, True], ids=["standard", "adjusted"])
def test_cycled_momentum_is_followed_step_by_step(make_scheduler, adjusted) -> None:
    """OneCycleLR and CyclicLR cycle ``momentum`` by default (``cycle_momentum=True``), as
    for torch.optim.SGD: each step is ALI-G with that step's cap and momentum (the oracle
    run with them), and a checkpoint holding the schedulers' keys resumes."""
    params = _params()
    opt = AliG(params, max_lr=0.05, momentum=0.9, adjusted_momentum=adjusted)
    scheduler = make_scheduler(opt)
    assert {"max_momentum", "base_momentum", "initial_lr"} <= set(opt.param_groups[0])
    expected = [np.array(p) for p in initial_params()]
    state = OracleState.zeros(len(expected))
    momenta, gammas, capped = set(), set(), set()
    for step in _sequence()[:25]:
        group = opt.param_groups[0]
        config = AliGConfig(
            max_lr=group["lr"], momentum=group["momentum"], adjusted_momentum=adjusted
        )
        expected, state = oracle_step(expected, step.grads, step.loss, state, config)
        _set_grads(params, step.grads)
        opt.step(loss=step.loss)
        momenta.add(group["momentum"])
        gammas.add(state.gamma)
        capped.add(state.capped)
        scheduler.step()
    assert len(momenta) >= 5  # the momentum moved
    assert len(gammas) > 10  # and gamma too, capped on some steps and not on others
    assert capped == {True, False}
    assert max_relative_deviation([p.detach().numpy() for p in params], expected) <= 1e-10

    resumed = AliG(_params(), max_lr=0.05, momentum=0.9, adjusted_momentum=adjusted)
    resumed.load_state_dict(_weights_only_round_trip(opt.state_dict()))
    assert resumed.param_groups[0]["momentum"] == opt.param_groups[0]["momentum"]
