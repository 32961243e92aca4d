"""Gradient accumulation in hand-written loops: the loss ALI-G gets is the loss of the gradient.

Every accumulating loop is checked against one step on the union of its micro-batches
(float64, 1e-10, gamma moving); a loop that hands over one micro-batch's loss after
several backward passes is an error; the backward-pass count survives deepcopy,
pickling, state_dict round trips and add_param_group.
"""

from __future__ import annotations

import copy
import gc
import itertools
import pickle
import re
import weakref
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from alig_cases import max_relative_deviation
from alig_torch import AliG
from torch_accumulation import BATCH, KWARGS, STEPS, Run, assert_same_run, data, net, reference_run
from torch_accumulation import snapshot as _snapshot

Loop = Callable[[AliG, torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]], None]


def _add_loss_after_each_backward(opt: AliG, model: torch.nn.Module, micro: list) -> None:
    opt.zero_grad()
    for x, y in micro:
        loss = F.cross_entropy(model(x), y) / len(micro)
        loss.backward()
        opt.add_loss(loss)
    opt.step()


def _add_loss_before_each_backward(opt: AliG, model: torch.nn.Module, micro: list) -> None:
    opt.zero_grad()
    for x, y in micro:
        loss = F.cross_entropy(model(x), y) / len(micro)
        opt.add_loss(loss)
        loss.backward()
    opt.step()


def _list_of_losses(opt: AliG, model: torch.nn.Module, micro: list) -> None:
    opt.zero_grad()
    losses = []
    for x, y in micro:
        loss = F.cross_entropy(model(x), y) / len(micro)
        loss.backward()
        losses.append(loss)
    opt.step(loss=losses)


def _sum_over_items(opt: AliG, model: torch.nn.Module, micro: list) -> None:
    """Micro-batches of unequal sizes, each loss a sum divided by the union's item count."""
    x = torch.cat([m[0] for m in micro])
    y = torch.cat([m[1] for m in micro])
    cuts = {2: [0, 5, BATCH], 4: [0, 3, 7, 12, BATCH]}[len(micro)]
    opt.zero_grad()
    for start, stop in itertools.pairwise(cuts):
        loss = F.cross_entropy(model(x[start:stop]), y[start:stop], reduction="sum") / BATCH
        loss.backward()
        opt.add_loss(loss)
    opt.step()


def _closure_adding_losses(opt: AliG, model: torch.nn.Module, micro: list) -> None:
    """Lightning-like: the closure runs the last micro-batch and returns its loss only."""
    opt.zero_grad()
    k = len(micro)
    for x, y in micro[:-1]:
        loss = F.cross_entropy(model(x), y) / k
        opt.add_loss(loss)
        loss.backward()

    def closure() -> torch.Tensor:
        x, y = micro[-1]
        loss = F.cross_entropy(model(x), y) / k
        opt.add_loss(loss)
        loss.backward()
        return loss  # one micro-batch's: ignored, the added losses win

    opt.step(closure)


LOOPS: dict[str, Loop] = {
    "add_loss_after_backward": _add_loss_after_each_backward,
    "add_loss_before_backward": _add_loss_before_each_backward,
    "step_loss_list": _list_of_losses,
    "sum_over_items": _sum_over_items,
    "closure_and_add_loss": _closure_adding_losses,
}


def _run(loop: Loop, k: int) -> Run:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    x, y = data()
    gammas = []
    for t in range(STEPS):
        rows = x[t * BATCH : (t + 1) * BATCH], y[t * BATCH : (t + 1) * BATCH]
        micro = list(zip(rows[0].chunk(k), rows[1].chunk(k), strict=True))
        loop(opt, model, micro)
        gammas.append(float(opt.gamma))
    return _snapshot(model, gammas)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("loop", LOOPS, ids=str)
def test_accumulating_loop_equals_one_step_on_the_union(loop: str, k: int) -> None:
    assert_same_run(_run(LOOPS[loop], k), reference_run())


