"""ALI-G's NumPy oracle trains a softmax regression on scikit-learn's digits (no download).

Prints, per epoch: the mean training loss, train and test accuracy, and the step size
(mean gamma over the epoch, share of steps at the cap). Run: ``python benchmarks/oracle_demo.py``.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from alig_core import AliGConfig
from alig_core.oracle import OracleState, oracle_step


def softmax_cross_entropy(
    weights: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy of a linear softmax model and its gradients."""
    logits = x @ weights + bias
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = float(-np.mean(np.log(probs[np.arange(n), y] + 1e-300)))
    probs[np.arange(n), y] -= 1.0
    return loss, x.T @ probs / n, probs.mean(axis=0)


def accuracy(weights: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(x @ weights + bias, axis=1) == y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-lr", type=float, default=1.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    digits = load_digits()
    x = digits.data / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=args.seed, stratify=digits.target
    )
    rng = np.random.default_rng(args.seed)
    params = [np.zeros((64, 10)), np.zeros(10)]
    config = AliGConfig(max_lr=args.max_lr, momentum=args.momentum)
    state = OracleState.zeros(len(params))
    print(f"ALI-G oracle (NumPy float64), softmax regression on load_digits, {config}")
    print(
        f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'test acc':>8} "
        f"{'mean gamma':>10} {'at cap':>6}"
    )
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        losses, gammas, capped = [], [], []
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            loss, grad_w, grad_b = softmax_cross_entropy(*params, x_train[batch], y_train[batch])
            params, state = oracle_step(params, [grad_w, grad_b], loss, state, config)
            losses.append(loss)
            gammas.append(state.gamma)
            capped.append(state.capped)
        print(
            f"{epoch:>5} {np.mean(losses):>10.4f} {accuracy(*params, x_train, y_train):>9.3f} "
            f"{accuracy(*params, x_test, y_test):>8.3f} {np.mean(gammas):>10.4f} "
            f"{np.mean(capped):>6.0%}"
        )


if __name__ == "__main__":
    main()
