"""ALI-G in Hugging Face's ``Trainer``: ``AliGTrainer``, with gradient accumulation.

What it shows:
  * ``alig_torch.integrations.transformers.AliGTrainer``, a ``transformers.Trainer`` that
    hands ALI-G the loss of every backward pass (the plain ``Trainer`` calls
    ``optimizer.step()`` with no loss, and AliG then raises, naming AliGTrainer);
  * the ``TrainingArguments`` ALI-G needs, each of which AliGTrainer checks:
    ``learning_rate`` is ALI-G's cap ``max_lr``; ``max_grad_norm=0.0`` (Trainer's default
    1.0 clips the gradient before ALI-G takes its norm); ``lr_scheduler_type="constant"``
    (the default linear schedule would drive the cap to 0); ``weight_decay=0.0``;
  * AliG's other arguments through ``alig_kwargs``.

The model is a tiny MLP written inline as a ``PreTrainedModel`` (nothing is downloaded);
the data are scikit-learn's breast cancer set (30 features, 2 classes).

Run it:
  python examples/hf_trainer.py                 # a few seconds on a laptop CPU
  python examples/hf_trainer.py --tiny          # what CI runs (or ALIG_EXAMPLES_TINY=1)

Needs: torch, transformers, accelerate, scikit-learn, and alig
(``pip install -e ".[torch]" transformers accelerate``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from alig_torch.integrations.transformers import AliGTrainer


class TinyConfig(transformers.PretrainedConfig):
    """The MLP's sizes, as a transformers config."""

    model_type = "alig-example-mlp"

    def __init__(
        self, n_features: int = 30, hidden: int = 32, n_classes: int = 2, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.n_features, self.hidden, self.n_classes = n_features, hidden, n_classes


class TinyClassifier(transformers.PreTrainedModel):
    """A two-layer MLP behind Trainer's model interface (a dict with ``loss`` and ``logits``)."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(config.n_features, config.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(config.hidden, config.n_classes),
        )
        self.post_init()

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The logits, and the mean cross-entropy when ``labels`` are given."""
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Rows(torch.utils.data.Dataset):
    """Rows of ``x`` and their labels, as the dicts Trainer feeds the model."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def parse_args() -> argparse.Namespace:
    """The command line: ``--tiny`` (or ``ALIG_EXAMPLES_TINY=1``) and the sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="rows of one micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--max-lr", type=float, default=0.5, help="ALI-G's cap on the step")
    args = parser.parse_args()
    args.tiny = args.tiny or os.environ.get("ALIG_EXAMPLES_TINY") == "1"
    return args


def main() -> None:
    """Trains, prints the final loss and accuracy, and checks that the loss went down."""
    args = parse_args()
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    scaler = StandardScaler().fit(x_train)
    x_train = torch.tensor(scaler.transform(x_train), dtype=torch.float32)
    x_test = torch.tensor(scaler.transform(x_test), dtype=torch.float32)
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
    if args.tiny:
        x_train, y_train, args.epochs = x_train[:128], y_train[:128], 1

    transformers.set_seed(0)
    model = TinyClassifier(TinyConfig())

    def train_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(x_train)["logits"], y_train).item()

    first = train_loss()
    with tempfile.TemporaryDirectory() as output_dir:
        args_hf = transformers.TrainingArguments(
            output_dir=output_dir,
            learning_rate=args.max_lr,  # ALI-G's max_lr
            max_grad_norm=0.0,  # no clipping: ALI-G takes the norm of the raw gradient
            lr_scheduler_type="constant",  # the cap stays where you put it
            weight_decay=0.0,
            gradient_accumulation_steps=args.accumulate,
            per_device_train_batch_size=args.batch,
            num_train_epochs=args.epochs,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=args.tiny,
            seed=0,
        )
        trainer = AliGTrainer(
            model=model,
            args=args_hf,
            train_dataset=Rows(x_train, y_train),
            alig_kwargs={"momentum": 0.9},
        )
        trainer.train()

    alig = trainer.optimizer.optimizer  # Trainer wraps it in accelerate's AcceleratedOptimizer
    last = train_loss()
    with torch.no_grad():
        accuracy = (model(x_test)["logits"].argmax(1) == y_test).float().mean().item()
    print(f"final train loss {last:.4f} (from {first:.4f}), test accuracy {accuracy:.3f}")
    print(f"ALI-G steps taken {int(alig.steps_taken)}, last gamma {float(alig.gamma):.4f}")
    assert last < first, f"training did not progress: loss {first:.4f} -> {last:.4f}"


if __name__ == "__main__":
    main()
