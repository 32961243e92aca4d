"""The training loops of the convergence benchmark: one run, one grid, the selection.

A run trains a task's model with one method at one grid point from one seed (the seed
fixes the initial weights and the minibatch order) and records, per epoch, the training
loss over the whole training split and the validation and test accuracies (index 0:
before training). The ``"torch"`` methods run :func:`train_torch`; the ``"jax"`` ones
:func:`train_jax`, on a JAX mirror of the torch model built from the same seed.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alig_torch import AliG
from benchmarks.convergence.methods import Hyperparameters, JaxBuild, Method, TorchBuild
from benchmarks.convergence.tasks import BATCH_SIZE, Split, Task

__all__ = [
    "GridPoint",
    "RunResult",
    "nanmax",
    "run_method",
    "select_best",
    "train_jax",
    "train_torch",
]


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
    hyperparameters: Hyperparameters
    runs: list[RunResult] = field(default_factory=list)

    @property
    def best_val_accuracies(self) -> list[float]:
        return [nanmax(run.val_accuracy[1:]) for run in self.runs]

    @property
    def mean_best_val_accuracy(self) -> float:
        return float(np.mean(self.best_val_accuracies))

    @property
    def any_diverged(self) -> bool:
        return any(run.diverged for run in self.runs)

    def describe(self) -> str:
        """The hyperparameters as ``name=value`` pairs."""
        return ", ".join(f"{k}={_format_value(v)}" for k, v in self.hyperparameters.items())


def nanmax(values: Sequence[float]) -> float:
    """The largest finite value (NaN if none)."""
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


def _epochs(
    task: Task,
    train_one_epoch: Callable[[], None],
    measure: Callable[[], tuple[float, float, float]],
    start: float,
) -> RunResult:
    """Measures, then trains ``task.epochs`` epochs, measuring after each, until the training
    loss is not finite (a divergence: the rest of the curves is NaN)."""
    curves: tuple[list[float], ...] = tuple([value] for value in measure())
    diverged = False
    for _ in range(task.epochs):
        train_one_epoch()
        epoch = measure()
        if not math.isfinite(epoch[0]):
            diverged = True
            break
        for curve, value in zip(curves, epoch, strict=True):
            curve.append(value)
    nan_tail = [float("nan")] * (task.epochs + 1 - len(curves[0]))
    train_loss, val_accuracy, test_accuracy = (curve + nan_tail for curve in curves)
    return RunResult(
        train_loss=train_loss,
        val_accuracy=val_accuracy,
        test_accuracy=test_accuracy,
        seconds=time.perf_counter() - start,
        diverged=diverged,
    )


def train_torch(
    task: Task,
    split: Split,
    method: Method,
    hyperparameters: Hyperparameters,
    seed: int,
    record_gamma: bool,
) -> RunResult:
    """Trains ``task``'s model with ``method`` from ``seed`` (initial weights, batch order)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = task.build_model()
    build: TorchBuild = method.build  # type: ignore[assignment]
    optimizer, scheduler = build(hyperparameters, list(model.parameters()), task.epochs)
    is_alig = isinstance(optimizer, AliG)
    batch_rng = np.random.default_rng([seed, 1])
    gammas: list[float] | None = [] if (record_gamma and is_alig) else None

    def train_one_epoch() -> None:
        model.train()
        for index in epoch_batches(len(split.y_train), batch_rng):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(split.x_train[index]), split.y_train[index])
            loss.backward()
            method.step(optimizer, loss)
            if gammas is not None:
                gammas.append(float(optimizer.gamma))  # type: ignore[attr-defined]
        if scheduler is not None:
            scheduler.step()

    def measure() -> tuple[float, float, float]:
        model.eval()
        return evaluate(model, split)

    result = _epochs(task, train_one_epoch, measure, start)
    result.gammas = gammas
    result.steps_skipped = int(optimizer.steps_skipped) if is_alig else 0  # type: ignore[attr-defined]
    return result


@functools.cache
def _jax_functions(build: JaxBuild) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The jitted training step of ``build``'s optimizer and the metrics of the JAX MLP.

    The grid point is an argument of the step, not a constant, so that every grid point
    reuses the same compiled step (``optax.polyak_sgd``'s state does not depend on its cap:
    both of its transformations are stateless).
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
        params: Any, state: Any, x: jax.Array, y: jax.Array, hyperparameters: Any
    ) -> tuple[Any, Any]:
        loss, grads = jax.value_and_grad(loss_of)(params, x, y)
        updates, state = build(hyperparameters).update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def metrics(params: Any, *split: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x_train, y_train, x_val, y_val, x_test, y_test = split
        train_loss = loss_of(params, x_train, y_train)
        val_accuracy = jnp.mean(jnp.argmax(logits_of(params, x_val), 1) == y_val)
        test_accuracy = jnp.mean(jnp.argmax(logits_of(params, x_test), 1) == y_test)
        return train_loss, val_accuracy, test_accuracy

    return train_step, metrics


def train_jax(
    task: Task, split: Split, method: Method, hyperparameters: Hyperparameters, seed: int
) -> RunResult:
    """``method`` (optax) on a JAX mirror of ``task``'s MLP, from torch's initial weights.

    The model is rebuilt with ``jax.numpy`` from the ``nn.Linear`` layers of the torch
    model built from the same seed, and the minibatches come in the same order as in
    :func:`train_torch`, so the runs differ from the torch ones by the optimizer alone.
    """
    import jax.numpy as jnp

    start = time.perf_counter()
    build: JaxBuild = method.build  # type: ignore[assignment]
    train_step, metrics = _jax_functions(build)
    torch.manual_seed(seed)
    torch_model = task.build_model()
    params = [
        (jnp.asarray(layer.weight.detach().numpy().T), jnp.asarray(layer.bias.detach().numpy()))
        for layer in torch_model.modules()
        if isinstance(layer, nn.Linear)
    ]
    scalars = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in hyperparameters.items()}
    state = build(scalars).init(params)
    arrays = tuple(
        jnp.asarray(t.numpy())
        for t in (
            split.x_train, split.y_train, split.x_val, split.y_val, split.x_test, split.y_test
        )
    )  # fmt: skip
    x_train, y_train = arrays[0], arrays[1]
    batch_rng = np.random.default_rng([seed, 1])
    carry = [params, state]

    def train_one_epoch() -> None:
        for index in epoch_batches(len(split.y_train), batch_rng):
            index_array = jnp.asarray(index.numpy())
            carry[:] = train_step(*carry, x_train[index_array], y_train[index_array], scalars)

    def measure() -> tuple[float, float, float]:
        train_loss, val_accuracy, test_accuracy = metrics(carry[0], *arrays)
        return float(train_loss), float(val_accuracy), float(test_accuracy)

    return _epochs(task, train_one_epoch, measure, start)


def run_method(
    task: Task, split: Split, method: Method, seeds: Sequence[int], quick: bool
) -> list[GridPoint]:
    """Trains every grid point of ``method`` on ``task`` from every seed."""
    points = []
    for hyperparameters in method.grid(task, quick):
        point = GridPoint(method.name, hyperparameters)
        for seed in seeds:
            if method.framework == "jax":
                run = train_jax(task, split, method, hyperparameters, seed)
            else:
                record = seed == seeds[0] and method.records_gamma
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
