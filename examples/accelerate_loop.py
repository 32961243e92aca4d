"""ALI-G in a Hugging Face accelerate loop, with gradient accumulation.

What it shows:
  * ``alig_torch.integrations.accelerate.backward(accelerator, loss, opt)`` in place of
    ``accelerator.backward(loss)``: it hands ALI-G the loss exactly as accelerate
    backpropagates it (divided by the accumulation steps). accelerate's optimizer wrapper
    passes no keyword on, so ``opt.step(loss=...)`` cannot reach ALI-G, and a plain
    ``accelerator.backward(loss); opt.step()`` raises (AliG got no loss), naming the helper;
  * ``Accelerator(gradient_accumulation_steps=k)`` with ``accelerator.accumulate(model)``:
    ``opt.step()`` then steps on every k-th micro-batch, with the sum of the k losses.

The data are scikit-learn's handwritten digits (no download), classified by a small MLP.
The same script runs on several processes or GPUs with ``accelerate launch``.

Run it:
  python examples/accelerate_loop.py                 # a few seconds on a laptop CPU
  python examples/accelerate_loop.py --tiny          # what CI runs (or ALIG_EXAMPLES_TINY=1)

Needs: torch, accelerate, scikit-learn, and alig (``pip install -e ".[torch]" accelerate``).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from alig_torch import AliG
from alig_torch.integrations.accelerate import backward


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
    set_seed(0)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0)
    if args.tiny:
        x_train, y_train, args.epochs = x_train[:256], y_train[:256], 1
    x_train = torch.tensor(x_train, dtype=torch.float32)
    y_train = torch.tensor(y_train)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch, shuffle=True)

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    model, opt, loader = accelerator.prepare(
        model, AliG(model.parameters(), max_lr=args.max_lr, momentum=0.9), loader
    )

    def train_loss() -> float:
        with torch.no_grad():
            x, y = x_train.to(accelerator.device), y_train.to(accelerator.device)
            return F.cross_entropy(model(x), y).item()

    first = train_loss()
    for epoch in range(args.epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                backward(accelerator, loss, opt)  # instead of accelerator.backward(loss)
                opt.step()  # steps on every k-th micro-batch only
                opt.zero_grad()
        accelerator.print(f"epoch {epoch + 1}: train loss {train_loss():.4f}")

    alig = opt.optimizer  # the AliG inside accelerate's AcceleratedOptimizer
    last = train_loss()
    with torch.no_grad():
        logits = model(torch.tensor(x_test, dtype=torch.float32, device=accelerator.device))
        accuracy = (logits.argmax(1).cpu() == torch.tensor(y_test)).float().mean().item()
    accelerator.print(
        f"final train loss {last:.4f} (from {first:.4f}), test accuracy {accuracy:.3f}\n"
        f"ALI-G steps taken {int(alig.steps_taken)}, last gamma {float(alig.gamma):.4f}"
    )
    assert last < first, f"training did not progress: loss {first:.4f} -> {last:.4f}"


if __name__ == "__main__":
    main()
