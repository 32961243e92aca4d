"""Milliseconds per DeepSpeed training iteration on 2 gloo ranks (CPU): AliG against SGD.

For each ZeRO stage (0-3), two DeepSpeed engines over the same model (an MLP of the digits
benchmark's size, float32, ``gradient_clipping: 0.0``, one micro-batch per step):

- ``SGD``: ``torch.optim.SGD(momentum=0.9, nesterov=True)`` as the client optimizer, with
  ``engine.backward(loss)``: the baseline;
- ``AliG``: ``AliG(max_lr=..., momentum=0.9, partitioned=stage >= 1)`` with
  ``alig_torch.integrations.deepspeed.backward(engine, loss)`` (the config checks, the loss
  handed over, AliG's collective in its step);
- ``helper``: ``hand_over_loss`` alone (the config checks and ``add_loss``, the part of
  ``backward`` that is not ``engine.backward``), for the breakdown.

Each row is one iteration: forward, backward, ``engine.step()``. The rows run interleaved
in a shuffled order that is the same on both ranks (one seed, ``step_time``'s
``_time_interleaved``), so that the collectives meet; rank 0 prints the medians and the
ratio AliG / SGD per stage. DeepSpeed's C++ shared-memory op is not built (``build_shm_op``
answers ``None``, as on a machine without it): the collectives are torch.distributed's.

Run: ``python -m benchmarks.step_time_deepspeed [--rounds N] [--batch B]`` (needs
``deepspeed``, installed in the ``integrations`` nox session).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks.step_time import _time_interleaved

FEATURES, HIDDEN, CLASSES = 64, 256, 10
"""The digits MLP's sizes (``step_time``'s ``digits-mlp``): 85k float32 parameters."""


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def _iteration(stage: int, optimizer: str, batch: int) -> tuple[Callable[[], None], Any]:
    import deepspeed

    from alig_torch import AliG
    from alig_torch.integrations.deepspeed import backward

    model = _model()
    if optimizer == "AliG":
        opt: Any = AliG(model.parameters(), max_lr=1.0, momentum=0.9, partitioned=stage >= 1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    x = torch.randn(batch, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (batch,), generator=generator)

    def run() -> None:
        loss = F.cross_entropy(engine(x), y)
        if optimizer == "AliG":
            backward(engine, loss)
        else:
            engine.backward(loss)
        engine.step()

    for _ in range(3):  # warm up: state allocation
        run()
    return run, engine


def _helper_alone(engine: Any) -> Callable[[], None]:
    """``hand_over_loss`` alone (the config checks and ``add_loss``), its loss then dropped."""
    from alig_torch.integrations._find import alig_optimizers
    from alig_torch.integrations.deepspeed import hand_over_loss

    (alig,) = alig_optimizers(engine.optimizer)
    loss = torch.tensor(1.0)

    def run() -> None:
        hand_over_loss(engine, loss)
        alig._accumulation.forget()

    return run


def _worker(rank: int, port: int, rounds: int, batch: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # two ranks on a shared machine: one core each
    import deepspeed
    import deepspeed.comm.torch

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no C++ compile
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=300))
    results = {}
    for stage in (0, 1, 2, 3):
        # One stage at a time: two live stage-3 engines share DeepSpeed's global state.
        sgd, _ = _iteration(stage, "SGD", batch)
        alig, engine = _iteration(stage, "AliG", batch)
        rows = {"SGD": sgd, "AliG": alig, "helper": _helper_alone(engine)}
        results[stage] = _time_interleaved(rows, rounds)
        del rows, sgd, alig, engine
    if rank == 0:
        print(f"MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES}, batch {batch} per rank, 2 gloo ranks")
        print(
            f"{'ZeRO stage':<12} {'SGD ms':>8} {'AliG ms':>8} {'AliG / SGD':>11} {'helper ms':>10}"
        )
        for stage, medians in results.items():
            sgd, alig = medians["SGD"] * 1e3, medians["AliG"] * 1e3
            helper = medians["helper"] * 1e3
            print(f"{stage:<12} {sgd:>8.3f} {alig:>8.3f} {alig / sgd:>11.3f} {helper:>10.3f}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    mp.spawn(_worker, args=(_free_port(), args.rounds, args.batch), nprocs=2, join=True)


if __name__ == "__main__":
    main()
