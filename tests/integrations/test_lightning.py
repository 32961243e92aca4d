"""Lightning's Trainer.fit in automatic optimization drives alig_torch.AliG unchanged."""

from __future__ import annotations

import lightning as L
import torch

from alig_torch import AliG
from lightning_trainer import quiet_trainer
from torch_accumulation import data, net
from torch_training import cross_entropy_closure

STEPS = 15


def _data() -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(*data(STEPS, 8))


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = net()
        self.gammas: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.gammas.append(float(self.optimizers().optimizer.gamma))

    def configure_optimizers(self):
        return AliG(self.parameters(), max_lr=2.0, momentum=0.9)


def test_trainer_fit_equals_a_hand_written_closure_loop() -> None:
    module = Classifier()
    trainer = quiet_trainer(STEPS)
    loader = torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=False)
    trainer.fit(module, loader)

    reference = net()
    opt = AliG(reference.parameters(), max_lr=2.0, momentum=0.9)
    gammas = []
    for x, y in loader:
        opt.step(cross_entropy_closure(reference, opt, x, y))
        gammas.append(float(opt.gamma))

    assert len(module.gammas) == STEPS
    assert len(set(module.gammas)) > 1  # the loss reached the optimizer: gamma moved
    assert max(abs(a - b) for a, b in zip(module.gammas, gammas, strict=True)) <= 1e-12
    for a, b in zip(module.net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
