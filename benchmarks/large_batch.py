"""Large-batch benchmark: does extrapolation narrow the large-batch gap, and at what cost?

The question of Lin, Kong, Stich, Jaggi, "Extrapolation for Large-batch Training in Deep
Learning" (ICML 2020, arXiv:2006.05720), at a size a 2-core CPU runs: test accuracy
against the batch size, with the same epoch budget at every batch size (so a larger batch
makes fewer, larger steps), for Nesterov SGD under the large-batch recipe, EXTRAP-SGD
(``alig_torch.Extrapolation`` around it), the noise baseline, ALI-G and ALI-G with
extrapolation (linearised and plain). Two tasks, nothing downloaded:

* ``mnist1d``: MNIST-1D generated procedurally (``benchmarks/_mnist1d.py``, seed 42, 16384 training
  examples of which 2048 are held out for validation, 4000 test), MLP 40-100-100-10;
* ``digits``: scikit-learn's 8x8 digits (1024 train, 373 validation, 400 test), MLP
  64-128-10.

**The recipe** (every method): the step-size hyperparameter (SGD's ``lr``, ALI-G's cap
``max_lr``) is chosen at the base batch (32) on the validation split, then scaled
linearly with the batch (``x B / 32``) and warmed up linearly from the base value over the
first 15% of the steps (Goyal et al., 2017). The SGD methods also decay it x0.1 at 50% and
75% of the steps; the ALI-G methods keep the cap constant after the warm-up (ALI-G needs
no schedule, its paper says). EXTRAP-SGD's ``lr_x`` is its ``lr`` (the default, so it
follows the schedule); ALI-G's is its own step size at the anchor (the default).

**Cost**: every closure call (a forward and a backward pass on one minibatch) is counted.
Extrapolation in ``"gradient"`` mode makes two per iteration, so the same epoch budget
costs it twice the gradient evaluations; the ``half epochs`` rows give it half the epochs,
the same gradient evaluations as SGD (and half its updates). The control rows run the base
optimizer alone at the setting an extrapolated row chose, to tell the effect of the
extrapolation from that of the setting. The wall time of an iteration is timed apart,
interleaved (``time_iterations``).

Run: ``python -m benchmarks.large_batch [--quick] [--seeds N] [--tasks mnist1d,digits]
[--out-dir DIR] [--threads N]``. Writes ``results.md``, ``results.json`` and
``accuracy_vs_batch.png`` to ``--out-dir`` (default ``benchmarks/large_batch``) and prints
the tables. Fixed seeds, one torch thread by default: the runs are deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alig_torch import AliG, Extrapolation
from benchmarks._mnist1d import Mnist1dConfig, make_mnist1d
from benchmarks.convergence.tasks import Split, as_split, mlp
from benchmarks.convergence.training import evaluate

HERE = Path(__file__).parent
DEFAULT_OUT_DIR = HERE / "large_batch"
MOMENTUM = 0.9
BASE_BATCH = 32
"""The batch size at which every step size is chosen; the recipe scales it by B / 32."""
WARMUP_FRACTION = 0.15
"""The share of the steps over which the step size rises from its base to its scaled value."""
DECAY_AT = (0.5, 0.75)
"""Where the SGD methods' step size is multiplied by 0.1 (fractions of the steps)."""
SPLIT_SEED = 0
TIMING_ROUNDS = 7
"""Interleaved rounds of the separate per-iteration timing (the median is reported)."""
TUNE_SEED = 0
"""The seed whose runs at the base batch choose each method's setting (then reused)."""

Hyperparameters = dict[str, float]


# ---------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class Task:
    """A data set, a model, the batch sizes and the epoch budget every method gets."""

    name: str
    title: str
    load: Callable[[bool], Split]
    """Loads the splits; its argument asks for the quick mode's small subset."""
    sizes: tuple[int, ...]
    """The widths of the MLP's layers, input to output."""
    batch_sizes: tuple[int, ...]
    epochs: int
    lrs: tuple[float, ...]
    """The grid of SGD's base lr at batch 32 (set after a one-seed trial run, so that SGD's
    and ALI-G's choices fall inside their grids)."""
    caps: tuple[float, ...]
    """The grid of ALI-G's base cap max_lr at batch 32."""


