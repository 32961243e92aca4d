"""Lightning's Trainer.fit in automatic optimization drives alig_torch.AliG unchanged."""

from __future__ import annotations

import lightning as L
import torch

from alig_torch import AliG

STEPS = 15


def _data() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 8, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS * 8,), generator=generator)
    return torch.utils.data.TensorDataset(x, y)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
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
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=False)
    trainer.fit(module, loader)

    reference = _net()
    opt = AliG(reference.parameters(), max_lr=2.0, momentum=0.9)
    gammas = []
    for x, y in loader:

        def closure(x=x, y=y) -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(reference(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        gammas.append(float(opt.gamma))

    assert len(module.gammas) == STEPS
    assert len(set(module.gammas)) > 1  # the loss reached the optimizer: gamma moved
    assert max(abs(a - b) for a, b in zip(module.gammas, gammas, strict=True)) <= 1e-12
    for a, b in zip(module.net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
