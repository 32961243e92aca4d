"""Extrapolated ALI-G in optax: ``alig_jax.extrapolation(alig(...))`` in a jitted loop.

What it shows:
  * ``extrapolation`` (Lin, Kong, Stich, Jaggi, ICML 2020) around ``alig_jax.alig``: one
    optax transformation, one call per minibatch. In ``"gradient"`` mode (the default) the
    calls alternate: the first moves the params to the extrapolated point ``w~``, the next
    takes ALI-G's step from the anchor ``w`` with the gradient at ``w~``; ``--mode past``
    uses the previous update's gradient instead (one gradient per iteration);
  * the usual optax step, with the loss passed as ``value=`` (ALI-G needs it);
  * ``anchor_params(state, params)``: between calls the params may hold ``w~``,
    so evaluate (and save) the anchor's weights;
  * the same step compiling once, whatever the phase (both are computed and selected).

The data are scikit-learn's handwritten digits (no download), classified by a small MLP
written with ``jax.numpy`` only.

Run it:
  python examples/optax_extrapolation.py                 # a few seconds on a laptop CPU
  python examples/optax_extrapolation.py --mode past
  python examples/optax_extrapolation.py --tiny          # what CI runs (or ALIG_EXAMPLES_TINY=1)

Needs: jax, optax, scikit-learn, and alig (``pip install -e ".[jax]"``).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from alig_jax import alig, anchor_params, extrapolation


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    """The MLP's weights ``64 -> 128 -> 10``, drawn from ``key``."""
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (64, 128)) / 8.0,
        "b1": jnp.zeros(128),
        "w2": jax.random.normal(k2, (128, 10)) / jnp.sqrt(128.0),
        "b2": jnp.zeros(10),
    }


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """The mean cross-entropy of the MLP on inputs ``x`` and integer labels ``y``."""
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> float:
    """The fraction of rows of ``x`` classified as ``y``."""
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return float(jnp.mean(jnp.argmax(hidden @ params["w2"] + params["b2"], axis=1) == y))


def parse_args() -> argparse.Namespace:
    """The command line: ``--tiny`` (or ``ALIG_EXAMPLES_TINY=1``) and the sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mode", choices=["gradient", "past", "noise"], default="gradient")
    parser.add_argument("--max-lr", type=float, default=0.3, help="ALI-G's cap on the step")
    args = parser.parse_args()
    args.tiny = args.tiny or os.environ.get("ALIG_EXAMPLES_TINY") == "1"
    return args


def main() -> None:
    """Trains, prints the final loss and accuracy, and checks that the loss went down."""
    args = parse_args()
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.2, random_state=0)
    if args.tiny:
        x_train, y_train, args.epochs, args.batch = x_train[:256], y_train[:256], 1, 32
    x_train, x_test = jnp.asarray(x_train, jnp.float32), jnp.asarray(x_test, jnp.float32)
    y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)

    noise = {"sigma": 0.01, "key": 0} if args.mode == "noise" else {}
    tx = extrapolation(alig(max_lr=args.max_lr, momentum=0.9), mode=args.mode, **noise)
    params = init_params(jax.random.key(0))
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, x, y):  # the usual optax step
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    first = float(loss_fn(params, x_train, y_train))
    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order) - args.batch + 1, args.batch):
            rows = order[start : start + args.batch]
            params, state = train_step(params, state, x_train[rows], y_train[rows])
        anchor = anchor_params(state, params)  # evaluate these, not params
        print(
            f"epoch {epoch + 1}: train loss at the anchor {loss_fn(anchor, x_train, y_train):.4f}"
        )

    anchor = anchor_params(state, params)
    last = float(loss_fn(anchor, x_train, y_train))
    print(
        f"mode={args.mode}: final train loss {last:.4f} (from {first:.4f}), "
        f"test accuracy {accuracy(anchor, x_test, y_test):.3f}, "
        f"iterations {int(state.iteration)}, skipped {int(state.skipped)}"
    )
    assert last < first, f"training did not progress: loss {first:.4f} -> {last:.4f}"


if __name__ == "__main__":
    main()
