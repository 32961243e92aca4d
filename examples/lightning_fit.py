"""ALI-G in Lightning's ``Trainer.fit``, with gradient accumulation.

What it shows:
  * ``configure_optimizers`` returns an ``alig_torch.AliG``: Lightning's automatic
    optimization passes it a closure, which gives ALI-G the loss;
  * ``Trainer(accumulate_grad_batches=k)`` needs ``AliGCallback``: the closure returns only
    the last micro-batch's loss, and the callback hands ALI-G every loss Lightning
    backpropagates, so that the step's loss is the accumulated gradient's (without the
    callback, AliG raises rather than take that wrong step). The callback also makes the
    fp16 AMP plugin work (``precision="16-mixed"`` on a GPU);
  * no learning-rate scheduler and no ``gradient_clip_val``: ALI-G's step is bounded by
    ``max_lr`` (the callback refuses clipping, which would change the gradient's norm).

The data are scikit-learn's handwritten digits (no download), classified by a small MLP.

Run it:
  python examples/lightning_fit.py                 # a few seconds on a laptop CPU
  python examples/lightning_fit.py --tiny          # what CI runs (or ALIG_EXAMPLES_TINY=1)

Needs: torch, lightning, scikit-learn, and alig (``pip install -e ".[torch]" lightning``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from alig_torch import AliG
from alig_torch.integrations.lightning import AliGCallback


class DigitsClassifier(L.LightningModule):
    """``64 -> 128 -> 10`` with a ReLU, trained with ALI-G."""

    def __init__(self, max_lr: float) -> None:
        super().__init__()
        self.max_lr = max_lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The micro-batch's mean cross-entropy (Lightning backpropagates it)."""
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> AliG:
        """ALI-G: its cap ``max_lr`` and momentum; no scheduler needed."""
        return AliG(self.parameters(), max_lr=self.max_lr, momentum=0.9)


def parse_args() -> argparse.Namespace:
    """The command line: ``--tiny`` (or ``ALIG_EXAMPLES_TINY=1``) and the sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="rows of one micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--max-lr", type=float, default=1.0, help="ALI-G's cap on the step")
    args = parser.parse_args()
    args.tiny = args.tiny or os.environ.get("ALIG_EXAMPLES_TINY") == "1"
    return args


def main() -> None:
    """Trains, prints the final loss and accuracy, and checks that the loss went down."""
    args = parse_args()
    L.seed_everything(0, verbose=False)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0)
    if args.tiny:
        x_train, y_train, args.epochs = x_train[:256], y_train[:256], 1
    train = TensorDataset(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train))
    x_train_t, y_train_t = train.tensors

    model = DigitsClassifier(args.max_lr)

    def train_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model.net(x_train_t), y_train_t).item()

    first = train_loss()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        accumulate_grad_batches=args.accumulate,
        callbacks=[AliGCallback()],  # hands ALI-G each micro-batch's loss
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.tiny,
    )
    trainer.fit(model, DataLoader(train, batch_size=args.batch, shuffle=True))

    opt = trainer.optimizers[0]
    last = train_loss()
    with torch.no_grad():
        logits = model.net(torch.tensor(x_test, dtype=torch.float32))
        accuracy = (logits.argmax(1) == torch.tensor(y_test)).float().mean().item()
    print(f"final train loss {last:.4f} (from {first:.4f}), test accuracy {accuracy:.3f}")
    print(f"ALI-G steps taken {int(opt.steps_taken)}, last gamma {float(opt.gamma):.4f}")
    assert last < first, f"training did not progress: loss {first:.4f} -> {last:.4f}"


if __name__ == "__main__":
    main()
