"""accelerate: ``alig_torch.integrations.accelerate.backward`` with and without
``gradient_accumulation_steps``, against one step on the union of the micro-batches
(float64, 1e-10, gamma moving)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from alig_torch import AliG
from alig_torch.integrations.accelerate import backward
from torch_accumulation import BATCH, KWARGS, STEPS, Run, assert_same_run, data, net, reference_run


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps its state in process-wide singletons: one Accelerator per test."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _loader(batch: int) -> torch.utils.data.DataLoader:
    x, y = data()
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)


def _run(k: int, *, plugin: bool) -> Run:
    """``plugin``: ``Accelerator(gradient_accumulation_steps=k)`` and ``accumulate``; else
    one Accelerator without it and, for k > 1, the accumulation written by hand."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k if plugin else 1)
    model = net()
    model, opt, loader = accelerator.prepare(
        model, AliG(model.parameters(), **KWARGS), _loader(BATCH // k)
    )
    alig = opt.optimizer
    gammas = []
    for i, (x, y) in enumerate(loader):
        if plugin:
            with accelerator.accumulate(model):
                backward(accelerator, F.cross_entropy(model(x), y), opt)
                opt.step()
                opt.zero_grad()
        else:
            backward(accelerator, F.cross_entropy(model(x), y) / k, opt)
            if (i + 1) % k == 0:
                opt.step()
                opt.zero_grad()
        if int(alig.steps_taken or 0) > len(gammas):
            gammas.append(float(alig.gamma))
    assert int(alig.steps_taken) == STEPS
    return Run([p.detach().numpy().copy() for p in model.parameters()], gammas)


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_steps_equals_one_step_on_the_union(k: int) -> None:
    assert_same_run(_run(k, plugin=True), reference_run())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_without_gradient_accumulation_steps(k: int) -> None:
    """No plugin: one backward per step (k = 1), or accumulation by hand."""
    assert_same_run(_run(k, plugin=False), reference_run())


def test_plain_accelerator_backward_is_an_error_naming_the_helper() -> None:
    accelerator = Accelerator(cpu=True)
    model = net()
    model, opt = accelerator.prepare(model, AliG(model.parameters(), **KWARGS))
    x, y = data()
    accelerator.backward(F.cross_entropy(model(x[:BATCH]), y[:BATCH]))
    with pytest.raises(ValueError, match="got no loss") as e:
        opt.step()
    assert "alig_torch.integrations.accelerate.backward(accelerator, loss, optimizer)" in str(
        e.value
    )


def test_the_helper_needs_an_alig_optimizer() -> None:
    accelerator = Accelerator(cpu=True)
    model = net()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = data()
    with pytest.raises(
        ValueError, match=r"got no alig_torch\.AliG in optimizer=AcceleratedOptimizer"
    ):
        backward(accelerator, F.cross_entropy(model(x[:BATCH]), y[:BATCH]), opt)


def test_last_micro_batch_loss_with_gradient_accumulation_steps_is_an_error() -> None:
    """The natural mistake: ``accelerator.backward(loss)`` and the loss handed over by hand
    once per step (here through the list form, one loss for two backward passes)."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = net()
    model, opt, loader = accelerator.prepare(
        model, AliG(model.parameters(), **KWARGS), _loader(BATCH // 2)
    )

    def train() -> None:
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    opt.optimizer.step(loss=loss / 2)

    with pytest.raises(ValueError, match=r"got one loss .* but 2 backward passes"):
        train()