def _backward_micro_batches(model: torch.nn.Module, k: int) -> list[torch.Tensor]:
    x, y = data()
    losses = []
    for xm, ym in zip(x[:BATCH].chunk(k), y[:BATCH].chunk(k), strict=True):
        loss = F.cross_entropy(model(xm), ym) / k
        loss.backward()
        losses.append(loss)
    return losses


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("k", [2, 4])
def test_one_micro_batch_loss_after_k_backward_passes_is_an_error(k: int) -> None:
    """The bug of issue 13: ``(loss / k).backward()`` k times, then ``step(loss=loss)``."""
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    opt.zero_grad()
    losses = _backward_micro_batches(model, k)
    before = _params(model)
    with pytest.raises(ValueError, match=f"got one loss \\(loss=\\), but {k} backward passes") as e:
        opt.step(loss=losses[-1])
    message = str(e.value)
    for way in ("opt.add_loss(loss)", "opt.step(loss=[loss_1, ..., loss_k])", "AliGCallback"):
        assert way in message
    assert "alig_torch.integrations.accelerate.backward" in message
    assert "AliGTrainer" in message
    assert _unchanged(model, before)  # no step was taken
    assert opt.steps_taken is None  # nor any state created


def test_closure_returning_one_micro_batch_loss_after_accumulation_is_an_error() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    opt.zero_grad()
    losses = _backward_micro_batches(model, 1)  # one backward pass outside the closure
    x, y = data()

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x[BATCH:]), y[BATCH:])
        loss.backward()
        return loss

    assert losses
    with pytest.raises(ValueError, match="got one loss \\(the closure's\\), but 2 backward"):
        opt.step(closure)


def test_fewer_added_losses_than_backward_passes_is_an_error() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    opt.zero_grad()
    losses = _backward_micro_batches(model, 4)
    for loss in losses[:3]:
        opt.add_loss(loss)
    with pytest.raises(ValueError, match="got 3 losses \\(added with add_loss\\(\\)\\), but 4"):
        opt.step()


def test_a_loss_added_twice_is_an_error() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    opt.zero_grad()
    for loss in _backward_micro_batches(model, 2):
        opt.add_loss(loss)
        opt.add_loss(loss)
    with pytest.raises(ValueError, match=r"got 4 losses .* only 2 backward passes.*added twice"):
        opt.step()


def test_loss_list_of_the_wrong_length_is_an_error() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    opt.zero_grad()
    losses = _backward_micro_batches(model, 4)
    with pytest.raises(ValueError, match="got 2 losses \\(as a list"):
        opt.step(loss=losses[:2])


def test_added_losses_and_loss_keyword_together_is_an_error() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    (loss,) = _backward_micro_batches(model, 1)
    opt.add_loss(loss)
    with pytest.raises(ValueError, match="got loss= and also 1 loss added with add_loss"):
        opt.step(loss=loss)


def test_empty_loss_list_is_an_error() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    _backward_micro_batches(model, 1)
    with pytest.raises(ValueError, match="empty list of losses"):
        opt.step(loss=[])


def test_two_losses_backpropagated_separately_and_handed_over_together() -> None:
    """A legitimate loss of several backward() calls: the list form, or add_loss twice,
    equals one backward of the summed loss."""
    x, y = data()
    results = {}
    for how in ("one_backward", "list", "add_loss_twice"):
        model = net()
        opt = AliG(model.parameters(), **KWARGS)
        for t in range(STEPS):
            xb, yb = x[t * BATCH : (t + 1) * BATCH], y[t * BATCH : (t + 1) * BATCH]
            opt.zero_grad()
            fit = F.cross_entropy(model(xb), yb)
            penalty = 1e-2 * model(xb).square().mean()
            if how == "one_backward":
                (fit + penalty).backward()
                opt.step(loss=fit + penalty)
            else:
                fit.backward()
                penalty.backward()
                if how == "list":
                    opt.step(loss=[fit, penalty])
                else:
                    opt.add_loss(fit)
                    opt.add_loss(penalty)
                    opt.step()
        results[how] = _snapshot(model, [float(opt.gamma)])
    for how in ("list", "add_loss_twice"):
        assert max_relative_deviation(results[how].params, results["one_backward"].params) <= 1e-12


def test_backward_passes_through_disjoint_parameters_are_not_miscounted() -> None:
    """Two heads, each loss backpropagated alone: each parameter sees one backward pass,
    but two passes happened, and two losses are right."""
    torch.manual_seed(0)
    heads = torch.nn.ModuleList([torch.nn.Linear(5, 1).double() for _ in range(2)])
    opt = AliG(heads.parameters(), **KWARGS)
    x, _ = data()
    losses = []
    for head in heads:
        loss = head(x[:BATCH]).square().mean()
        loss.backward()
        losses.append(loss)
    opt.step(loss=losses)
    assert int(opt.steps_taken) == 1
    for head in heads:
        loss = head(x[:BATCH]).square().mean()
        loss.backward()
        opt.add_loss(loss)
    opt.step()
    assert int(opt.steps_taken) == 2


