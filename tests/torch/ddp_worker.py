"""Run by test_torch_distributed.py: ALI-G under DDP on 2 gloo processes (CPU).

Usage: python ddp_worker.py OUT_DIR [local-loss]. Each rank trains on its half of every global batch
and rank 0 writes the final parameters and gammas to OUT_DIR/ddp.pt.
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
    model: torch.nn.Module, rank: int, world: int, all_reduce_loss: bool = True
) -> list[float]:
    from alig_torch import AliG

    opt = AliG(model.parameters(), **ALIG_KWARGS, all_reduce_loss=all_reduce_loss)
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


def worker(rank: int, world: int, init_file: str, out_dir: str, all_reduce_loss: bool) -> None:
    import warnings

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gammas = train(model, rank, world, all_reduce_loss)
    warned = any("all_reduce_loss=False" in str(w.message) for w in caught)
    gathered = [None] * world
    dist.all_gather_object(gathered, gammas)
    if rank == 0:
        torch.save(
            {
                "params": [p.detach() for p in model.module.parameters()],
                "gammas": gathered,
                "warned": warned,
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
    reduce_loss = sys.argv[2:] != ["local-loss"]
    mp.spawn(worker, args=(2, str(Path(out) / "init"), out, reduce_loss), nprocs=2, join=True)
