"""ALI-G in a hand-written PyTorch loop, with gradient accumulation and mixed precision.

What it shows:
  * ``alig_torch.AliG`` in a plain loop: no learning-rate schedule, one cap ``max_lr``;
  * gradient accumulation over ``--accumulate`` micro-batches: ``opt.add_loss(loss)`` after
    each ``backward()``, with the loss exactly as it was backpropagated (divided by k), so
    that the step's loss is the loss of the accumulated gradient;
  * mixed precision with ``torch.autocast``: ``--amp fp16`` (the default) with a
    ``torch.amp.GradScaler``, to which ALI-G hands the *unscaled* loss (``add_loss`` of the
    loss before ``scaler.scale``, then a plain ``scaler.step(opt)``); ``--amp bf16`` needs no
    scaler (the same code, the scaler disabled); ``--amp off`` runs in float32.

The data are scikit-learn's handwritten digits (8x8 images, 10 classes; no download),
classified by a small MLP. It runs on the CPU (or the first GPU if there is one).

Run it:
  python examples/torch_hand_loop.py                 # a few seconds on a laptop CPU
  python examples/torch_hand_loop.py --amp bf16 --accumulate 4
  python examples/torch_hand_loop.py --tiny          # what CI runs (or ALIG_EXAMPLES_TINY=1)

Needs: torch, scikit-learn, and alig (``pip install -e ".[torch]"`` from a clone).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from alig_torch import AliG


def parse_args() -> argparse.Namespace:
    """The command line: ``--tiny`` (or ``ALIG_EXAMPLES_TINY=1``) and the sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    parser.add_argument("--batch", type=int, default=64, help="rows of one optimizer step")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--amp", choices=["fp16", "bf16", "off"], default="fp16")
    parser.add_argument("--max-lr", type=float, default=1.0, help="ALI-G's cap on the step")
    args = parser.parse_args()
    args.tiny = args.tiny or os.environ.get("ALIG_EXAMPLES_TINY") == "1"
    return args


def main() -> None:
    """Trains, prints the final loss and accuracy, and checks that the loss went down."""
    args = parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0)
    if args.tiny:
        x_train, y_train = x_train[:256], y_train[:256]
        args.epochs = 1
    x_train = torch.tensor(x_train, dtype=torch.float32, device=device)
    y_train = torch.tensor(y_train, device=device)
    x_test = torch.tensor(x_test, dtype=torch.float32, device=device)
    y_test = torch.tensor(y_test, device=device)

    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    ).to(device)
    opt = AliG(model.parameters(), max_lr=args.max_lr, momentum=0.9)

    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[args.amp]
    # fp16 needs loss scaling; bf16 (and float32) do not: the same loop, the scaler disabled.
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def train_loss() -> float:
        with torch.no_grad(), autocast():
            return F.cross_entropy(model(x_train), y_train).item()

    first = train_loss()
    print(f"amp={args.amp}, {args.accumulate} micro-batches per step; train loss {first:.4f}")
    k, micro = args.accumulate, args.batch // args.accumulate
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), device=device)
        for start in range(0, len(order) - args.batch + 1, args.batch):
            opt.zero_grad()  # also tells ALI-G a new accumulation starts
            for i in range(k):
                rows = order[start + i * micro : start + (i + 1) * micro]
                with autocast():
                    loss = F.cross_entropy(model(x_train[rows]), y_train[rows]) / k
                scaler.scale(loss).backward()
                opt.add_loss(loss)  # the unscaled loss, as backpropagated (divided by k)
            scaler.step(opt)  # unscales the gradients, then ALI-G steps on the summed losses
            scaler.update()
        print(
            f"epoch {epoch + 1}: train loss {train_loss():.4f}, last gamma "
            f"{float(opt.gamma):.4f} (capped at max_lr: {bool(opt.capped)})"
        )

    last = train_loss()
    with torch.no_grad(), autocast():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"final train loss {last:.4f} (from {first:.4f}), test accuracy {accuracy:.3f}")
    print(f"steps taken {int(opt.steps_taken)}, skipped {int(opt.steps_skipped)}")
    assert last < first, f"training did not progress: loss {first:.4f} -> {last:.4f}"


if __name__ == "__main__":
    main()
