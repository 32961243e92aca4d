"""Convergence benchmark: ALI-G against tuned SGD, Adam and two other Polyak-step optimizers.

Four small offline tasks (nothing is downloaded):

* ``digits_mlp``: scikit-learn's 8x8 digits, an MLP 64-128-128-10;
* ``digits_cnn``: the same digits as 1x8x8 images, a small CNN (two 3x3 convolutions);
* ``mnist1d_mlp``: MNIST-1D generated procedurally (``_mnist1d.py``), an MLP 40-100-100-10;
* ``breast_cancer_logreg``: scikit-learn's breast cancer data, logistic regression (a
  linear layer with softmax cross-entropy over the two classes: the convex case).

Every method gets the same epoch budget and batch size on a task, and a small grid of
hyperparameters (learning rates in powers of ten, times weight decay or ``max_norm``
where the method has one), each grid point trained from the same seeds. Per method, the
grid point with the highest *validation* accuracy (the best epoch of each seed, averaged
over seeds; the validation split is carved from the training data, so the test split
plays no part in the choice) is reported; grid points where a seed diverged (non-finite
training loss) are not eligible unless every grid point diverged.

Methods: ALI-G (``alig_torch.AliG``, momentum 0.9, with and without ``max_norm``), SGD with
Nesterov momentum 0.9 at a constant rate and with a step schedule (x0.1 at 50% and 75% of
the epochs), each with weight decay from {0, 5e-4}, Adam, ``pytorch_optimizer.AliG``
(momentum 0.9), and with ``--with-jax`` ``optax.polyak_sgd`` (plain JAX and optax, the
MLP and linear models only, initialised with the same weights as torch's).

Run: ``python benchmarks/convergence.py [--quick] [--with-jax] [--seeds N]
[--tasks name,...] [--out-dir DIR] [--threads N]``. Writes ``results.md``,
``results.json`` and the figures to ``--out-dir`` (default ``benchmarks/convergence``)
and prints the summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alig_torch import AliG, project_onto_ball
from benchmarks._mnist1d import make_mnist1d

HERE = Path(__file__).parent
DEFAULT_OUT_DIR = HERE / "convergence"
BATCH_SIZE = 64
MOMENTUM = 0.9
SPLIT_SEED = 0
"""Seeds the train/validation/test splits, which are the same for every run."""

ALIG = "ALI-G"
ALIG_MAX_NORM = "ALI-G + max_norm"
SGD_CONSTANT = "SGD Nesterov, constant"
SGD_STEP = "SGD Nesterov, step"
ADAM = "Adam"
PO_ALIG = "pytorch_optimizer.AliG"
OPTAX_POLYAK = "optax.polyak_sgd"
TORCH_METHODS = (ALIG, ALIG_MAX_NORM, SGD_CONSTANT, SGD_STEP, ADAM, PO_ALIG)
LR_KEY = {
    ALIG: "max_lr",
    ALIG_MAX_NORM: "max_lr",
    SGD_CONSTANT: "lr",
    SGD_STEP: "lr",
    ADAM: "lr",
    PO_ALIG: "max_lr",
    OPTAX_POLYAK: "max_lr",
}
"""The name of each method's learning rate (a cap for the Polyak methods)."""

FULL_LRS = {
    ALIG: (1e-2, 1e-1, 1.0, 10.0),
    ALIG_MAX_NORM: (1e-2, 1e-1, 1.0, 10.0),
    SGD_CONSTANT: (1e-3, 1e-2, 1e-1, 1.0),
    SGD_STEP: (1e-3, 1e-2, 1e-1, 1.0),
    ADAM: (1e-4, 1e-3, 1e-2, 1e-1),
    PO_ALIG: (1e-2, 1e-1, 1.0, 10.0),
    OPTAX_POLYAK: (1e-2, 1e-1, 1.0, 10.0),
}
QUICK_LRS = {
    ALIG: (1e-1, 1.0),
    ALIG_MAX_NORM: (1e-1, 1.0),
    SGD_CONSTANT: (1e-2, 1e-1),
    SGD_STEP: (1e-2, 1e-1),
    ADAM: (1e-3, 1e-2),
    PO_ALIG: (1e-1, 1.0),
    OPTAX_POLYAK: (1e-1, 1.0),
}
FULL_WEIGHT_DECAYS = (0.0, 5e-4)
QUICK_WEIGHT_DECAYS = (0.0,)