def load_mnist1d(quick: bool) -> Split:
    """MNIST-1D (seed 42), standardized with the training statistics.

    Full: 14336 train (7 x 2048, so that every batch size divides it), 2048 validation,
    4000 test. Quick: 1024 / 512 / 512.
    """
    from sklearn.model_selection import train_test_split

    num_train, num_val, num_test = (1536, 512, 512) if quick else (16384, 2048, 4000)
    data = make_mnist1d(seed=42, config=Mnist1dConfig(num_train=num_train, num_test=num_test))
    x_train, x_val, y_train, y_val = train_test_split(
        data.x_train, data.y_train, test_size=num_val, random_state=SPLIT_SEED,
        stratify=data.y_train,
    )  # fmt: skip
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, data.x_test))
    return as_split((x_train, y_train, x_val, y_val, x_test, data.y_test), standardize=False)


def load_digits(quick: bool) -> Split:
    """Digits scaled to [0, 1], stratified: 1024 train, 373 validation, 400 test.

    Quick: 512 of the 1024 training examples.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x, y = digits.data / 16.0, digits.target
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=1024, random_state=SPLIT_SEED, stratify=y
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=400, random_state=SPLIT_SEED, stratify=y_rest
    )
    if quick:
        x_train, y_train = x_train[:512], y_train[:512]
    return as_split((x_train, y_train, x_val, y_val, x_test, y_test), standardize=False)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("mnist1d", "MNIST-1D, MLP 40-100-100-10", load_mnist1d, (40, 100, 100, 10),
             batch_sizes=(32, 128, 512, 2048), epochs=20, lrs=(0.01, 0.03, 0.1),
             caps=(0.01, 0.03, 0.1)),
        Task("digits", "digits, MLP 64-128-10", load_digits, (64, 128, 10),
             batch_sizes=(32, 128, 512, 1024), epochs=40, lrs=(0.03, 0.1, 0.3),
             caps=(0.1, 0.3, 1.0)),
    )
}  # fmt: skip


# ---------------------------------------------------------------------------- the methods


def nesterov_sgd(params: list[torch.Tensor], hp: Hyperparameters) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=hp["lr"], momentum=MOMENTUM, nesterov=True)


def alig(params: list[torch.Tensor], hp: Hyperparameters) -> AliG:
    return AliG(params, max_lr=hp["max_lr"], momentum=MOMENTUM)


FAMILIES = ("SGD", "ALI-G")
"""The base optimizers. The SGD family's step size decays x0.1 at ``DECAY_AT``; ALI-G's cap
stays constant after the warm-up (ALI-G needs no schedule, its paper says)."""


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: how to build its optimizer and how to choose its setting.

    The setting is chosen at the base batch (seed ``TUNE_SEED``, validation accuracy) over
    ``grid``, each grid point merged into the setting selected for ``inherits`` (when
    given); with ``inherits`` and an empty grid the inherited setting is used as is.
    """

    name: str
    family: str
    """``"SGD"`` or ``"ALI-G"``: the base optimizer, which sets the schedule."""
    build: Callable[[list[torch.Tensor], Hyperparameters, int], torch.optim.Optimizer]
    """The optimizer from the parameters, the setting (at the base batch) and the seed."""
    grid: Callable[[Task], Sequence[Hyperparameters]] = lambda task: ()
    inherits: str | None = None
    epoch_fraction: float = 1.0
    """The share of the task's epoch budget this row trains for."""
    role: str = "tuned"
    """``"tuned"`` (its own grid), ``"matched"`` (fewer epochs: the gradient evaluations of
    its base) or ``"control"`` (the base alone at an extrapolated row's setting)."""

    @property
    def decay(self) -> bool:
        """Whether the step size decays x0.1 at ``DECAY_AT`` (the SGD family)."""
        return self.family == "SGD"


