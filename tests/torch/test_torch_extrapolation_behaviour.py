"""Extrapolation's torch behaviour: the anchor for evaluation and saving, the call forms,
state_dict, GradScaler, LR schedulers, a base that already stepped, and bad input."""

from __future__ import annotations

import copy
import gc
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from alig_cases import max_relative_deviation
from alig_core import ExtrapolationConfig
from alig_core.oracle_extrapolation import ExtrapolationOracle
from alig_torch import AliG, Extrapolation
from extrapolation_cases import CASES, Problem, invalid_options_for
from worker_scripts import import_script

HARNESS = import_script(Path(__file__).with_name("extrapolation_worker.py"))


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def make_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator))
        for _ in range(n)
    ]


def mse(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def closure_for(
    opt: Extrapolation, model: torch.nn.Module, batch: Any, *, zero: bool = True
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        if zero:
            opt.zero_grad()
        loss = mse(model, batch)
        loss.backward()
        return loss

    return closure


def alternate_once(opt: Extrapolation, model: torch.nn.Module, batch: Any) -> torch.Tensor:
    opt.zero_grad()
    loss = mse(model, batch)
    loss.backward()
    opt.step(loss=loss)
    return loss


def values(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- the anchor


def test_at_anchor_puts_the_anchor_in_for_evaluation_and_saving_and_puts_w_tilde_back() -> None:
    model = make_model()
    opt = Extrapolation(AliG(model.parameters(), max_lr=0.5, momentum=0.9), mode="past")
    for batch in make_batches(3):
        alternate_once(opt, model, batch)
    assert opt.is_extrapolated
    tilde, anchor = values(model), opt.anchor_params()
    assert not same_bits(tilde, anchor)
    buffer = io.BytesIO()
    with opt.at_anchor():
        assert same_bits(values(model), anchor)
        torch.save(model.state_dict(), buffer)
        with pytest.raises(RuntimeError, match=r"inside opt.at_anchor"):
            opt.step(loss=1.0)
        with pytest.raises(RuntimeError, match="do not nest"), opt.at_anchor():
            pass
    assert same_bits(values(model), tilde)  # w~ back, bit for bit
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert same_bits(list(saved.values()), anchor)


def test_at_anchor_and_anchor_params_where_the_parameters_hold_the_anchor() -> None:
    model = make_model()
    opt = Extrapolation(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.step(closure_for(opt, model, make_batches(1)[0]))
    assert not opt.is_extrapolated
    before = values(model)
    assert same_bits(opt.anchor_params(), before)
    with opt.at_anchor():
        assert same_bits(values(model), before)
    assert same_bits(values(model), before)


def test_the_closure_runs_at_the_anchor_then_at_w_tilde_and_the_flags_say_which() -> None:
    model = make_model()
    opt = Extrapolation(torch.optim.SGD(model.parameters(), lr=0.1), lr_x=0.3)
    batch = make_batches(1)[0]
    seen: list[tuple[bool, bool, list[torch.Tensor]]] = []

    def closure() -> torch.Tensor:
        seen.append((opt.anchor_pass, opt.is_extrapolated, values(model)))
        return closure_for(opt, model, batch)()

    start = values(model)
    returned = opt.step(closure)
    assert [(a, e) for a, e, _ in seen] == [(True, False), (False, True)]
    assert same_bits(seen[0][2], start)
    # w~ = w - lr_x * g(w), g on the same batch
    model_copy = make_model()
    mse(model_copy, batch).backward()
    expected = [p.detach() - 0.3 * p.grad for p in model_copy.parameters()]
    assert same_bits(seen[1][2], expected)
    anchor_loss = float(mse(make_model(), batch).detach())
    assert float(returned.detach()) == pytest.approx(anchor_loss)  # the loss at the anchor
    assert not opt.is_extrapolated
    assert opt.iteration == 1


def test_the_wrapper_clears_the_anchor_gradient_so_it_never_adds_into_the_update() -> None:
    """A closure that forgets zero_grad() takes the same steps as one that does not."""
    runs = []
    for zero in (True, False):
        model = make_model()
        opt = Extrapolation(AliG(model.parameters(), max_lr=0.5, momentum=0.9))
        for batch in make_batches(4):
            opt.zero_grad()  # only before the call: the wrapper clears between the passes
            opt.step(closure_for(opt, model, batch, zero=zero))
        runs.append(values(model))
    assert same_bits(runs[0], runs[1])
    model = make_model()
    opt = Extrapolation(torch.optim.SGD(model.parameters(), lr=0.1))
    alternate_once(opt, model, make_batches(1)[0])  # the anchor call of the alternating form
    assert all(p.grad is None for p in model.parameters())


def test_alternate_true_makes_the_closure_form_alternate() -> None:
    """alternate=True with step(closure) == step(loss=...) after backward, call by call."""
    batches = make_batches(6)
    runs = []
    for alternate in (True, None):
        model = make_model()
        opt = Extrapolation(AliG(model.parameters(), max_lr=0.5), alternate=bool(alternate))
        for batch in batches:
            if alternate:
                opt.step(closure_for(opt, model, batch))
            else:
                alternate_once(opt, model, batch)
        assert opt.iteration == 3
        runs.append(values(model))
    assert same_bits(runs[0], runs[1])


def test_step_returns_the_first_evaluation_loss() -> None:
    model = make_model()
    opt = Extrapolation(torch.optim.SGD(model.parameters(), lr=0.1), mode="past")
    assert opt.step(loss=0.25) == 0.25


def test_a_non_finite_gradient_skips_sgd_without_a_loss() -> None:
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    opt = Extrapolation(base, mode="past")
    for batch in make_batches(2):
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    before, buffers = opt.anchor_params(), copy.deepcopy(base.state_dict())
    opt.zero_grad()
    mse(model, make_batches(1)[0]).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.step()
    assert opt.iterations_skipped == 1
    assert opt.iteration == 2
    assert same_bits(values(model), before)  # back at the anchor
    assert str(base.state_dict()) == str(buffers)
    assert all(
        torch.equal(base.state[p]["momentum_buffer"], buffers["state"][i]["momentum_buffer"])
        for i, p in enumerate(model.parameters())
    )


# ---------------------------------------------------------------- state_dict


def test_state_dict_round_trip_then_lockstep() -> None:
    """Loaded mid-iteration (w~ held), the copy steps in lockstep with the original."""
    batches = make_batches(8)
    model = make_model()
    opt = Extrapolation(AliG(model.parameters(), max_lr=0.5, momentum=0.9, adjusted_momentum=True))
    for batch in batches[:3]:
        alternate_once(opt, model, batch)
    assert opt.is_extrapolated
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = make_model(seed=5)
    twin.load_state_dict(saved["model"])
    twin_opt = Extrapolation(
        AliG(twin.parameters(), max_lr=0.5, momentum=0.9, adjusted_momentum=True)
    )
    twin_opt.load_state_dict(saved["opt"])
    assert twin_opt.is_extrapolated
    assert twin_opt.iteration == opt.iteration
    assert same_bits(twin_opt.anchor_params(), opt.anchor_params())
    for batch in batches[3:]:
        alternate_once(opt, model, batch)
        alternate_once(twin_opt, twin, batch)
        assert same_bits(values(model), values(twin))
        assert same_bits(twin_opt.anchor_params(), opt.anchor_params())


def test_load_state_dict_refuses_what_would_not_resume() -> None:
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = Extrapolation(base, mode="past")
    alternate_once(opt, model, make_batches(1)[0])
    with pytest.raises(ValueError, match=r"Not an Extrapolation state_dict.*load it into the base"):
        opt.load_state_dict(base.state_dict())
    other = Extrapolation(torch.optim.SGD(make_model().parameters(), lr=0.1), mode="gradient")
    with pytest.raises(ValueError, match=r"mode='past'.*mode='gradient'"):
        other.load_state_dict(opt.state_dict())
    plain = Extrapolation(
        AliG(make_model().parameters(), max_lr=0.1), mode="past", linearized=False
    )
    with pytest.raises(ValueError, match="linearized=True"):
        plain.load_state_dict(opt.state_dict())
    small = Extrapolation(torch.optim.SGD(torch.nn.Linear(4, 1).parameters(), lr=0.1), "past")
    with pytest.raises(ValueError, match="anchor has shapes"):
        small.load_state_dict(opt.state_dict())
    assert not small.is_extrapolated  # nothing loaded


# ---------------------------------------------------------------- torch's machinery


def test_gradscaler_with_the_alternating_form_equals_the_unscaled_run() -> None:
    """GradScaler refuses closures; scaler.step(opt, loss=unscaled) is the path (2^k scale:
    the unscaled gradients are exact, so the runs agree bit for bit)."""
    batches = make_batches(6)
    runs = []
    for scaled in (True, False):
        model = make_model()
        opt = Extrapolation(AliG(model.parameters(), max_lr=0.5, momentum=0.9))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        for batch in batches:
            opt.zero_grad()
            loss = mse(model, batch)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt, loss=loss.detach())
            scaler.update()
        assert opt.iteration == 3
        runs.append(values(model))
        if scaled:
            with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
                scaler.step(opt, closure=closure_for(opt, model, batches[0]))
    assert same_bits(runs[0], runs[1])


def test_lr_schedulers_drive_the_shared_param_groups_and_the_default_lr_x() -> None:
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.2)
    opt = Extrapolation(base)
    assert opt.param_groups is base.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    batch = make_batches(1)[0]
    opt.step(closure_for(opt, model, batch))
    scheduler.step()
    assert base.param_groups[0]["lr"] == 0.1
    start = values(model)
    alternate_once(opt, model, batch)  # the anchor call: w~ = w - 0.1 * g
    reference = make_model()
    with torch.no_grad():
        for p, v in zip(reference.parameters(), start, strict=True):
            p.copy_(v)
    mse(reference, batch).backward()
    expected = [p.detach() - 0.1 * p.grad for p in reference.parameters()]
    assert same_bits(values(model), expected)


def test_deepcopy_gives_an_independent_wrapper() -> None:
    model = make_model()
    opt = Extrapolation(torch.optim.SGD(model.parameters(), lr=0.1), mode="past")
    alternate_once(opt, model, make_batches(1)[0])
    clone = copy.deepcopy(opt)
    assert clone.is_extrapolated
    assert clone.iteration == 1
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    for p in clone_params:
        p.grad = torch.ones_like(p)
    clone.step()
    assert clone.iteration == 2
    assert opt.iteration == 1
    with pytest.raises(RuntimeError, match=r"wrapped by alig_torch.Extrapolation"):
        clone.base_optimizer.step()  # the copy's base is guarded too


def test_add_param_group_goes_to_the_base_and_waits_for_the_anchor() -> None:
    model, extra = make_model(), torch.nn.Linear(2, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = Extrapolation(base, mode="past")
    opt.add_param_group({"params": extra.parameters()})
    assert len(base.param_groups) == 2
    alternate_once(opt, model, make_batches(1)[0])
    with pytest.raises(RuntimeError, match=r"opt.is_extrapolated is False"):
        opt.add_param_group({"params": torch.nn.Linear(1, 1).parameters()})


# ---------------------------------------------------------------- a base that already stepped


@pytest.mark.parametrize(
    "name", ["gradient-alig_adjusted_projected-alternating", "past-sgd_nesterov-same_batch"]
)
def test_a_base_that_already_stepped_carries_on_from_its_state(name: str) -> None:
    """Decision: accepted. The base keeps its state; the wrapper starts at iteration 0 with
    the anchor at the parameters as they are. The oracle: the bare base (``"past"`` with
    lr_x = 0), then the wrapper's configuration from there."""
    case = next(c for c in CASES if c.name == name)
    warm, calls = 7, case.calls // 2
    problem = Problem()
    params = [torch.nn.Parameter(torch.tensor(p)) for p in HARNESS.TorchRun(case).initial]
    base = HARNESS.make_base(case.base_config, params)
    for batch in range(warm):
        loss, grads = problem.evaluate([p.detach().numpy() for p in params], batch)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else torch.tensor(g)
        if isinstance(base, AliG):
            base.step(loss=loss)
        elif np.isfinite(loss) and all(g is None or np.isfinite(g).all() for g in grads):
            base.step()
    assert any(base.state[p] for p in params)  # the base has state
    run = HARNESS.TorchRun(case, problem=problem)
    run.tensors, run.base = params, base
    run.opt = Extrapolation(base, **HARNESS.wrapper_options(case.config))

    oracle = ExtrapolationOracle(
        run.initial, ExtrapolationConfig(mode="past", lr_x=0.0), case.base_config, case.call_form
    )
    oracle_problem = Problem()
    with np.errstate(all="ignore"):
        for batch in range(warm):
            oracle.call(oracle_problem.evaluate, batch)
        oracle.config, oracle.tilde, oracle.iterations, oracle.skipped = case.config, None, 0, 0
        for batch in range(warm, warm + calls):
            record = oracle.call(oracle_problem.evaluate, batch, run.noise)
            run.call(batch)
            got = [p.detach().numpy() for p in params]
            assert max_relative_deviation(got, record.params) <= 1e-10, f"call {batch}"
            assert run.opt.is_extrapolated == record.extrapolated
            assert (run.opt.iteration, run.opt.iterations_skipped) == (
                record.iterations,
                record.skipped,
            )
    assert run.opt.iteration > 5


def test_the_base_steps_only_through_the_wrapper() -> None:
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = Extrapolation(base)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = values(model)
    with pytest.raises(RuntimeError, match="Call the wrapper's step"):
        base.step()
    assert same_bits(values(model), before)
    with pytest.raises(ValueError, match="already wrapped"):
        Extrapolation(base)
    del opt
    gc.collect()
    base.step()  # unwrapped again once the wrapper is gone
    Extrapolation(base)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "match"), invalid_options_for("torch"))
def test_invalid_options_are_refused_with_the_fix(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Extrapolation(torch.optim.SGD(make_model().parameters(), lr=0.1), **kwargs)


def test_invalid_bases_are_refused() -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"expected a torch.optim.Optimizer"):
        Extrapolation(model.parameters())  # type: ignore[arg-type]
    opt = Extrapolation(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="does not nest"):
        Extrapolation(opt)
    complex_param = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="real floating-point"):
        Extrapolation(torch.optim.SGD([complex_param], lr=0.1))


