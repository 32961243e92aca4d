"""ALI-G with flax's NNX API: ``nnx.Optimizer(model, alig(...))`` and ``value=loss``.

What it shows:
  * ``alig_jax.alig``, an optax transformation, inside ``flax.nnx.Optimizer``;
  * the loss reaching ALI-G: ``optimizer.update(model, grads, value=loss)`` (nnx forwards
    the keyword to ``tx.update``; without ``value=`` ALI-G raises);
  * a jitted train step (``nnx.jit``) that compiles once: ALI-G's skipped steps and its cap
    are ``jnp.where``, never a Python branch;
  * reading ALI-G's records from the optimizer's state (``gamma``, ``steps_taken``).
  For gradient accumulation, ``nnx.Optimizer(model, alig_jax.multi_steps(alig(...), k),
  wrt=nnx.Param)`` with the same ``update`` line per micro-batch (not ``optax.MultiSteps``,
  which hands ALI-G the last micro-batch's loss with the mean gradient).

The data are scikit-learn's handwritten digits (no download), classified by a small MLP.

Run it:
  python examples/flax_nnx.py                 # a few seconds on a laptop CPU
  python examples/flax_nnx.py --tiny          # what CI runs (or ALIG_EXAMPLES_TINY=1)

Needs: jax, optax, flax, scikit-learn, and alig (``pip install -e ".[jax]" flax``).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from alig_jax import alig


class MLP(nnx.Module):
    """``64 -> 128 -> 10`` with a ReLU."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(64, 128, rngs=rngs)
        self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The logits of the rows of ``x``."""
        return self.out(jax.nn.relu(self.hidden(x)))


def cross_entropy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    """The mean cross-entropy of ``model`` on inputs ``x`` and integer labels ``y``."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """One ALI-G step on a minibatch; returns its loss."""
    loss, grads = nnx.value_and_grad(cross_entropy)(model, x, y)
    optimizer.update(model, grads, value=loss)  # ALI-G's step size needs the loss
    return loss


def parse_args() -> argparse.Namespace:
    """The command line: ``--tiny`` (or ``ALIG_EXAMPLES_TINY=1``) and the sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-lr", type=float, default=1.0, help="ALI-G's cap on the step")
    args = parser.parse_args()
    args.tiny = args.tiny or os.environ.get("ALIG_EXAMPLES_TINY") == "1"
    return args


def main() -> None:
    """Trains, prints the final loss and accuracy, and checks that the loss went down."""
    args = parse_args()
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0)
    if args.tiny:
        x_train, y_train, args.epochs = x_train[:256], y_train[:256], 1
    x_train, x_test = jnp.asarray(x_train, jnp.float32), jnp.asarray(x_test, jnp.float32)
    y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, alig(max_lr=args.max_lr, momentum=0.9), wrt=nnx.Param)

    first = float(cross_entropy(model, x_train, y_train))
    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order) - args.batch + 1, args.batch):
            rows = order[start : start + args.batch]
            train_step(model, optimizer, x_train[rows], y_train[rows])
        state = optimizer.opt_state  # alig_jax.AliGState: ALI-G's records
        print(
            f"epoch {epoch + 1}: train loss {float(cross_entropy(model, x_train, y_train)):.4f}, "
            f"last gamma {float(state.gamma[...]):.4f}"
        )

    last = float(cross_entropy(model, x_train, y_train))
    accuracy = float(jnp.mean(jnp.argmax(model(x_test), axis=1) == y_test))
    print(f"final train loss {last:.4f} (from {first:.4f}), test accuracy {accuracy:.3f}")
    print(f"ALI-G steps taken {int(optimizer.opt_state.steps_taken[...])}")
    assert last < first, f"training did not progress: loss {first:.4f} -> {last:.4f}"


if __name__ == "__main__":
    main()
