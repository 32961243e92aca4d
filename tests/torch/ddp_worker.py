"""Run by test_torch_distributed.py: ALI-G data parallel on 2 gloo processes (CPU).

Usage: python ddp_worker.py OUT_DIR [MODE], MODE one of ``ddp`` (the default: DDP),
``fsdp`` (FSDP2's ``fully_shard``: parameters and gradients are DTensors sharded over the
ranks) and ``fsdp-single-tensor`` (the same with ``foreach=False``); sharded optimizers
(ZeRO, FSDP1) and subgroups: ``sharded_worker.py``. Each rank trains on its half of every
global batch and rank 0 writes the final (whole) parameters and the gammas to OUT_DIR/ddp.pt.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 20
GLOBAL_BATCH = 16
ALIG_KWARGS = {"max_lr": 5.0, "momentum": 0.9, "max_norm": 4.0}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    ).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (STEPS, GLOBAL_BATCH), generator=generator)
    return x, y


def train(
    model: torch.nn.Module,
    rank: int,
    world: int,
    foreach: bool | None = None,
) -> list[float]:
    from alig_torch import AliG, project_onto_ball

    project_onto_ball(model.parameters(), 2.0)  # inside ALIG_KWARGS' ball (sharded: all shards)
    opt = AliG(model.parameters(), **ALIG_KWARGS, foreach=foreach)
    x, y = make_data()
    per_rank = GLOBAL_BATCH // world
    gammas = []
    for t in range(STEPS):
        xs = x[t, rank * per_rank : (rank + 1) * per_rank]
        ys = y[t, rank * per_rank : (rank + 1) * per_rank]

        def closure(xs: torch.Tensor = xs, ys: torch.Tensor = ys) -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs), ys)
            loss.backward()
            return loss

        opt.step(closure)
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


def worker(rank: int, world: int, init_file: str, out_dir: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = wrap(make_model(), mode, world)
    gammas = train(model, rank, world, foreach=False if mode == "fsdp-single-tensor" else None)
    gathered = [None] * world
    dist.all_gather_object(gathered, gammas)
    params = whole_parameters(model)  # a collective under FSDP2: every rank takes part
    if rank == 0:
        torch.save(
            {
                "params": params,
                "gammas": gathered,
            },
            Path(out_dir) / "ddp.pt",
        )
    # Tear down in step: no rank leaves while another still talks to it, and the DDP
    # reducer (which holds the process group and gloo's work objects) is freed before the
    # group is destroyed. Leaving either to interpreter shutdown once aborted a rank in
    # CI (SIGABRT, "terminate called without an active exception").
    dist.barrier()
    del model
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    mp.spawn(worker, args=(2, str(Path(out) / "init"), out, mode), nprocs=2, join=True)