def test_bad_losses_are_refused() -> None:
    model = make_model()
    opt = Extrapolation(AliG(model.parameters(), max_lr=0.1))
    batch = make_batches(1)[0]
    mse(model, batch).backward()
    with pytest.raises(ValueError, match="Extrapolation around AliG got no loss"):
        opt.step()
    with pytest.raises(ValueError, match="both a closure and loss="):
        opt.step(closure_for(opt, model, batch), loss=1.0)
    with pytest.raises(ValueError, match=r"real scalar; got a tensor of shape \(3,\)"):
        opt.step(loss=torch.ones(3))
    with pytest.raises(ValueError, match="got 'high'"):
        opt.step(loss="high")
    assert opt.iteration == 0
    assert not opt.is_extrapolated


def test_the_default_lr_x_needs_one_lr_and_a_sparse_gradient_is_refused() -> None:
    model = make_model()
    groups = [
        {"params": model[0].parameters(), "lr": 0.1},
        {"params": model[2].parameters(), "lr": 0.2},
    ]
    opt = Extrapolation(torch.optim.SGD(groups, lr=0.1))
    with pytest.raises(ValueError, match=r"disagree on 'lr'.*Pass lr_x"):
        opt.step(closure_for(opt, model, make_batches(1)[0]))
    embedding = torch.nn.Embedding(4, 2, sparse=True)
    sparse = Extrapolation(torch.optim.SGD(embedding.parameters(), lr=0.1))
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        sparse.step()