def sgd_lrs(task: Task) -> list[Hyperparameters]:
    """SGD's grid: the task's base learning rates."""
    return [{"lr": lr} for lr in task.lrs]


def alig_caps(task: Task) -> list[Hyperparameters]:
    """ALI-G's grid: the task's base caps."""
    return [{"max_lr": cap} for cap in task.caps]


def sigmas(task: Task) -> list[Hyperparameters]:
    """The noise baseline's grid (the same on every task; not scaled with the batch)."""
    return [{"sigma": sigma} for sigma in (0.003, 0.01, 0.03)]


def extrap_sgd(params: list[torch.Tensor], hp: Hyperparameters, seed: int) -> Extrapolation:
    """EXTRAP-SGD: Nesterov SGD stepping with the gradient at ``w - lr * g(w)``."""
    return Extrapolation(nesterov_sgd(params, hp), mode="gradient")


def extrap_alig(params: list[torch.Tensor], hp: Hyperparameters, seed: int) -> Extrapolation:
    """ALI-G stepping with the gradient at ``w - gamma * g(w)``, its linearised step."""
    return Extrapolation(alig(params, hp), mode="gradient")


METHODS: tuple[Method, ...] = (
    Method("SGD", "SGD", lambda p, hp, seed: nesterov_sgd(p, hp), sgd_lrs),
    Method("EXTRAP-SGD", "SGD", extrap_sgd, sgd_lrs),
    Method("EXTRAP-SGD, half epochs", "SGD", extrap_sgd, inherits="EXTRAP-SGD",
           epoch_fraction=0.5, role="matched"),
    Method("SGD at EXTRAP-SGD's lr", "SGD", lambda p, hp, seed: nesterov_sgd(p, hp),
           inherits="EXTRAP-SGD", role="control"),
    Method(
        "SGD + noise",
        "SGD",
        lambda p, hp, seed: Extrapolation(
            nesterov_sgd(p, hp), mode="noise", sigma=hp["sigma"], seed=seed
        ),
        sigmas,
        inherits="SGD",
    ),
    Method("ALI-G", "ALI-G", lambda p, hp, seed: alig(p, hp), alig_caps),
    Method("ALI-G + extrap. (linearised)", "ALI-G", extrap_alig, alig_caps),
    Method("ALI-G + extrap. (linearised), half epochs", "ALI-G", extrap_alig,
           inherits="ALI-G + extrap. (linearised)", epoch_fraction=0.5, role="matched"),
    Method("ALI-G at the linearised row's cap", "ALI-G", lambda p, hp, seed: alig(p, hp),
           inherits="ALI-G + extrap. (linearised)", role="control"),
    Method(
        "ALI-G + extrap. (plain)",
        "ALI-G",
        lambda p, hp, seed: Extrapolation(alig(p, hp), mode="gradient", linearized=False),
        alig_caps,
    ),
)  # fmt: skip
"""The rows, in the order of the tables. A method is one entry; one it inherits from comes first.

The control rows run the base optimizer alone at the setting the extrapolated row chose,
so that a difference at large batches can be told apart from a difference of setting."""


def step_key(hp: Hyperparameters) -> str:
    """The name of the step-size hyperparameter the recipe scales (SGD's lr, ALI-G's cap)."""
    return "max_lr" if "max_lr" in hp else "lr"


def step_size_at(step: int, total_steps: int, base: float, scale: float, decay: bool) -> float:
    """The recipe's step size (lr or cap) at ``step`` of ``total_steps``.

    A linear warm-up from ``base`` (the value chosen at the base batch) to ``base * scale``
    over the first ``WARMUP_FRACTION`` of the steps, then ``base * scale``, times 0.1 after
    each of ``DECAY_AT`` where ``decay``. With ``scale = 1`` there is no warm-up to make.
    """
    peak = base * scale
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    value = base + (peak - base) * step / warmup if step < warmup else peak
    if decay:
        value *= 0.1 ** sum(step >= round(at * total_steps) for at in DECAY_AT)
    return value


