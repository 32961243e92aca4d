"""Lightning: automatic (with and without accumulate_grad_batches), fp16 AMP, manual
optimization; each against one step on the union of the micro-batches (float64, 1e-10,
gamma moving), and the errors where the loss would not match the gradient."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision

from alig_torch import AliG
from alig_torch.integrations.lightning import AliGCallback
from lightning_trainer import quiet_trainer
from torch_accumulation import BATCH, KWARGS, STEPS, Run, assert_same_run, data, net, reference_run


class Classifier(L.LightningModule):
    """Automatic optimization: ``training_step`` returns the micro-batch's mean loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = net()
        self.gammas: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        alig = self.trainer.optimizers[0]
        if alig.steps_taken is not None and int(alig.steps_taken) > len(self.gammas):
            self.gammas.append(float(alig.gamma))  # after each step

    def configure_optimizers(self) -> AliG:
        return AliG(self.parameters(), **KWARGS)


class ManualClassifier(Classifier):
    """Manual optimization: ``manual_backward`` then ``opt.step(loss=...)`` or, accumulating
    over ``k`` micro-batches, ``opt.add_loss`` after each and ``opt.step()`` every k-th."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.k = k

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        if self.k == 1:
            opt.zero_grad()
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            opt.step(loss=loss)
        else:
            loss = F.cross_entropy(self.net(x), y) / self.k
            self.manual_backward(loss)
            opt.add_loss(loss)
            if (batch_idx + 1) % self.k == 0:
                opt.step()
                opt.zero_grad()


def _trainer(k: int, **kwargs: Any) -> L.Trainer:
    return quiet_trainer(STEPS, accumulate_grad_batches=k, **kwargs)


def _loader(k: int) -> torch.utils.data.DataLoader:
    x, y = data()
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH // k, shuffle=False)


def _run(module: Classifier, trainer: L.Trainer, k: int) -> Run:
    trainer.fit(module, _loader(k))
    alig = trainer.optimizers[0]
    assert int(alig.steps_taken) == STEPS
    return Run([p.detach().numpy().copy() for p in module.net.parameters()], module.gammas)


def test_automatic_without_accumulation_needs_no_callback() -> None:
    assert_same_run(_run(Classifier(), _trainer(1), 1), reference_run())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_automatic_with_the_callback_equals_one_step_on_the_union(k: int) -> None:
    module = Classifier()
    assert_same_run(_run(module, _trainer(k, callbacks=[AliGCallback()]), k), reference_run())


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_without_the_callback_is_an_error_naming_it(k: int) -> None:
    """The closure returns the last micro-batch's loss / k: refused, not a silent step."""
    module = Classifier()
    with pytest.raises(
        ValueError, match=f"got one loss \\(the closure's\\), but {k} backward"
    ) as e:
        _trainer(k).fit(module, _loader(k))
    assert "AliGCallback()" in str(e.value)
    untouched = zip(module.net.parameters(), net().parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in untouched)  # no step was taken


def _fp16_trainer(k: int, callbacks: list[Any]) -> L.Trainer:
    """Lightning's fp16 AMP plugin with a GradScaler, on the CPU (float64 parameters are
    not cast by autocast, and the power-of-two scale is exact: the run equals float64)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    return _trainer(k, plugins=[plugin], callbacks=callbacks)


@pytest.mark.parametrize("k", [1, 2])
def test_fp16_amp_with_the_callback_gets_the_unscaled_loss(k: int) -> None:
    module = Classifier()
    trainer = _fp16_trainer(k, [AliGCallback()])
    assert_same_run(_run(module, trainer, k), reference_run())
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**12  # it scaled the loss


def test_fp16_amp_without_the_callback_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="got no loss") as e:
        _fp16_trainer(1, []).fit(Classifier(), _loader(1))
    assert "AliGCallback()" in str(e.value)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_manual_optimization_with_step_loss_or_add_loss(k: int) -> None:
    """k = 1: ``self.manual_backward(loss); opt.step(loss=loss)`` (Lightning adds its own
    closure); k > 1: ``opt.add_loss`` after each ``manual_backward``."""
    module = ManualClassifier(k)
    # STEPS optimizer steps, in manual optimization too; the callback idles there
    trainer = quiet_trainer(STEPS, callbacks=[AliGCallback()])
    trainer.fit(module, _loader(k))
    alig = trainer.optimizers[0]
    assert int(alig.steps_taken) == STEPS
    run = Run([p.detach().numpy().copy() for p in module.net.parameters()], module.gammas)
    assert_same_run(run, reference_run())


def test_the_callback_refuses_gradient_clipping() -> None:
    with pytest.raises(ValueError, match=r"gradient_clip_val=0\.5"):
        _trainer(1, callbacks=[AliGCallback()], gradient_clip_val=0.5).fit(Classifier(), _loader(1))


def test_the_callback_refuses_a_trainer_without_alig() -> None:
    class WithSGD(Classifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match=r"found no alig_torch\.AliG"):
        _trainer(1, callbacks=[AliGCallback()]).fit(WithSGD(), _loader(1))
