"""Milliseconds per torch optimizer step on 2 gloo ranks (CPU): what AliG's collective costs.

Every step under ``torch.distributed`` makes one collective: each rank fills its row of a
small table (loss, sums of squares, checks) and one all-gather hands every rank every row
(``alig_torch._distributed``); before issue 12 it made one all-reduce of the loss. Rows, on
each rank's own copy of the parameters with fixed random gradients (as under DDP after the
gradients' all-reduce, which is not timed):

- ``SGD nesterov``: the baseline;
- ``AliG, group of one``: AliG's step in a process group of one rank (no collective);
- ``AliG, group of one + scalar all_reduce``: the same followed by an all-reduce of one
  scalar: what the step cost before (the loss all-reduce, then the local step);
- ``AliG, 2 ranks``: the step now, with its collective and checks;
- ``all_reduce of one scalar``, ``all_gather of a row of 8``: the two collectives alone.

The rows run interleaved in a shuffled order that is the same on both ranks (one seed), so
that the collectives meet; rank 0 prints the medians.

Run: ``python -m benchmarks.step_time_distributed [--model digits-mlp|resnet18] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.step_time import MODELS, _time_interleaved


def _stepper(
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    shapes: list[tuple[int, ...]],
    needs_loss: bool,
) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)  # the same parameters on every rank
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-2
    optimizer = make_optimizer(params)
    loss = torch.tensor(1.0)

    def step() -> None:
        if needs_loss:
            optimizer.step(loss=loss)
        else:
            optimizer.step()

    for _ in range(3):  # warm up: state allocation
        step()
    return step


def _rows(shapes: list[tuple[int, ...]], alone: object) -> dict[str, Callable[[], None]]:
    from alig_torch import AliG
    from alig_torch._distributed import _all_gather

    scalar = torch.zeros(())
    row, table = torch.zeros(8, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
    local = _stepper(lambda p: AliG(p, max_lr=0.1, momentum=0.9, process_group=alone), shapes, True)
    before = _stepper(
        lambda p: AliG(p, max_lr=0.1, momentum=0.9, process_group=alone), shapes, True
    )

    def before_step() -> None:
        dist.all_reduce(scalar)
        before()

    return {
        "SGD nesterov (foreach)": _stepper(
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), shapes, False
        ),
        "AliG, group of one": local,
        "AliG, group of one + scalar all_reduce": before_step,
        "AliG, 2 ranks": _stepper(lambda p: AliG(p, max_lr=0.1, momentum=0.9), shapes, True),
        "all_reduce of one scalar": lambda: dist.all_reduce(scalar),
        "all_gather of a row of 8": lambda: _all_gather(table, row, None),
    }


def _worker(rank: int, init_file: str, model: str, rounds: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)  # two ranks on a shared machine: one core each
    groups = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
    model_name, make_shapes = MODELS[model]
    shapes = make_shapes()
    medians = _time_interleaved(_rows(shapes, groups[rank]), rounds)
    if rank == 0:
        num_params = sum(math.prod(s) for s in shapes)
        print(f"{model_name} shapes: {len(shapes)} tensors, {num_params / 1e6:.3f}M float32")
        print(f"{'row (2 gloo ranks, momentum 0.9, rank 0)':<44} {'ms/step':>8}")
        for name, seconds in medians.items():
            print(f"{name:<44} {seconds * 1e3:>8.3f}")
        now = medians["AliG, 2 ranks"] - medians["AliG, group of one"]
        before = medians["AliG, group of one + scalar all_reduce"] - medians["AliG, group of one"]
        print(f"{'distributed extra, now (2 ranks - alone)':<44} {now * 1e3:>8.3f}")
        print(f"{'distributed extra, before (+ scalar - alone)':<44} {before * 1e3:>8.3f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits-mlp")
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        init_file = str(Path(folder) / "init")
        mp.spawn(_worker, args=(init_file, args.model, args.rounds), nprocs=2, join=True)


if __name__ == "__main__":
    main()