def test_gradients_set_to_none_in_between_restart_the_count() -> None:
    """``model.zero_grad()`` (set_to_none) after a backward pass that is thrown away: the
    gradient holds one backward pass, and one loss is right."""
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    _backward_micro_batches(model, 1)  # e.g. a probe; its gradient is discarded
    model.zero_grad()
    (loss,) = _backward_micro_batches(model, 1)
    opt.step(loss=loss)
    assert int(opt.steps_taken) == 1


def test_gradients_zeroed_in_place_behind_the_optimizer_are_named_in_the_error() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    _backward_micro_batches(model, 1)
    model.zero_grad(set_to_none=False)  # opt cannot see this: it counts 2 passes
    (loss,) = _backward_micro_batches(model, 1)
    with pytest.raises(ValueError, match=re.escape("model.zero_grad(set_to_none=False)")):
        opt.step(loss=loss)
    opt.zero_grad(set_to_none=False)  # the way that the optimizer sees
    (loss,) = _backward_micro_batches(model, 1)
    opt.step(loss=loss)


def test_step_and_zero_grad_forget_the_added_losses_and_the_count() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    (stale,) = _backward_micro_batches(model, 1)
    opt.add_loss(stale)
    opt.zero_grad()
    (loss,) = _backward_micro_batches(model, 1)
    opt.step(loss=loss)  # neither the stale loss nor its backward pass count
    (loss,) = _backward_micro_batches(model, 1)
    opt.step(loss=loss)  # the step forgot the previous backward pass
    assert int(opt.steps_taken) == 2
    with pytest.raises(ValueError, match="got no loss"):
        opt.step()  # nothing added since the last step


def test_a_failed_step_forgets_what_it_was_given() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    opt.zero_grad()
    losses = _backward_micro_batches(model, 2)
    opt.add_loss(losses[0])
    with pytest.raises(ValueError, match="got one loss"):
        opt.step()
    with pytest.raises(ValueError, match="got no loss"):
        opt.step()


def test_add_loss_checks_the_loss() -> None:
    opt = AliG(net().parameters(), **KWARGS)
    with pytest.raises(ValueError, match="scalar"):
        opt.add_loss(torch.ones(3))
    with pytest.raises(ValueError, match="float or a 0-d tensor"):
        opt.add_loss("0.5")


def test_added_losses_are_detached_and_summed_in_the_accumulation_dtype() -> None:
    model = torch.nn.Linear(2, 1)  # float32 parameters
    opt = AliG(model.parameters(), **KWARGS)
    loss = model(torch.ones(1, 2)).sum()
    opt.add_loss(loss)
    opt.add_loss(0.5)
    total = opt._accumulation.total
    assert total is not None
    assert total.dtype == torch.float32
    assert total.dim() == 0
    assert not total.requires_grad
    torch.testing.assert_close(total, loss.detach() + 0.5)