# ---------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("how", ["list", "add_loss"])
@pytest.mark.parametrize("mode", ["gradient", "past"])
def test_k_micro_batches_equal_one_call_on_their_union(mode: str, how: str) -> None:
    """SPEC: k = 2 micro-batches (each loss / 2) then one call equal one call on their union
    (float64, 1e-10, gamma moving), ALI-G as the base, alternating form."""
    batches = [(x.double(), y.double()) for x, y in make_batches(8)]
    runs, gammas = [], set()
    for accumulate in (True, False):
        model = make_model().double()
        opt = Extrapolation(AliG(model.parameters(), max_lr=5.0, momentum=0.9), mode=mode)
        for x, y in batches:
            opt.zero_grad()
            if not accumulate:
                loss = mse(model, (x, y))
                loss.backward()
                opt.step(loss=loss)
                if opt.base_optimizer.gamma is not None:
                    gammas.add(float(opt.base_optimizer.gamma))
                continue
            losses = []
            for half in (slice(0, 4), slice(4, 8)):
                part = mse(model, (x[half], y[half])) / 2
                part.backward()
                losses.append(part)
                if how == "add_loss":
                    opt.add_loss(part)
            opt.step(loss=losses) if how == "list" else opt.step()
        runs.append(values(model))
    assert (
        max_relative_deviation([v.numpy() for v in runs[0]], [v.numpy() for v in runs[1]]) <= 1e-10
    )
    assert len(gammas) > 3
    assert max(gammas) < 5.0


def test_one_micro_batch_loss_for_an_accumulated_gradient_raises() -> None:
    """AliG counts the backward passes: the update call refuses the last micro-batch's loss."""
    model = make_model().double()
    opt = Extrapolation(AliG(model.parameters(), max_lr=5.0), mode="past")
    x, y = (t.double() for t in make_batches(1)[0])
    opt.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        part = mse(model, (x[half], y[half])) / 2
        part.backward()
    before = values(model)
    with pytest.raises(ValueError, match=r"2 backward passes.*loss=\[loss_1"):
        opt.step(loss=part)
    assert same_bits(values(model), before)
    opt.add_loss(part)
    with pytest.raises(ValueError, match="added with add_loss"):
        opt.step(loss=part)
