"""Run by test_torch_distributed.py: ALI-G data parallel on 2 gloo processes (CPU).

Usage: python ddp_worker.py OUT_DIR [MODE], MODE one of ``ddp`` (the default: DDP),
``fsdp`` (FSDP2's ``fully_shard``: parameters and gradients are DTensors sharded over the
ranks) and ``fsdp-single-tensor`` (the same with ``foreach=False``); sharded optimizers
(ZeRO, FSDP1) and subgroups: ``sharded_worker.py``. Each rank trains on its half of every
global batch and rank 0 writes the final (whole) parameters and the gammas to OUT_DIR/ddp.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from torch_training import batches, cross_entropy_closure, mlp, run_ranks, share

STEPS = 20
GLOBAL_BATCH = 16
CLASSES = 4
ALIG_KWARGS = {"max_lr": 5.0, "momentum": 0.9, "max_norm": 4.0}


def make_model() -> torch.nn.Module:
    return mlp(CLASSES)


def train(
    model: torch.nn.Module,
    rank: int,
    world: int,
    foreach: bool | None = None,
) -> list[float]:
    from alig_torch import AliG, project_onto_ball

    project_onto_ball(model.parameters(), 2.0)  # inside ALIG_KWARGS' ball (sharded: all shards)
    opt = AliG(model.parameters(), **ALIG_KWARGS, foreach=foreach)
    x, y = batches(STEPS, GLOBAL_BATCH, CLASSES)
    gammas = []
    for t in range(STEPS):
        opt.step(cross_entropy_closure(model, opt, *share(x, y, t, rank, world)))
        gammas.append(float(opt.gamma))
    return gammas


def wrap(model: torch.nn.Module, mode: str, world: int) -> torch.nn.Module:
    if mode.startswith("fsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def whole_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    module = getattr(model, "module", model)  # DDP wraps, FSDP2 shards in place
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in module.parameters()
    ]


def worker(rank: int, world: int, out_dir: str, mode: str) -> None:
    model = wrap(make_model(), mode, world)
    gammas = train(model, rank, world, foreach=False if mode == "fsdp-single-tensor" else None)
    gathered = [None] * world
    dist.all_gather_object(gathered, gammas)
    params = whole_parameters(model)  # a collective under FSDP2: every rank takes part
    if rank == 0:
        torch.save({"params": params, "gammas": gathered}, Path(out_dir) / "ddp.pt")


if __name__ == "__main__":
    out = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    run_ranks(worker, 2, out, out, mode)