# ---------------------------------------------------------------------------- one run


@dataclass
class Run:
    """The record of one training run (per-epoch lists: index 0 is before training)."""

    train_loss: list[float]
    """Mean cross-entropy over the whole training split."""
    val_accuracy: list[float]
    test_accuracy: list[float]
    seconds: float
    """Wall time of the training (the per-epoch evaluations excluded)."""
    backward_passes: int
    """Closure calls: forward and backward passes on one minibatch."""
    examples: int
    """Examples whose gradient was computed (the sum of the minibatch sizes of those calls)."""
    updates: int
    diverged: bool
    """The training loss became non-finite; training stopped and the last epoch repeats."""
    skipped: int = 0
    """Iterations skipped by the skip rule (a non-finite loss or gradient)."""
    capped_fraction: float | None = None
    """ALI-G: the share of its steps where the step size was the cap."""

    @property
    def best_val_epoch(self) -> int:
        """The epoch (1-based) of the best validation accuracy; the earliest on ties."""
        return 1 + int(np.argmax(np.asarray(self.val_accuracy[1:])))

    @property
    def test_at_best_val(self) -> float:
        return self.test_accuracy[self.best_val_epoch]


def _evaluate_at_anchor(model: nn.Module, split: Split, opt: torch.optim.Optimizer) -> Any:
    """Evaluates the iterate: the anchor where an Extrapolation's parameters hold ``w~``."""
    if isinstance(opt, Extrapolation):
        with opt.at_anchor():
            return evaluate(model, split)
    return evaluate(model, split)


def one_iteration(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    counts: dict[str, int],
) -> None:
    """One ``opt.step(closure)`` on the minibatch ``(x, y)``, counting the closure's calls.

    The closure runs once (SGD, ALI-G, ``"noise"`` mode) or twice (``"gradient"`` mode: at
    the anchor, then at the extrapolated point, on the same minibatch).
    """

    def closure() -> Any:  # returns the loss
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        counts["passes"] += 1
        counts["examples"] += len(y)
        return loss

    opt.step(closure)


def train(
    task: Task, split: Split, method: Method, hp: Hyperparameters, batch: int, seed: int
) -> Run:
    """Trains ``task``'s MLP with ``method`` at ``hp`` (the base-batch setting) and ``batch``.

    ``seed`` sets the initial weights, the minibatch order and the noise. Each epoch is a
    fresh permutation of the training split cut into ``n // batch`` minibatches of exactly
    ``batch`` examples (the remainder, if any, is left out of that epoch).
    """
    torch.manual_seed(seed)
    model = mlp(task.sizes)
    opt = method.build(list(model.parameters()), hp, seed)
    base = opt.base_optimizer if isinstance(opt, Extrapolation) else opt
    key = step_key(hp)
    epochs = max(1, round(task.epochs * method.epoch_fraction))
    num_train = len(split.y_train)
    per_epoch = num_train // batch
    if per_epoch == 0:
        raise ValueError(f"batch {batch} is larger than the {num_train} training examples")
    total_steps = epochs * per_epoch
    order_rng = np.random.default_rng([seed, 1])
    history = [[value] for value in evaluate(model, split)]
    counts = {"passes": 0, "examples": 0}
    capped = 0
    seconds = 0.0
    diverged = False
    step = 0
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        order = torch.from_numpy(order_rng.permutation(num_train))
        for index in order[: per_epoch * batch].view(per_epoch, batch):
            value = step_size_at(step, total_steps, hp[key], batch / BASE_BATCH, method.decay)
            for group in opt.param_groups:  # an Extrapolation shares its base's groups
                group["lr"] = value  # AliG keeps its cap max_lr in "lr"
            one_iteration(model, opt, split.x_train[index], split.y_train[index], counts)
            if isinstance(base, AliG) and base.capped is not None:
                capped += bool(base.capped)
            step += 1
        seconds += time.perf_counter() - start
        model.eval()
        values = _evaluate_at_anchor(model, split, opt)
        for record, v in zip(history, values, strict=True):
            record.append(v)
        if not math.isfinite(values[0]):
            diverged = True
            break
    for record in history:  # a diverged run keeps its last (non-finite) state to the end
        record.extend([record[-1]] * (epochs + 1 - len(record)))
    skipped = opt.iterations_skipped if isinstance(opt, Extrapolation) else 0
    if isinstance(base, AliG):
        skipped += int(base.steps_skipped or 0)
    return Run(
        train_loss=history[0],
        val_accuracy=history[1],
        test_accuracy=history[2],
        seconds=seconds,
        backward_passes=counts["passes"],
        examples=counts["examples"],
        updates=step,
        diverged=diverged,
        skipped=skipped,
        capped_fraction=capped / step if isinstance(base, AliG) and step else None,
    )


