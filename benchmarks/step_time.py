"""Milliseconds per optimizer step on ResNet-18-shaped float32 parameters (CPU).

Each framework contributes its rows from ``benchmarks.frameworks._<framework>``:
``step_time_rows(shapes) -> (baseline_name, {row_name: step_callable})``, each callable
doing one complete, blocking optimizer step (built and warmed up beforehand);
``keras_graph`` is Keras' ``step_time_rows_graph``.

Rows of a framework are timed interleaved (each round runs every row once, in a shuffled
order, so that the machine's noise and the row before hit all of them alike), the median
is reported, and ratios are taken against that framework's baseline measured in the same
process. A plain memory copy of the same bytes, interleaved too, gives the machine's
bandwidth; each row's "GB/s" counts the bytes a momentum step must move at the least
(read p, g, b; write p, b: 5 x the parameter bytes).

Run: ``python -m benchmarks.step_time [--frameworks torch,jax,keras,keras_graph] [--rounds 30]
[--model resnet18|digits-mlp]`` (the digits MLP: 6 small tensors, where the fixed cost of
a step dominates; give it many rounds, e.g. 3000).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from collections.abc import Callable

from benchmarks import frameworks

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROW_SETS = {
    "torch": ("torch", "step_time_rows"),
    "jax": ("jax", "step_time_rows"),
    "keras": ("keras", "step_time_rows"),
    "keras_graph": ("keras", "step_time_rows_graph"),
}
"""Row set -> (framework, the function of ``benchmarks.frameworks._<framework>``)."""
FRAMEWORKS = tuple(ROW_SETS)


def resnet18_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """The 62 parameter shapes of torchvision's ResNet-18 (11.69M parameters)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for stage, channels in enumerate((64, 128, 256, 512)):
        for block in range(2):
            downsample = stage > 0 and block == 0
            shapes += [(channels, in_channels, 3, 3), (channels,), (channels,)]
            shapes += [(channels, channels, 3, 3), (channels,), (channels,)]
            if downsample:
                shapes += [(channels, in_channels, 1, 1), (channels,), (channels,)]
            in_channels = channels
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes


def digits_mlp_shapes() -> list[tuple[int, ...]]:
    """The 6 parameter shapes of the convergence benchmark's digits MLP 64-128-128-10
    (25k parameters): a model where the fixed cost of a step dominates."""
    return [(128, 64), (128,), (128, 128), (128,), (10, 128), (10,)]


MODELS = {
    "resnet18": ("ResNet-18", resnet18_shapes),
    "digits-mlp": ("digits MLP", digits_mlp_shapes),
}


def _memory_copy(num_bytes: int) -> Callable[[], None]:
    import numpy as np

    source = np.ones(num_bytes // 4, dtype=np.float32)
    target = np.empty_like(source)
    return lambda: np.copyto(target, source)


def _samples_interleaved(
    rows: dict[str, Callable[[], None]], rounds: int
) -> dict[str, list[float]]:
    """Seconds of each run of each row; every round runs each row once, in a new random order.

    The order is shuffled because a fixed one biases the rows: the same step measured
    twice in one fixed round came out 3% apart (what runs just before a row matters).
    """
    samples: dict[str, list[float]] = {name: [] for name in rows}
    order = list(rows)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            rows[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def _time_interleaved(rows: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per row, timed by :func:`_samples_interleaved`."""
    samples = _samples_interleaved(rows, rounds)
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    args = parser.parse_args()
    names = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    unknown = set(names) - set(FRAMEWORKS)
    if unknown:
        parser.error(f"unknown frameworks {sorted(unknown)}; choose from {FRAMEWORKS}")

    model_name, make_shapes = MODELS[args.model]
    shapes = make_shapes()
    num_params = sum(math.prod(s) for s in shapes)
    param_bytes = 4 * num_params
    print(f"{model_name} shapes: {len(shapes)} tensors, {num_params / 1e6:.2f}M float32 parameters")

    results: list[tuple[str, str, str, float]] = []
    for framework in names:
        module_name, function = ROW_SETS[framework]
        print(f"building and warming up the {framework} rows ...", flush=True)
        baseline, rows = getattr(frameworks.load(module_name), function)(shapes)
        rows = {**rows, "memory copy": _memory_copy(param_bytes)}
        medians = _time_interleaved(rows, args.rounds)
        for name, seconds in medians.items():
            results.append((framework, name, baseline, seconds))
        copy_gbps = 2 * param_bytes / medians["memory copy"] / 1e9
        print(f"  {framework}: memory copy of the same bytes {copy_gbps:.1f} GB/s")

    print()
    print(f"{'framework':<11} {'row':<44} {'ms/step':>8} {'GB/s':>6} {'vs baseline':>11}")
    by_key = {(f, n): s for f, n, _, s in results}
    for framework, name, baseline, seconds in results:
        if name == "memory copy":
            continue
        ratio = seconds / by_key[(framework, baseline)]
        gbps = 5 * param_bytes / seconds / 1e9
        print(f"{framework:<11} {name:<44} {seconds * 1e3:>8.2f} {gbps:>6.1f} {ratio:>10.2f}x")


if __name__ == "__main__":
    main()