def test_closure_returning_none_with_loss_keyword_uses_the_keyword() -> None:
    """Lightning's manual optimization: ``opt.step(loss=loss)`` arrives with Lightning's own
    closure (which returns None)."""
    runs = []
    for how in ("plain", "closure_none"):
        model = net()
        opt = AliG(model.parameters(), **KWARGS)
        (loss,) = _backward_micro_batches(model, 1)
        if how == "plain":
            opt.step(loss=loss)
        else:
            assert opt.step(lambda: None, loss=loss) is loss
        runs.append(_params(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_grad_scaler_with_add_loss_and_no_keyword() -> None:
    """``scaler.step(opt)`` forwards no loss: the unscaled loss added before it serves."""
    results = []
    for how in ("keyword", "add_loss"):
        model = net()
        opt = AliG(model.parameters(), **KWARGS)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        x, y = data()
        for t in range(STEPS):
            opt.zero_grad()
            losses = []
            for xm, ym in zip(
                x[t * BATCH : (t + 1) * BATCH].chunk(2),
                y[t * BATCH : (t + 1) * BATCH].chunk(2),
                strict=True,
            ):
                loss = F.cross_entropy(model(xm), ym) / 2
                scaler.scale(loss).backward()
                losses.append(loss)
                if how == "add_loss":
                    opt.add_loss(loss)
            scaler.unscale_(opt)
            if how == "keyword":
                scaler.step(opt, loss=losses)
            else:
                scaler.step(opt)
            scaler.update()
        results.append(_params(model))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    expected = reference_run().params
    assert max_relative_deviation([p.numpy() for p in results[0]], expected) <= 1e-10


# ---------------------------------------------------------------- the backward-pass count


def _two_passes_raise(opt: AliG, model: torch.nn.Module) -> None:
    opt.zero_grad()
    losses = _backward_micro_batches(model, 2)
    with pytest.raises(ValueError, match="but 2 backward passes"):
        opt.step(loss=losses[-1])


def _one_pass_steps(opt: AliG, model: torch.nn.Module) -> None:
    opt.zero_grad()
    (loss,) = _backward_micro_batches(model, 1)
    opt.step(loss=loss)


def test_deepcopy_counts_on_the_copy_s_own_parameters() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    _one_pass_steps(opt, model)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    _one_pass_steps(opt_copy, model_copy)  # one hook per parameter, not two
    _two_passes_raise(opt_copy, model_copy)
    _backward_micro_batches(model_copy, 1)
    _one_pass_steps(opt, model)  # the copy's backward passes are not the original's


def test_pickle_round_trip_counts_on_the_new_parameters() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    _one_pass_steps(opt, model)
    model_copy, opt_copy = pickle.loads(pickle.dumps((model, opt)))
    _one_pass_steps(opt_copy, model_copy)
    _two_passes_raise(opt_copy, model_copy)


def test_state_dict_round_trip_keeps_one_hook_per_parameter() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    _one_pass_steps(opt, model)
    fresh = AliG(model.parameters(), **KWARGS)
    fresh.load_state_dict(opt.state_dict())
    del opt
    gc.collect()
    _one_pass_steps(fresh, model)  # a doubled hook would count 2 passes and raise
    _two_passes_raise(fresh, model)
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())


def test_added_param_group_is_counted() -> None:
    torch.manual_seed(0)
    first, second = torch.nn.Linear(5, 1).double(), torch.nn.Linear(5, 1).double()
    opt = AliG(first.parameters(), **KWARGS)
    opt.add_param_group({"params": list(second.parameters())})
    x, _ = data()
    for _ in range(2):
        second(x[:BATCH]).square().mean().backward()
    with pytest.raises(ValueError, match="but 2 backward passes"):
        opt.step(loss=1.0)


def test_parameters_frozen_at_construction_are_counted_once_unfrozen() -> None:
    model = net()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = AliG(model.parameters(), **KWARGS)
    for p in model.parameters():
        p.requires_grad_(True)
    opt.zero_grad()  # watched from here on
    _two_passes_raise(opt, model)


def test_hooks_do_not_keep_the_optimizer_alive_and_go_with_it() -> None:
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    _one_pass_steps(opt, model)
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_gradients_written_without_backward_are_not_checked() -> None:
    """Where no hook fires (gradients assigned, e.g. by FSDP1 into flat parameters), the
    count is unknown and nothing is refused."""
    model = net()
    opt = AliG(model.parameters(), **KWARGS)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1) if p.grad is None else p.grad + 0.1
    opt.step(loss=1.0)
    assert int(opt.steps_taken) == 1


def test_compiled_step_with_added_losses_compiles_once_and_equals_eager() -> None:
    """The bookkeeping (added losses, counts) is traced without a graph break, and its
    guards hold from step to step: one graph for every compiled step."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    runs = {}
    for mode in ("eager", "compiled"):
        model = net()
        opt = AliG(model.parameters(), **KWARGS)
        step_fn = opt.step.__wrapped__  # the undecorated body, as test_torch_compile.py
        x, y = data()
        for t in range(STEPS):
            if mode == "compiled" and t == 1:  # the first, eager step creates the state
                counters.clear()
                step_fn = torch.compile(step_fn, fullgraph=True, backend="inductor")
            rows = slice(t * BATCH, (t + 1) * BATCH)
            micro = zip(x[rows].chunk(2), y[rows].chunk(2), strict=True)
            opt.zero_grad()
            for xm, ym in micro:
                loss = F.cross_entropy(model(xm), ym) / 2
                loss.backward()
                opt.add_loss(loss)
            step_fn(opt)
        runs[mode] = [p.detach().numpy().copy() for p in model.parameters()]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert max_relative_deviation(runs["compiled"], runs["eager"]) <= 1e-12