def time_iterations(
    task: Task,
    split: Split,
    settings: Sequence[tuple[Method, Hyperparameters]],
    batch: int,
    iterations: int,
    rounds: int,
) -> dict[str, float]:
    """Median milliseconds per iteration of each method, timed interleaved in this process.

    Every round runs each method once, in a fresh shuffled order (the machine is shared and
    noisy: what runs just before a row matters), from a fresh model, over the same
    ``iterations`` minibatches, at the base setting (the cost does not depend on it); the
    first 3 iterations of each are not timed.
    """
    rng = np.random.default_rng(0)
    num_train = len(split.y_train)
    batches = [torch.from_numpy(rng.permutation(num_train)[:batch]) for _ in range(iterations + 3)]
    samples: dict[str, list[float]] = {method.name: [] for method, _ in settings}
    for _ in range(rounds):
        for position in rng.permutation(len(settings)):
            method, hp = settings[position]
            torch.manual_seed(0)
            model = mlp(task.sizes)
            opt = method.build(list(model.parameters()), hp, 0)
            counts = {"passes": 0, "examples": 0}
            for index in batches[:3]:
                one_iteration(model, opt, split.x_train[index], split.y_train[index], counts)
            start = time.perf_counter()
            for index in batches[3:]:
                one_iteration(model, opt, split.x_train[index], split.y_train[index], counts)
            samples[method.name].append(1e3 * (time.perf_counter() - start) / iterations)
    return {name: float(np.median(values)) for name, values in samples.items()}


# ---------------------------------------------------------------------------- selection


@dataclass
class Candidate:
    """One grid point of a method, with its tuning run (base batch, seed ``TUNE_SEED``)."""

    hp: Hyperparameters
    run: Run


def select(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate of highest best-epoch validation accuracy (never the test split).

    A candidate whose run diverged is eligible only if all did; ties go to the lower final
    training loss.
    """
    eligible = [c for c in candidates if not c.run.diverged] or list(candidates)

    def key(candidate: Candidate) -> tuple[float, float]:
        loss = candidate.run.train_loss[-1]
        return max(candidate.run.val_accuracy[1:]), -loss if math.isfinite(loss) else -math.inf

    return max(eligible, key=key)


@dataclass
class MethodResult:
    """A method on a task: its grid, its selected setting, its runs per batch size."""

    method: str
    selected: Hyperparameters
    grid: list[Candidate] = field(default_factory=list)
    runs: dict[int, list[Run]] = field(default_factory=dict)
    """Per batch size, one run per seed (in the order of the seeds)."""


def run_task(
    task: Task,
    split: Split,
    methods: Sequence[Method],
    seeds: Sequence[int],
    quick: bool,
    log: Callable[[str], None],
) -> dict[str, MethodResult]:
    """Chooses every method's setting at the base batch, then runs it at every batch size."""
    results: dict[str, MethodResult] = {}
    for method in methods:
        start = time.perf_counter()
        inherited = results[method.inherits].selected if method.inherits else {}
        grid = list(method.grid(task))[-2:] if quick else method.grid(task)
        settings = [{**inherited, **point} for point in grid] or [dict(inherited)]
        candidates = [
            Candidate(hp, train(task, split, method, hp, BASE_BATCH, TUNE_SEED)) for hp in settings
        ]
        best = select(candidates)
        result = MethodResult(method.name, best.hp, candidates if len(candidates) > 1 else [])
        for batch in task.batch_sizes:
            result.runs[batch] = [
                best.run
                if (batch == BASE_BATCH and seed == TUNE_SEED)
                else train(task, split, method, best.hp, batch, seed)
                for seed in seeds
            ]
        results[method.name] = result
        log(
            f"{task.name:8s} {method.name:42s} {_describe(best.hp):22s} "
            f"{time.perf_counter() - start:6.1f} s"
        )
    return results


# ---------------------------------------------------------------------------- report


def _describe(hp: Hyperparameters) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in hp.items())


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(np.mean(array)), float(np.std(array))


