"""The tasks of the convergence benchmark: the data splits and the models.

The splits and :func:`mlp` are shared with the large-batch benchmark
(``benchmarks.large_batch``), which loads its own sizes of the same data sets.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from benchmarks._mnist1d import make_mnist1d

__all__ = [
    "BATCH_SIZE",
    "SPLIT_SEED",
    "TASKS",
    "Split",
    "Task",
    "as_split",
    "digits_cnn",
    "mlp",
    "quick_task",
]

BATCH_SIZE = 64
"""The minibatch size of every method on every task."""
SPLIT_SEED = 0
"""Seeds the train/validation/test splits, which are the same for every run."""
QUICK_EPOCHS = 4


@dataclass(frozen=True)
class Split:
    """Float32 inputs (flat) and int64 labels of the training, validation and test splits."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class Task:
    """A data set, a model and the budget every method gets on it."""

    name: str
    title: str
    load: Callable[[], Split]
    build_model: Callable[[], nn.Module]
    epochs: int
    max_norms: tuple[float, ...]
    """The ``max_norm`` grid of ALI-G + max_norm (radius of the ball on all parameters):
    1.5 and 3 times the norm of the initial parameters (seed 0), rounded."""
    convex: bool = False
    jax_compatible: bool = True
    """The model is a stack of ``nn.Linear`` and ``nn.ReLU``, which the JAX runner mirrors."""


def quick_task(task: Task) -> Task:
    """The task with the quick mode's epoch budget."""
    return dataclasses.replace(task, epochs=QUICK_EPOCHS)


def _three_way_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, val_fraction: float
) -> tuple[np.ndarray, ...]:
    """Stratified train/validation/test split (validation carved from the training part)."""
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=SPLIT_SEED, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction, random_state=SPLIT_SEED, stratify=y_rest
    )
    return x_train, y_train, x_val, y_val, x_test, y_test


def as_split(arrays: Sequence[np.ndarray], standardize: bool) -> Split:
    """Converts six arrays (x_train, y_train, x_val, y_val, x_test, y_test) to a
    :class:`Split`, optionally standardizing the inputs with the training statistics."""
    x_train, y_train, x_val, y_val, x_test, y_test = arrays
    if standardize:
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)
        x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))

    def inputs(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    return Split(
        inputs(x_train), labels(y_train), inputs(x_val), labels(y_val), inputs(x_test),
        labels(y_test),
    )  # fmt: skip


def load_digits_split() -> Split:
    """Digits scaled to [0, 1]: 1149 train, 288 validation, 360 test (stratified)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    arrays = _three_way_split(digits.data / 16.0, digits.target, 0.2, 0.2)
    return as_split(arrays, standardize=False)


def load_mnist1d_split() -> Split:
    """MNIST-1D (seed 42), standardized: 3200 train, 800 validation, 1000 test."""
    from sklearn.model_selection import train_test_split

    data = make_mnist1d(seed=42)
    x_train, x_val, y_train, y_val = train_test_split(
        data.x_train, data.y_train, test_size=0.2, random_state=SPLIT_SEED, stratify=data.y_train
    )
    return as_split((x_train, y_train, x_val, y_val, data.x_test, data.y_test), standardize=True)


def load_breast_cancer_split() -> Split:
    """Breast cancer (30 features), standardized: 364 train, 91 validation, 114 test."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    arrays = _three_way_split(data.data, data.target, 0.2, 0.2)
    return as_split(arrays, standardize=True)


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def digits_cnn() -> nn.Sequential:
    """Conv 3x3 (16) - ReLU - conv 3x3 (32) - ReLU - max-pool 2 - linear 512-10, on 1x8x8."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("digits_mlp", "digits, MLP 64-128-128-10", load_digits_split,
             lambda: mlp((64, 128, 128, 10)), epochs=30, max_norms=(14.0, 28.0)),
        Task("digits_cnn", "digits, CNN (conv16-conv32-pool-linear)", load_digits_split,
             digits_cnn, epochs=30, max_norms=(7.0, 14.0), jax_compatible=False),
        Task("mnist1d_mlp", "MNIST-1D, MLP 40-100-100-10", load_mnist1d_split,
             lambda: mlp((40, 100, 100, 10)), epochs=30, max_norms=(13.0, 25.0)),
        Task("breast_cancer_logreg", "breast cancer, logistic regression (convex)",
             load_breast_cancer_split, lambda: mlp((30, 2)), epochs=30, max_norms=(1.2, 2.4),
             convex=True),
    )
}  # fmt: skip