# ---------------------------------------------------------------------------- the tasks


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


def _as_split(arrays: Sequence[np.ndarray], standardize: bool) -> Split:
    """Converts six arrays to a :class:`Split`, optionally standardizing with train stats."""
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
    return _as_split(arrays, standardize=False)


def load_mnist1d_split() -> Split:
    """MNIST-1D (seed 42), standardized: 3200 train, 800 validation, 1000 test."""
    from sklearn.model_selection import train_test_split

    data = make_mnist1d(seed=42)
    x_train, x_val, y_train, y_val = train_test_split(
        data.x_train, data.y_train, test_size=0.2, random_state=SPLIT_SEED, stratify=data.y_train
    )
    return _as_split((x_train, y_train, x_val, y_val, data.x_test, data.y_test), standardize=True)


def load_breast_cancer_split() -> Split:
    """Breast cancer (30 features), standardized: 364 train, 91 validation, 114 test."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    arrays = _three_way_split(data.data, data.target, 0.2, 0.2)
    return _as_split(arrays, standardize=True)


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
        Task(
            "digits_mlp",
            "digits, MLP 64-128-128-10",
            load_digits_split,
            lambda: mlp((64, 128, 128, 10)),
            epochs=30,
            max_norms=(14.0, 28.0),
        ),
        Task(
            "digits_cnn",
            "digits, CNN (conv16-conv32-pool-linear)",
            load_digits_split,
            digits_cnn,
            epochs=30,
            max_norms=(7.0, 14.0),
            jax_compatible=False,
        ),
        Task(
            "mnist1d_mlp",
            "MNIST-1D, MLP 40-100-100-10",
            load_mnist1d_split,
            lambda: mlp((40, 100, 100, 10)),
            epochs=30,
            max_norms=(13.0, 25.0),
        ),
        Task(
            "breast_cancer_logreg",
            "breast cancer, logistic regression (convex)",
            load_breast_cancer_split,
            lambda: mlp((30, 2)),
            epochs=30,
            max_norms=(1.2, 2.4),
            convex=True,
        ),
    )
}


# ---------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """The per-epoch record of one training run (index 0: before training)."""

    train_loss: list[float]
    """Mean cross-entropy over the whole training split, after each epoch."""
    val_accuracy: list[float]
    test_accuracy: list[float]
    seconds: float
    diverged: bool
    gammas: list[float] | None = None
    """ALI-G's step size at every step (seed 0 of the ALI-G methods only)."""
    steps_skipped: int = 0


@dataclass
class GridPoint:
    """One hyperparameter setting of one method on one task, with a run per seed."""

    method: str
    hyperparameters: dict[str, float | None]
    runs: list[RunResult] = field(default_factory=list)

    @property
    def best_val_accuracies(self) -> list[float]:
        return [_nanmax(run.val_accuracy[1:]) for run in self.runs]

    @property
    def mean_best_val_accuracy(self) -> float:
        return float(np.mean(self.best_val_accuracies))

    @property
    def any_diverged(self) -> bool:
        return any(run.diverged for run in self.runs)

    def describe(self) -> str:
        """The hyperparameters as ``name=value`` pairs."""
        return ", ".join(f"{k}={_format_value(v)}" for k, v in self.hyperparameters.items())