def _cell(runs: Sequence[Run], final: bool) -> str:
    """Mean ± std test accuracy % over the seeds; † per diverged seed, s per skipping seed."""
    values = [run.test_accuracy[-1] if final else run.test_at_best_val for run in runs]
    mean, std = _mean_std(values)
    marks = "†" * sum(run.diverged for run in runs) + "s" * sum(bool(run.skipped) for run in runs)
    return f"{100 * mean:.1f} ± {100 * std:.1f}{marks}"


def _passes(result: MethodResult, split_size: int) -> str:
    """Gradient evaluations in passes over the training split (the same at every batch)."""
    per_batch = {
        round(run.examples / split_size, 2) for runs in result.runs.values() for run in runs
    }
    return "/".join(f"{p:g}" for p in sorted(per_batch))


def accuracy_table(
    task: Task, results: dict[str, MethodResult], split_size: int, final: bool
) -> str:
    """Method x batch size: test accuracy, the gradient evaluations and the drop."""
    first, last = task.batch_sizes[0], task.batch_sizes[-1]
    header = (
        "| method | selected at B=32 (validation) | grad evals (passes) | "
        + " | ".join(f"B={b}" for b in task.batch_sizes)
        + f" | drop {first}→{last} |"
    )
    lines = [header, "|---|---|---:|" + "---:|" * (len(task.batch_sizes) + 1)]
    for name, result in results.items():
        cells = [_cell(result.runs[b], final) for b in task.batch_sizes]
        accuracy = {
            b: np.mean([r.test_accuracy[-1] if final else r.test_at_best_val for r in runs])
            for b, runs in result.runs.items()
        }
        drop = 100 * (accuracy[first] - accuracy[last])
        lines.append(
            f"| {name} | {_describe(result.selected)} | {_passes(result, split_size)} | "
            + " | ".join(cells)
            + f" | {drop:.1f} |"
        )
    return "\n".join(lines)


def cost_table(task: Task, results: dict[str, MethodResult]) -> str:
    """Method x batch size: backward passes and updates per run, and wall seconds per run."""
    header = "| method | " + " | ".join(f"B={b}" for b in task.batch_sizes) + " | total s |"
    lines = [
        "backward passes / updates per run; training seconds per run (mean over seeds)",
        "",
        header,
        "|---|" + "---:|" * (len(task.batch_sizes) + 1),
    ]
    for name, result in results.items():
        cells = []
        for b in task.batch_sizes:
            run = result.runs[b][0]
            seconds = np.mean([r.seconds for r in result.runs[b]])
            cells.append(f"{run.backward_passes} / {run.updates}; {seconds:.2f} s")
        total = sum(r.seconds for runs in result.runs.values() for r in runs)
        total += sum(c.run.seconds for c in result.grid if c.hp != result.selected)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {total:.0f} |")
    return "\n".join(lines)


