"""Extrapolation's torch glue: one squared gradient norm per call, AliG's ``step_size_at``,
and one loss intake for AliG and the wrapper (the same forms, the same errors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import alig_core
from alig_torch import AliG, Extrapolation
from alig_torch import _extrapolation as extrapolation_module
from alig_torch import _extrapolation_glue as glue_module
from alig_torch import _optimizer as optimizer_module
from alig_torch._functional import STEP_PATHS


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)


def backward(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    x, y = batch(seed)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss.detach()


def values(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- one norm per call


def count_gradient_norms(
    monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module
) -> Callable[[], int]:
    """Counts the sums of squares taken over the gradients (not the parameters: max_norm's
    projection takes the parameters' norm), on every kernel AliG or the wrapper uses."""
    calls = [0]

    def is_gradients(tensors: list[torch.Tensor]) -> bool:
        """The gradients, or views of their memory (e.g. detached)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return bool(tensors) and all(
            any(t.data_ptr() == g.data_ptr() and t.shape == g.shape for g in grads) for t in tensors
        )

    for name, path in list(STEP_PATHS.items()):

        def counting(tensors: Any, *args: Any, _kernel: Any = path.sum_of_squares) -> Any:
            calls[0] += is_gradients(list(tensors))
            return _kernel(tensors, *args)

        monkeypatch.setitem(STEP_PATHS, name, path._replace(sum_of_squares=counting))
    for module, name in (
        (glue_module, "sum_of_squares"),
        (extrapolation_module, "_sum_of_squares"),
    ):
        foreign = getattr(module, name, None)  # S for a base that takes no loss
        if foreign is not None:

            def counting_foreign(tensors: Any, *args: Any, _kernel: Any = foreign) -> Any:
                calls[0] += is_gradients(list(tensors))
                return _kernel(tensors, *args)

            monkeypatch.setattr(module, name, counting_foreign)
    return lambda: calls[0]


@pytest.mark.parametrize("mode", ["gradient", "past"])
@pytest.mark.parametrize("base", ["alig", "alig_projected", "sgd"])
def test_one_squared_gradient_norm_per_call(
    monkeypatch: pytest.MonkeyPatch, mode: str, base: str
) -> None:
    """The wrapper computes S once and hands it to the base: ALI-G does not compute it again
    (the old wrapper took it, then AliG.step(loss=...) took it a second time)."""
    model = make_model()
    if base == "sgd":
        inner: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        max_norm = 10.0 if base == "alig_projected" else None
        inner = AliG(model.parameters(), max_lr=0.5, momentum=0.9, max_norm=max_norm)
    opt = Extrapolation(inner, mode=mode)
    norms = count_gradient_norms(monkeypatch, model)
    for t in range(6):
        opt.zero_grad()
        loss = backward(model, seed=t)
        before = norms()
        opt.step(loss=loss)
        assert norms() - before == 1, f"call {t}"
    assert opt.iteration == (3 if mode == "gradient" else 6)


def test_the_bare_base_takes_one_norm_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter sees AliG's own norm (the spy counts what it must)."""
    model = make_model()
    opt = AliG(model.parameters(), max_lr=0.5)
    norms = count_gradient_norms(monkeypatch, model)
    opt.step(loss=backward(model))
    assert norms() == 1


# ---------------------------------------------------------------- AliG.step_size_at


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize(
    ("loss", "sq"), [(0.5, 4.0), (3.0, 0.5), (-1.0, 2.0), (float("nan"), 1.0), (1.0, 0.0)]
)
def test_step_size_at_is_the_cores_gamma_and_moves_nothing(
    loss: float, sq: float, as_tensor: bool
) -> None:
    model = make_model()
    opt = AliG(model.parameters(), max_lr=0.5, momentum=0.9, eps=1e-3, f_star=0.1)
    opt.step(loss=backward(model))  # records and buffers exist
    before = values(model)
    state = {k: v.clone() for p in model.parameters() for k, v in opt.state[p].items()}
    records = (float(opt.gamma), int(opt.steps_taken))
    args: tuple[Any, Any] = (loss, sq)
    if as_tensor:
        args = (torch.tensor(loss, dtype=torch.float64), torch.tensor(sq, dtype=torch.float64))
    gamma = opt.step_size_at(*args)
    expected = alig_core.step_size(
        np, np.float64(loss), np.float64(sq), max_lr=0.5, eps=1e-3, f_star=0.1
    ).gamma
    assert isinstance(gamma, torch.Tensor) == as_tensor
    assert float(gamma) == pytest.approx(float(expected), rel=1e-15, abs=0.0)
    assert all(torch.equal(a, b) for a, b in zip(values(model), before, strict=True))
    after = {k: v for p in model.parameters() for k, v in opt.state[p].items()}
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert (float(opt.gamma), int(opt.steps_taken)) == records


def test_step_size_at_needs_one_step_size_over_the_groups() -> None:
    model = make_model()
    opt = AliG(
        [
            {"params": model[0].parameters(), "max_lr": 0.1},
            {"params": model[2].parameters(), "max_lr": 0.2},
        ]
    )
    with pytest.raises(ValueError, match=r"param groups differ.*group=<index>.*lr_x="):
        opt.step_size_at(1.0, 1.0)
    assert opt.step_size_at(1.0, 1.0, group=1) == 0.2
    wrapper = Extrapolation(opt)
    wrapper.zero_grad()
    backward(model)
    with pytest.raises(ValueError, match="param groups differ"):
        wrapper.step(loss=1.0)  # the default lr_x at the anchor asks AliG
    assert Extrapolation(AliG(make_model().parameters(), max_lr=0.1), lr_x=0.1).iteration == 0


def test_the_wrapper_takes_the_default_lr_x_from_step_size_at(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ALI-G option that changes the step size changes the displacement with it."""
    model = make_model()
    base = AliG(model.parameters(), max_lr=0.5)
    opt = Extrapolation(base)
    monkeypatch.setattr(base, "step_size_at", lambda loss, sq: 0.25)
    start = values(model)
    opt.zero_grad()
    backward(model)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step(loss=1.0)  # the anchor call: w~ = w - 0.25 g
    expected = [w - 0.25 * g for w, g in zip(start, grads, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(values(model), expected, strict=True))


# ---------------------------------------------------------------- one loss intake


def _names(message: str) -> str:
    """The message with the optimizer's name and its own how-to (each its own) left out."""
    for help_text in (optimizer_module._LOSS_HELP, glue_module.LOSS_HELP):
        message = message.replace(help_text, "HELP")
    return message.replace("Extrapolation.step", "STEP").replace("AliG.step", "STEP")


BAD_INTAKES: list[tuple[str, Callable[[Any, torch.nn.Module], Any]]] = [
    ("positional and loss=", lambda opt, model: opt.step(backward(model), loss=1.0)),
    ("an empty list", lambda opt, model: (backward(model), opt.step(loss=[]))),
    (
        "added and loss=",
        lambda opt, model: (opt.add_loss(backward(model)), opt.step(loss=1.0)),
    ),
    (
        "one loss for two backward passes",
        lambda opt, model: (backward(model), opt.step(loss=backward(model, 2))),
    ),
    (
        "a closure's loss and loss=",
        lambda opt, model: opt.step(lambda: backward(model), loss=1.0),
    ),
    ("a closure returning None", lambda opt, model: opt.step(lambda: None)),
]


@pytest.mark.parametrize(("name", "bad"), BAD_INTAKES, ids=[n for n, _ in BAD_INTAKES])
def test_the_wrapper_refuses_what_aliG_refuses_with_the_same_message(
    name: str, bad: Callable[[Any, torch.nn.Module], Any]
) -> None:
    messages = []
    for wrapped in (False, True):
        model = make_model()
        alig = AliG(model.parameters(), max_lr=0.5)
        opt: Any = Extrapolation(alig, mode="past") if wrapped else alig
        opt.zero_grad()
        before = values(model)
        with pytest.raises(ValueError, match=r"\S") as error:
            bad(opt, model)
        messages.append(_names(str(error.value)))
        assert all(torch.equal(a, b) for a, b in zip(values(model), before, strict=True))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("form", ["positional", "closure returning None with loss="])
def test_the_wrapper_takes_the_loss_as_aliG_does(form: str) -> None:
    """``step(loss)`` positionally, and a closure that returns None with ``loss=``
    (Lightning's manual optimization), as for AliG: the same run as ``step(loss=...)``."""
    runs = []
    for how in ("keyword", form):
        model = make_model()
        opt = Extrapolation(AliG(model.parameters(), max_lr=0.5, momentum=0.9), mode="past")
        for t in range(4):
            opt.zero_grad()
            loss = backward(model, seed=t)
            if how == "keyword":
                opt.step(loss=loss)
            elif how == "positional":
                opt.step(loss)
            else:
                opt.step(lambda: None, loss=loss)
        runs.append(values(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_add_loss_on_the_wrapper_is_aliGs() -> None:
    """One intake: a loss added on the base is the wrapper's next loss, and zero_grad of
    either forgets what was added through the other."""
    model = make_model()
    alig = AliG(model.parameters(), max_lr=0.5)
    opt = Extrapolation(alig, mode="past")
    alig.add_loss(backward(model))
    opt.step()  # AliG's pending loss is the wrapper's
    assert opt.iteration == 1
    backward(model)
    opt.add_loss(1.0)
    alig.zero_grad()
    with pytest.raises(ValueError, match="Extrapolation around AliG got no loss"):
        opt.step()
    assert opt.iteration == 1


# ---------------------------------------------------------------- a base's cap at step time


@pytest.mark.parametrize("base", ["alig", "sgd"])
@pytest.mark.parametrize("lr", [-0.1, float("nan")])
def test_an_invalid_cap_or_lr_at_step_time_raises_before_anything_moves(
    base: str, lr: float
) -> None:
    """A group lr driven below 0 (a scheduler, a hand): AliG's own refusal around AliG; the
    default lr_x of a foreign base refuses it too (the displacement would point uphill)."""
    model = make_model()
    inner: torch.optim.Optimizer = (
        AliG(model.parameters(), max_lr=0.5, momentum=0.9)
        if base == "alig"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    opt = Extrapolation(inner)
    inner.param_groups[0]["lr"] = lr
    opt.zero_grad()
    loss = backward(model)
    before = values(model)
    match = "at this step" if base == "alig" else "needs a finite lr >= 0"
    with pytest.raises(ValueError, match=match):
        opt.step(loss=loss)
    assert all(torch.equal(a, b) for a, b in zip(values(model), before, strict=True))
    assert (opt.iteration, opt.iterations_skipped, opt.is_extrapolated) == (0, 0, False)


@pytest.mark.parametrize("base_kind", ["alig", "sgd"])
def test_step_hooks_run_on_the_wrapper_and_not_on_the_base(base_kind: str) -> None:
    """A documented departure (docs/framework-contracts.md): the base's step body runs
    past torch's step hooks; hooks, schedulers and GradScaler belong on the wrapper."""
    model = make_model()
    base: torch.optim.Optimizer
    if base_kind == "alig":
        base = AliG(model.parameters(), max_lr=0.1)
    else:
        base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = Extrapolation(base, mode="past")
    fired: list[str] = []
    opt.register_step_pre_hook(lambda *_: fired.append("wrapper pre"))
    opt.register_step_post_hook(lambda *_: fired.append("wrapper post"))
    base.register_step_post_hook(lambda *_: fired.append("base post"))
    for seed in (1, 2):
        opt.zero_grad()
        loss = backward(model, seed)
        opt.step(loss=loss)
    assert opt.iteration == 2
    assert fired == ["wrapper pre", "wrapper post"] * 2
    with pytest.raises(RuntimeError, match="step\\(\\) was called directly"):
        base.step()