def _nanmax(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else float("nan")


def _format_value(value: float | None) -> str:
    if value is None:
        return "None"
    return f"{value:g}"


def epoch_batches(num_examples: int, rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of one epoch: a fresh permutation, cut into ``BATCH_SIZE`` pieces."""
    order = torch.from_numpy(rng.permutation(num_examples))
    yield from torch.split(order, BATCH_SIZE)


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float, float]:
    """Training loss (mean over the split), validation and test accuracy."""
    train_loss = float(F.cross_entropy(model(split.x_train), split.y_train))
    val_accuracy = float((model(split.x_val).argmax(1) == split.y_val).float().mean())
    test_accuracy = float((model(split.x_test).argmax(1) == split.y_test).float().mean())
    return train_loss, val_accuracy, test_accuracy


def build_torch_optimizer(
    method: str, hyperparameters: dict[str, Any], model: nn.Module, epochs: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer (and the per-epoch LR scheduler, if any) of ``method``."""
    params = list(model.parameters())
    if method in (ALIG, ALIG_MAX_NORM):
        max_norm = hyperparameters.get("max_norm")
        if max_norm is not None:
            project_onto_ball(params, max_norm)
        optimizer = AliG(
            params, max_lr=hyperparameters["max_lr"], momentum=MOMENTUM, max_norm=max_norm
        )
        return optimizer, None
    if method in (SGD_CONSTANT, SGD_STEP):
        optimizer = torch.optim.SGD(
            params,
            lr=hyperparameters["lr"],
            momentum=MOMENTUM,
            nesterov=True,
            weight_decay=hyperparameters["weight_decay"],
        )
        if method == SGD_CONSTANT:
            return optimizer, None
        milestones = [epochs // 2, (3 * epochs) // 4]
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)
    if method == ADAM:
        return torch.optim.Adam(params, lr=hyperparameters["lr"]), None
    if method == PO_ALIG:
        from pytorch_optimizer import AliG as PoAliG

        return PoAliG(params, max_lr=hyperparameters["max_lr"], momentum=MOMENTUM), None
    raise ValueError(f"unknown torch method {method!r}")


def train_torch(
    task: Task,
    split: Split,
    method: str,
    hyperparameters: dict[str, Any],
    seed: int,
    record_gamma: bool,
) -> RunResult:
    """Trains ``task``'s model with ``method`` from ``seed`` (initial weights, batch order)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = task.build_model()
    optimizer, scheduler = build_torch_optimizer(method, hyperparameters, model, task.epochs)
    is_alig = isinstance(optimizer, AliG)
    batch_rng = np.random.default_rng([seed, 1])
    gammas: list[float] | None = [] if (record_gamma and is_alig) else None
    train_loss, val_accuracy, test_accuracy = ([value] for value in evaluate(model, split))
    diverged = False
    for _ in range(task.epochs):
        model.train()
        for index in epoch_batches(len(split.y_train), batch_rng):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(split.x_train[index]), split.y_train[index])
            loss.backward()
            if is_alig:
                optimizer.step(loss=loss)
                if gammas is not None:
                    gammas.append(float(optimizer.gamma))
            elif method == PO_ALIG:
                loss_value = float(loss.detach())
                optimizer.step(lambda value=loss_value: value)
            else:
                optimizer.step()
        if scheduler is not None:
            scheduler.step()
        model.eval()
        epoch_loss, epoch_val, epoch_test = evaluate(model, split)
        if not math.isfinite(epoch_loss):
            diverged = True
            break
        train_loss.append(epoch_loss)
        val_accuracy.append(epoch_val)
        test_accuracy.append(epoch_test)
    missing = task.epochs + 1 - len(train_loss)
    nan_tail = [float("nan")] * missing
    return RunResult(
        train_loss=train_loss + nan_tail,
        val_accuracy=val_accuracy + nan_tail,
        test_accuracy=test_accuracy + nan_tail,
        seconds=time.perf_counter() - start,
        diverged=diverged,
        gammas=gammas,
        steps_skipped=int(optimizer.steps_skipped) if is_alig else 0,
    )


@functools.cache
def _jax_functions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The jitted training step and metrics of the JAX MLP (compiled once per shape).

    The cap ``max_lr`` is an argument of the step, not a constant, so that every grid
    point reuses the same compiled step; ``optax.polyak_sgd``'s state does not depend on
    it (both of its transformations are stateless).
    """
    import jax
    import jax.numpy as jnp
    import optax

    def logits_of(params: list[tuple[jax.Array, jax.Array]], x: jax.Array) -> jax.Array:
        for weight, bias in params[:-1]:
            x = jax.nn.relu(x @ weight + bias)
        weight, bias = params[-1]
        return x @ weight + bias

    def loss_of(params: list[tuple[jax.Array, jax.Array]], x: jax.Array, y: jax.Array) -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(logits_of(params, x), y).mean()

    @jax.jit
    def train_step(
        params: Any, state: Any, x: jax.Array, y: jax.Array, max_lr: jax.Array
    ) -> tuple[Any, Any]:
        loss, grads = jax.value_and_grad(loss_of)(params, x, y)
        optimizer = optax.polyak_sgd(max_learning_rate=max_lr, f_min=0.0)
        updates, state = optimizer.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def metrics(params: Any, *split: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x_train, y_train, x_val, y_val, x_test, y_test = split
        train_loss = loss_of(params, x_train, y_train)
        val_accuracy = jnp.mean(jnp.argmax(logits_of(params, x_val), 1) == y_val)
        test_accuracy = jnp.mean(jnp.argmax(logits_of(params, x_test), 1) == y_test)
        return train_loss, val_accuracy, test_accuracy

    return train_step, metrics


def train_optax_polyak(
    task: Task, split: Split, hyperparameters: dict[str, Any], seed: int
) -> RunResult:
    """``optax.polyak_sgd`` on a JAX mirror of ``task``'s MLP, from torch's initial weights.

    The model is rebuilt with ``jax.numpy`` from the ``nn.Linear`` layers of the torch
    model built from the same seed, and the minibatches come in the same order as in
    :func:`train_torch`, so the runs differ from the torch ones by the optimizer alone.
    """
    import jax.numpy as jnp
    import optax

    start = time.perf_counter()
    train_step, metrics = _jax_functions()
    torch.manual_seed(seed)
    torch_model = task.build_model()
    params = [
        (jnp.asarray(layer.weight.detach().numpy().T), jnp.asarray(layer.bias.detach().numpy()))
        for layer in torch_model.modules()
        if isinstance(layer, nn.Linear)
    ]
    state = optax.polyak_sgd(f_min=0.0).init(params)
    max_lr = jnp.asarray(hyperparameters["max_lr"], dtype=jnp.float32)
    arrays = tuple(
        jnp.asarray(t.numpy())
        for t in (
            split.x_train, split.y_train, split.x_val, split.y_val, split.x_test, split.y_test
        )
    )  # fmt: skip
    x_train, y_train = arrays[0], arrays[1]
    batch_rng = np.random.default_rng([seed, 1])
    train_loss, val_accuracy, test_accuracy = ([float(v)] for v in metrics(params, *arrays))
    diverged = False
    for _ in range(task.epochs):
        for index in epoch_batches(len(split.y_train), batch_rng):
            index_array = jnp.asarray(index.numpy())
            params, state = train_step(
                params, state, x_train[index_array], y_train[index_array], max_lr
            )
        epoch_loss, epoch_val, epoch_test = (float(v) for v in metrics(params, *arrays))
        if not math.isfinite(epoch_loss):
            diverged = True
            break
        train_loss.append(epoch_loss)
        val_accuracy.append(epoch_val)
        test_accuracy.append(epoch_test)
    nan_tail = [float("nan")] * (task.epochs + 1 - len(train_loss))
    return RunResult(
        train_loss=train_loss + nan_tail,
        val_accuracy=val_accuracy + nan_tail,
        test_accuracy=test_accuracy + nan_tail,
        seconds=time.perf_counter() - start,
        diverged=diverged,
    )


# ---------------------------------------------------------------------------- grids


def method_grid(method: str, task: Task, quick: bool) -> list[dict[str, float | None]]:
    """The hyperparameter settings searched for ``method`` on ``task``."""
    lrs = (QUICK_LRS if quick else FULL_LRS)[method]
    key = LR_KEY[method]
    if method in (SGD_CONSTANT, SGD_STEP):
        decays = QUICK_WEIGHT_DECAYS if quick else FULL_WEIGHT_DECAYS
        return [{key: lr, "weight_decay": decay} for lr in lrs for decay in decays]
    if method == ALIG_MAX_NORM:
        norms = task.max_norms[:1] if quick else task.max_norms
        return [{key: lr, "max_norm": norm} for lr in lrs for norm in norms]
    return [{key: lr} for lr in lrs]


def run_method(
    task: Task, split: Split, method: str, seeds: Sequence[int], quick: bool
) -> list[GridPoint]:
    """Trains every grid point of ``method`` on ``task`` from every seed."""
    points = []
    for hyperparameters in method_grid(method, task, quick):
        point = GridPoint(method, hyperparameters)
        for seed in seeds:
            if method == OPTAX_POLYAK:
                run = train_optax_polyak(task, split, hyperparameters, seed)
            else:
                record = seed == seeds[0] and method in (ALIG, ALIG_MAX_NORM)
                run = train_torch(task, split, method, hyperparameters, seed, record)
            point.runs.append(run)
        points.append(point)
    return points


def select_best(points: Sequence[GridPoint]) -> GridPoint:
    """The grid point of highest mean best-validation accuracy among those that never diverged.

    Ties go to the lower mean final training loss. If every grid point has a diverged
    seed, all are eligible.
    """
    eligible = [p for p in points if not p.any_diverged] or list(points)

    def key(point: GridPoint) -> tuple[float, float]:
        accuracy = point.mean_best_val_accuracy
        final_loss = float(np.mean([run.train_loss[-1] for run in point.runs]))
        return (
            accuracy if math.isfinite(accuracy) else -1.0,
            -final_loss if math.isfinite(final_loss) else -math.inf,
        )

    return max(eligible, key=key)


# ---------------------------------------------------------------------------- summaries


@dataclass
class Summary:
    """The reported numbers of one method on one task (its selected grid point)."""

    task: str
    method: str
    grid_points: int
    selected: str
    best_test_accuracy: tuple[float, float]
    """Mean and standard deviation over seeds of the best test accuracy over epochs."""
    test_accuracy_at_best_val: tuple[float, float]
    """Test accuracy at each seed's epoch of best validation accuracy (mean, std)."""
    final_train_loss: tuple[float, float]
    epochs_to_99: tuple[float, int]
    """Mean over seeds of the first epoch with test accuracy >= 99% of that seed's best;
    and the number of seeds in the mean."""
    seconds_per_run: float
    first_epoch_train_loss: float
    """Mean over seeds of the training loss after the first epoch (for the smoke test)."""
    last_epoch_train_loss: float
    diverged_grid_points: int


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(np.mean(array)), float(np.std(array))


def summarize(task: Task, method: str, points: Sequence[GridPoint]) -> Summary:
    """Selects the best grid point of ``method`` and computes its reported numbers."""
    best = select_best(points)
    best_tests, tests_at_val, epochs_to_99 = [], [], []
    for run in best.runs:
        test = np.asarray(run.test_accuracy, dtype=np.float64)
        val = np.asarray(run.val_accuracy, dtype=np.float64)
        best_test = float(np.nanmax(test[1:]))
        best_tests.append(best_test)
        tests_at_val.append(float(test[1 + int(np.nanargmax(val[1:]))]))
        reached = np.flatnonzero(np.nan_to_num(test[1:], nan=-1.0) >= 0.99 * best_test)
        epochs_to_99.append(float(reached[0] + 1))
    final_losses = [run.train_loss[-1] for run in best.runs]
    return Summary(
        task=task.name,
        method=method,
        grid_points=len(points),
        selected=best.describe(),
        best_test_accuracy=_mean_std(best_tests),
        test_accuracy_at_best_val=_mean_std(tests_at_val),
        final_train_loss=_mean_std(final_losses),
        epochs_to_99=(float(np.mean(epochs_to_99)), len(epochs_to_99)),
        seconds_per_run=float(np.mean([run.seconds for p in points for run in p.runs])),
        first_epoch_train_loss=float(np.mean([run.train_loss[1] for run in best.runs])),
        last_epoch_train_loss=float(np.mean(final_losses)),
        diverged_grid_points=sum(p.any_diverged for p in points),
    )


def _percent(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    if not math.isfinite(mean):
        return "diverged"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _loss(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.3g} ± {std:.2g}"


SUMMARY_HEADER = (
    "| method | grid | selected (by validation) | best test acc % | test acc % at best val "
    "| final train loss | epochs to 99% | s/run |\n"
    "|---|---:|---|---:|---:|---:|---:|---:|"
)


def summary_table(task: Task, summaries: Sequence[Summary]) -> str:
    """The markdown table of one task."""
    lines = [f"**{task.title}** ({task.epochs} epochs, batch {BATCH_SIZE})", "", SUMMARY_HEADER]
    for s in summaries:
        diverged = f" ({s.diverged_grid_points} diverged)" if s.diverged_grid_points else ""
        lines.append(
            f"| {s.method} | {s.grid_points}{diverged} | {s.selected} "
            f"| {_percent(s.best_test_accuracy)} | {_percent(s.test_accuracy_at_best_val)} "
            f"| {_loss(s.final_train_loss)} | {s.epochs_to_99[0]:.1f} "
            f"| {s.seconds_per_run:.1f} |"
        )
    return "\n".join(lines)


def sensitivity_table(task: Task, points_by_method: dict[str, list[GridPoint]]) -> str:
    """Mean best validation accuracy per learning rate (best over the other hyperparameters)."""
    rates = sorted({p.hyperparameters[LR_KEY[m]] for m, ps in points_by_method.items() for p in ps})
    header = "| method | " + " | ".join(f"{r:g}" for r in rates) + " |"
    lines = [
        f"**{task.title}**: mean best validation accuracy % per lr (max_lr for the Polyak "
        "methods), best over the other hyperparameters",
        "",
        header,
    ]
    lines.append("|---|" + "---:|" * len(rates))
    for method, points in points_by_method.items():
        cells = []
        for rate in rates:
            at_rate = [p for p in points if p.hyperparameters[LR_KEY[method]] == rate]
            if not at_rate:
                cells.append("")
                continue
            best = max(at_rate, key=lambda p: _finite_or(p.mean_best_val_accuracy, -1.0))
            mark = "†" if best.any_diverged else ""
            cells.append(f"{100 * best.mean_best_val_accuracy:.1f}{mark}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(task: Task, points_by_method: dict[str, list[GridPoint]]) -> str:
    """Every grid point: mean best validation and test accuracy, mean final training loss."""
    lines = [
        f"**{task.title}**",
        "",
        "| method | hyperparameters | best val acc % | best test acc % | final train loss |",
        "|---|---|---:|---:|---:|",
    ]
    for method, points in points_by_method.items():
        for p in points:
            best_tests = [_nanmax(run.test_accuracy[1:]) for run in p.runs]
            final = float(np.mean([run.train_loss[-1] for run in p.runs]))
            diverged = " (diverged)" if p.any_diverged else ""
            lines.append(
                f"| {method} | {p.describe()}{diverged} | {100 * p.mean_best_val_accuracy:.1f} "
                f"| {100 * float(np.mean(best_tests)):.1f} | {final:.3g} |"
            )
    return "\n".join(lines)


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


# ---------------------------------------------------------------------------- figures


def plot_curves(task: Task, selected: dict[str, GridPoint], path: Path) -> None:
    """Training loss and test accuracy per epoch of each method's selected grid point."""
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for method, point in selected.items():
        losses = np.asarray([run.train_loss for run in point.runs])
        accuracies = 100 * np.asarray([run.test_accuracy for run in point.runs])
        epochs = np.arange(losses.shape[1])
        for axis, values in ((loss_axis, losses), (accuracy_axis, accuracies)):
            mean = np.nanmean(values, axis=0)
            (line,) = axis.plot(epochs, mean, label=f"{method} ({point.describe()})")
            if len(point.runs) > 1:
                axis.fill_between(
                    epochs,
                    np.nanmin(values, axis=0),
                    np.nanmax(values, axis=0),
                    color=line.get_color(),
                    alpha=0.15,
                )
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss (whole training split)")
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("test accuracy %")
    accuracy_axis.set_ylim(bottom=max(0.0, float(np.nanmin(
        [np.nanmax(100 * np.asarray(r.test_accuracy)) for p in selected.values() for r in p.runs]
    )) - 25.0))  # fmt: skip
    accuracy_axis.legend(fontsize=7, loc="lower right")
    figure.suptitle(f"{task.title}: selected grid point per method (mean over seeds, min-max)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_gammas(
    tasks: Sequence[Task], points: dict[str, dict[str, list[GridPoint]]], path: Path
) -> None:
    """ALI-G's step size gamma_t at every step (seed 0), one line per max_lr, per task."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for point in points[task.name].get(ALIG, []):
            gammas = point.runs[0].gammas
            if not gammas:
                continue
            (line,) = axis.plot(np.asarray(gammas), linewidth=0.6, label=point.describe())
            axis.axhline(point.hyperparameters["max_lr"], color=line.get_color(), ls=":", lw=0.8)
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_ylabel("gamma_t")
        axis.set_title(task.title, fontsize=8)
        axis.legend(fontsize=7)
    figure.suptitle("ALI-G (momentum 0.9, no max_norm), seed 0: step size per step; dotted: cap")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_sensitivity(
    tasks: Sequence[Task], points: dict[str, dict[str, list[GridPoint]]], path: Path
) -> None:
    """Mean best validation accuracy against the learning rate (or cap), per method."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for method, method_points in points[task.name].items():
            key = LR_KEY[method]
            rates = sorted({p.hyperparameters[key] for p in method_points})
            best = [
                max(
                    _finite_or(p.mean_best_val_accuracy, 0.0)
                    for p in method_points
                    if p.hyperparameters[key] == rate
                )
                for rate in rates
            ]
            axis.plot(rates, 100 * np.asarray(best), marker="o", label=method)
        axis.set_xscale("log")
        axis.set_xlabel("lr (max_lr for the Polyak methods)")
        axis.set_ylabel("mean best validation accuracy %")
        axis.set_title(task.title, fontsize=8)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid, 1 seed, 4 epochs (CI)")
    parser.add_argument("--with-jax", action="store_true", help="add optax.polyak_sgd rows")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick: 1)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: these models are too small to gain from more, "
        "and 2 threads on a busy 2-core machine ran several times slower)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the process exit code."""
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    num_seeds = args.seeds or (1 if args.quick else 3)
    seeds = list(range(num_seeds))
    tasks = [TASKS[name] for name in args.tasks.split(",") if name]
    if args.quick:
        tasks = [_quick_task(task) for task in tasks]
    methods = list(TORCH_METHODS) + ([OPTAX_POLYAK] if args.with_jax else [])
    args.out_dir.mkdir(parents=True, exist_ok=True)

    points: dict[str, dict[str, list[GridPoint]]] = {}
    summaries: dict[str, list[Summary]] = {}
    for task in tasks:
        split = task.load()
        points[task.name] = {}
        for method in methods:
            if method == OPTAX_POLYAK and not task.jax_compatible:
                continue
            method_start = time.perf_counter()
            points[task.name][method] = run_method(task, split, method, seeds, args.quick)
            print(
                f"{task.name:22s} {method:24s} {len(points[task.name][method])} grid points "
                f"x {num_seeds} seeds: {time.perf_counter() - method_start:6.1f} s",
                flush=True,
            )
        summaries[task.name] = [summarize(task, m, ps) for m, ps in points[task.name].items()]
        selected = {m: select_best(ps) for m, ps in points[task.name].items()}
        plot_curves(task, selected, args.out_dir / f"{task.name}.png")
    plot_gammas(tasks, points, args.out_dir / "gamma.png")
    plot_sensitivity(tasks, points, args.out_dir / "sensitivity.png")
    wall_seconds = time.perf_counter() - start

    command = "python benchmarks/convergence.py " + " ".join(argv or sys.argv[1:])
    tables = "\n\n".join(summary_table(t, summaries[t.name]) for t in tasks)
    print("\n" + tables + f"\n\nwall time: {wall_seconds:.0f} s")
    write_results(args, tasks, points, summaries, tables, command.strip(), wall_seconds)
    return 0


def _quick_task(task: Task) -> Task:
    """The task with the quick mode's epoch budget."""
    return dataclasses.replace(task, epochs=4)


def write_results(
    args: argparse.Namespace,
    tasks: Sequence[Task],
    points: dict[str, dict[str, list[GridPoint]]],
    summaries: dict[str, list[Summary]],
    tables: str,
    command: str,
    wall_seconds: float,
) -> None:
    """Writes ``results.md`` (every table) and ``results.json`` (summaries and curves)."""
    skipped = {
        f"{t.name} / {p.method} / {p.describe()}": run.steps_skipped
        for t in tasks
        for ps in points[t.name].values()
        for p in ps
        for run in p.runs
        if run.steps_skipped
    }
    sections = [
        "# Convergence benchmark results",
        "",
        f"Command: `{command}`; wall time {wall_seconds:.0f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s).",
        "",
        "## Selected grid point per method",
        "",
        tables,
        "",
        "## Sensitivity to the learning rate",
        "",
        "† : a seed diverged at that setting.",
        "",
        "\n\n".join(sensitivity_table(t, points[t.name]) for t in tasks),
        "",
        "## Every grid point",
        "",
        "\n\n".join(grid_table(t, points[t.name]) for t in tasks),
        "",
        f"ALI-G steps skipped (non-finite loss or gradient): {skipped or 'none'}",
        "",
    ]
    (args.out_dir / "results.md").write_text("\n".join(sections), encoding="utf-8")
    payload = {
        "command": command,
        "wall_seconds": wall_seconds,
        "summaries": {name: [asdict(s) for s in rows] for name, rows in summaries.items()},
        "curves": {
            task: {
                method: {
                    "selected": select_best(ps).describe(),
                    "train_loss": [run.train_loss for run in select_best(ps).runs],
                    "test_accuracy": [run.test_accuracy for run in select_best(ps).runs],
                }
                for method, ps in by_method.items()
            }
            for task, by_method in points.items()
        },
        "convex_tasks": [t.name for t in tasks if t.convex],
    }
    (args.out_dir / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