def grid_table(results: dict[str, MethodResult]) -> str:
    """Every grid point tried at the base batch: its best validation accuracy (seed 0)."""
    lines = ["| method | setting | best val acc % | final train loss |", "|---|---|---:|---:|"]
    for name, result in results.items():
        for c in result.grid:
            mark = " (selected)" if c.hp == result.selected else ""
            mark += " (diverged)" if c.run.diverged else ""
            lines.append(
                f"| {name} | {_describe(c.hp)}{mark} | {100 * max(c.run.val_accuracy[1:]):.1f} "
                f"| {c.run.train_loss[-1]:.3g} |"
            )
    return "\n".join(lines)


def alig_cap_table(task: Task, results: dict[str, MethodResult]) -> str:
    """The ALI-G rows: the share of the steps where the step size was the (scaled) cap."""
    header = "| method | " + " | ".join(f"B={b}" for b in task.batch_sizes) + " |"
    lines = [header, "|---|" + "---:|" * len(task.batch_sizes)]
    for name, result in results.items():
        fractions = [
            [r.capped_fraction for r in result.runs[b] if r.capped_fraction is not None]
            for b in task.batch_sizes
        ]
        if all(fractions):
            lines.append(
                f"| {name} | " + " | ".join(f"{100 * np.mean(f):.0f}%" for f in fractions) + " |"
            )
    return "\n".join(lines)


Timing = dict[int, dict[str, float]]
"""Per batch size, the median milliseconds per iteration of each method."""


def timing_table(timing: Timing) -> str:
    """Milliseconds per iteration, and the ratio to the method's base (SGD or ALI-G)."""
    batches = sorted(timing)
    families = {method.name: method.family for method in METHODS}
    header = "| method | " + " | ".join(f"ms/iteration B={b} | x base" for b in batches) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(batches)]
    for name in timing[batches[0]]:
        cells = []
        for b in batches:
            ms = timing[b][name]
            base = timing[b].get(families[name])
            cells.append(f"{ms:.2f} | {ms / base:.2f}x" if base else f"{ms:.2f} | ")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_report(
    task: Task, results: dict[str, MethodResult], split: Split, timing: Timing, rounds: int
) -> str:
    """The markdown section of one task: accuracy, cost, the ALI-G cap, timing, the grid."""
    size = len(split.y_train)
    return "\n".join(
        [
            f"### {task.title}",
            "",
            f"{task.epochs} epochs at every batch size (the half-epoch rows: "
            f"{round(task.epochs / 2)}), {size} training examples.",
            "",
            "Test accuracy % at each seed's epoch of best validation accuracy (mean ± std "
            "over the seeds):",
            "",
            accuracy_table(task, results, size, final=False),
            "",
            "Test accuracy % after the last epoch:",
            "",
            accuracy_table(task, results, size, final=True),
            "",
            cost_table(task, results),
            "",
            "ALI-G: share of the steps at the cap:",
            "",
            alig_cap_table(task, results),
            "",
            f"Wall time per iteration, timed apart from the runs (interleaved rounds: {rounds}, "
            "median; the base of a row is SGD or ALI-G):",
            "",
            timing_table(timing),
            "",
            "The grid at B=32 (seed 0):",
            "",
            grid_table(results),
        ]
    )


