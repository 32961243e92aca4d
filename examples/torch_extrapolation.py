"""Extrapolated ALI-G in PyTorch: ``alig_torch.Extrapolation(AliG(...))`` in a hand loop.

What it shows:
  * ``Extrapolation`` (Lin, Kong, Stich, Jaggi, ICML 2020) around ``alig_torch.AliG``: each
    iteration takes its gradient at an extrapolated point ``w~ = w + d`` and ALI-G steps
    from the anchor ``w`` with it (ALI-G then takes the Polyak step of the linear model of
    the loss at ``w~`` seen from ``w``);
  * ``--mode gradient`` (the default): ``opt.step(closure)`` evaluates the closure at the
    anchor, then at ``w~``, on the same batch (EXTRAP-SGD, two gradients per iteration);
    ``--mode past``: the previous update's gradient as ``d`` (one gradient per iteration),
    with the ``loss.backward(); opt.step(loss=loss)`` form;
  * ``with opt.at_anchor():`` to evaluate (and save) at the anchor: between calls the
    parameters may hold ``w~``.
  Any torch optimizer may be the base, e.g.
  ``Extrapolation(torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True))``.

The data are scikit-learn's handwritten digits (no download), classified by a small MLP.

Run it:
  python examples/torch_extrapolation.py                 # a few seconds on a laptop CPU
  python examples/torch_extrapolation.py --mode past
  python examples/torch_extrapolation.py --tiny          # what CI runs (or ALIG_EXAMPLES_TINY=1)

Needs: torch, scikit-learn, and alig (``pip install -e ".[torch]"``).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from alig_torch import AliG, Extrapolation


def parse_args() -> argparse.Namespace:
    """The command line: ``--tiny`` (or ``ALIG_EXAMPLES_TINY=1``) and the sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mode", choices=["gradient", "past"], default="gradient")
    parser.add_argument("--max-lr", type=float, default=0.3, help="ALI-G's cap on the step")
    args = parser.parse_args()
    args.tiny = args.tiny or os.environ.get("ALIG_EXAMPLES_TINY") == "1"
    return args


def main() -> None:
    """Trains, prints the final loss and accuracy, and checks that the loss went down."""
    args = parse_args()
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0)
    if args.tiny:
        x_train, y_train, args.epochs, args.batch = x_train[:256], y_train[:256], 1, 32
    x_train, y_train = torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train)
    x_test, y_test = torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test)

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = Extrapolation(AliG(model.parameters(), max_lr=args.max_lr, momentum=0.9), mode=args.mode)

    def train_loss() -> float:
        with torch.no_grad(), opt.at_anchor():  # evaluate at the anchor, not at w~
            return F.cross_entropy(model(x_train), y_train).item()

    first = train_loss()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train))
        for start in range(0, len(order) - args.batch + 1, args.batch):
            rows = order[start : start + args.batch]
            if args.mode == "gradient":

                def closure(rows: torch.Tensor = rows) -> torch.Tensor:
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
                    loss.backward()
                    return loss

                opt.step(closure)  # at the anchor, then at w~, on the same batch
            else:
                opt.zero_grad()
                loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
                loss.backward()
                opt.step(loss=loss)  # one gradient per call
        print(f"epoch {epoch + 1}: train loss at the anchor {train_loss():.4f}")

    last = train_loss()
    with torch.no_grad(), opt.at_anchor():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(
        f"mode={args.mode}: final train loss {last:.4f} (from {first:.4f}), test accuracy "
        f"{accuracy:.3f}, iterations {opt.iteration}, skipped {opt.iterations_skipped}"
    )
    assert last < first, f"training did not progress: loss {first:.4f} -> {last:.4f}"


if __name__ == "__main__":
    main()
