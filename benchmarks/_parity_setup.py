"""The one training run every framework repeats: an MLP 64-32-10 on scikit-learn's digits.

Shared by the parity tests (``tests/parity``) and the main job (``benchmarks.parity``):
the data split, the minibatch order, the initial weights (drawn once with NumPy) and the
model, written in NumPy here (forward and backward by hand, for the oracle) and in each
framework by ``_parity_runners``.

The model: ``logits = tanh(x @ w1 + b1) @ w2 + b2``, loss = mean softmax cross-entropy.
Parameters, in this order everywhere: ``w1 (64, 32), b1 (32,), w2 (32, 10), b2 (10,)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PARAM_SHAPES",
    "Digits",
    "accuracy",
    "batches",
    "initial_weights",
    "load_digits_split",
    "numpy_loss_and_grads",
]

PARAM_SHAPES: tuple[tuple[int, ...], ...] = ((64, 32), (32,), (32, 10), (10,))


@dataclass(frozen=True)
class Digits:
    """The digits data set, scaled to [0, 1], split 75/25 (stratified, fixed seed)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int = 0) -> Digits:
    """Loads scikit-learn's 8x8 digits (shipped with scikit-learn: nothing downloads)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    return Digits(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


def initial_weights(seed: int = 0) -> list[np.ndarray]:
    """Glorot-uniform weights and zero biases, float64."""
    rng = np.random.default_rng(seed)
    params = []
    for shape in PARAM_SHAPES:
        if len(shape) == 2:
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            params.append(rng.uniform(-limit, limit, size=shape))
        else:
            params.append(np.zeros(shape))
    return params


def batches(num_examples: int, batch_size: int, steps: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Index arrays of ``steps`` minibatches: epochs of a fixed random permutation order."""
    rng = np.random.default_rng(seed)
    produced = 0
    while True:
        order = rng.permutation(num_examples)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            if produced == steps:
                return
            yield order[start : start + batch_size]
            produced += 1


def numpy_loss_and_grads(
    params: list[np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, list[np.ndarray]]:
    """Mean softmax cross-entropy of the MLP and its gradients, by hand, in float64."""
    w1, b1, w2, b2 = (np.asarray(p, dtype=np.float64) for p in params)
    hidden = np.tanh(x @ w1 + b1)
    logits = hidden @ w2 + b2
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = x.shape[0]
    loss = float(-log_probs[np.arange(n), y].mean())
    d_logits = np.exp(log_probs)
    d_logits[np.arange(n), y] -= 1.0
    d_logits /= n
    d_hidden = (d_logits @ w2.T) * (1.0 - hidden**2)
    return loss, [x.T @ d_hidden, d_hidden.sum(axis=0), hidden.T @ d_logits, d_logits.sum(axis=0)]


def accuracy(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Share of correct predictions of the MLP with ``params``."""
    w1, b1, w2, b2 = (np.asarray(p, dtype=np.float64) for p in params)
    logits = np.tanh(x @ w1 + b1) @ w2 + b2
    return float(np.mean(np.argmax(logits, axis=1) == y))