def plot(
    tasks: Sequence[Task], all_results: dict[str, dict[str, MethodResult]], path: Path
) -> None:
    """Test accuracy (best-validation epoch) against the batch size: a column per task, a
    row per family (SGD-based, ALI-G-based)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(FAMILIES), len(tasks), figsize=(6.2 * len(tasks), 4.2 * len(FAMILIES)), squeeze=False
    )
    linestyles = {"tuned": "-", "matched": "--", "control": ":"}
    by_name = {method.name: method for method in METHODS}
    for column, task in enumerate(tasks):
        for row, family in enumerate(FAMILIES):
            axis = axes[row][column]
            members = [n for n in all_results[task.name] if by_name[n].family == family]
            for index, name in enumerate(members):
                runs = all_results[task.name][name].runs
                values = 100 * np.asarray(
                    [[r.test_at_best_val for r in runs[b]] for b in task.batch_sizes]
                )
                axis.errorbar(
                    task.batch_sizes,
                    values.mean(axis=1),
                    yerr=values.std(axis=1),
                    color=f"C{index}",
                    linestyle=linestyles[by_name[name].role],
                    marker="os^vD"[index % 5],
                    markersize=4,
                    capsize=3,
                    label=name,
                )
            axis.set_xscale("log", base=2)
            axis.set_xticks(task.batch_sizes, [str(b) for b in task.batch_sizes])
            axis.set_ylim(0, 100)
            axis.set_xlabel("batch size (the same epoch budget at every size)")
            axis.set_ylabel("test accuracy % (best-validation epoch)")
            axis.set_title(f"{task.title}, {task.epochs} epochs: {family}-based", fontsize=10)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7, loc="best")
    figure.suptitle(
        "Step size (lr or ALI-G's cap) chosen at B=32, scaled x B/32, warmed up; mean ± std "
        "over seeds\ndashed: half the epochs (the gradient evaluations of the base); dotted: "
        "the base alone at the extrapolated row's setting",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI: a small subset, 2 batch sizes, 6 epochs, 2 grid points, 1 seed",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick: 1)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    return parser.parse_args(argv)


def _quick(task: Task) -> Task:
    return replace(task, batch_sizes=(BASE_BATCH, 256), epochs=6)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the process exit code."""
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    tasks = [TASKS[name] for name in args.tasks.split(",") if name]
    if args.quick:
        tasks = [_quick(task) for task in tasks]
    args.out_dir.mkdir(parents=True, exist_ok=True)

    all_results: dict[str, dict[str, MethodResult]] = {}
    timings: dict[str, Timing] = {}
    rounds = 1 if args.quick else TIMING_ROUNDS
    reports = []
    for task in tasks:
        split = task.load(args.quick)
        all_results[task.name] = run_task(
            task, split, METHODS, seeds, args.quick, lambda line: print(line, flush=True)
        )
        timed = [(m, all_results[task.name][m.name].selected) for m in METHODS if m.role == "tuned"]
        timings[task.name] = {
            batch: time_iterations(
                task,
                split,
                timed,
                batch,
                iterations=(10 if args.quick else max(20, 6400 // batch)),
                rounds=rounds,
            )
            for batch in (task.batch_sizes[0], task.batch_sizes[-1])
        }
        reports.append(task_report(task, all_results[task.name], split, timings[task.name], rounds))
    plot(tasks, all_results, args.out_dir / "accuracy_vs_batch.png")
    wall = time.perf_counter() - start

    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmarks.large_batch", *given])
    text = "\n\n".join(reports)
    print("\n" + text + f"\n\nwall time: {wall:.0f} s")
    header = [
        "# Large-batch benchmark results",
        "",
        f"Command: `{command}`; wall time {wall:.0f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); seeds {seeds}.",
        "",
        "Marks: † a seed diverged (non-finite training loss); s a seed had iterations "
        "skipped by the skip rule.",
        "",
        "",
    ]
    (args.out_dir / "results.md").write_text("\n".join(header) + text + "\n", encoding="utf-8")
    payload = {
        "command": command,
        "wall_seconds": wall,
        "seeds": seeds,
        "recipe": {
            "base_batch": BASE_BATCH,
            "warmup_fraction": WARMUP_FRACTION,
            "decay_at": DECAY_AT,
            "momentum": MOMENTUM,
        },
        "tasks": {
            task.name: {
                "title": task.title,
                "epochs": task.epochs,
                "batch_sizes": task.batch_sizes,
                "ms_per_iteration": {str(b): t for b, t in timings[task.name].items()},
                "methods": {
                    name: {
                        "selected": result.selected,
                        "grid": [
                            {"hp": c.hp, "best_val_accuracy": max(c.run.val_accuracy[1:])}
                            for c in result.grid
                        ],
                        "runs": {
                            str(b): [asdict(run) for run in runs] for b, runs in result.runs.items()
                        },
                    }
                    for name, result in all_results[task.name].items()
                },
            }
            for task in tasks
        },
    }
    (args.out_dir / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
