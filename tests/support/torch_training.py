"""What torch's tests train with: a small MLP, its data, a closure; the ranks of the
data-parallel workers.

``tests/torch/ddp_worker.py``, ``sharded_worker.py`` and ``extrapolation_ddp_worker.py``
run each rank in a process of its own (gloo, on the CPU) through :func:`run_ranks`, each
on its :func:`share` of every global batch; their tests build the one-process reference
from the same :func:`mlp` and :func:`batches`. Any torch test that trains with a closure
takes :func:`cross_entropy_closure`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["FEATURES", "batches", "cross_entropy_closure", "mlp", "run_ranks", "share"]

FEATURES = 6


def mlp(classes: int) -> torch.nn.Module:
    """The float64 MLP ``FEATURES -> 16 -> classes`` (tanh), the same weights every time."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, classes)
    ).double()


def batches(steps: int, global_batch: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` global batches: inputs ``(steps, global_batch, FEATURES)``, labels."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(steps, global_batch, FEATURES, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (steps, global_batch), generator=generator)
    return x, y


def share(
    x: torch.Tensor, y: torch.Tensor, t: int, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s share of global batch ``t`` (``world == 1``: the whole batch)."""
    per_rank = x.shape[1] // world
    return x[t, rank * per_rank : (rank + 1) * per_rank], y[
        t, rank * per_rank : (rank + 1) * per_rank
    ]


def cross_entropy_closure(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """The closure of ``opt.step(closure)``: zero the gradients, the loss, its backward."""

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def run_ranks(
    body: Callable[..., None],
    world: int,
    out_dir: str | Path,
    *args: Any,
    timeout_s: float | None = None,
) -> None:
    """Runs ``body(rank, world, *args)`` on ``world`` processes, each a rank of one gloo
    group (``timeout_s``: the group's timeout, for collectives a rank may be left in)."""
    init_file = str(Path(out_dir) / "init")
    mp.spawn(_rank, args=(world, init_file, body, args, timeout_s), nprocs=world, join=True)


def _rank(
    rank: int,
    world: int,
    init_file: str,
    body: Callable[..., None],
    args: tuple[Any, ...],
    timeout_s: float | None,
) -> None:
    options = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, **options
    )
    body(rank, world, *args)
    # Tear down in step: no rank leaves while another still talks to it, and the DDP
    # reducer (which holds the process group and gloo's work objects) is freed before the
    # group is destroyed. Leaving either to interpreter shutdown once aborted a rank in
    # CI (SIGABRT, "terminate called without an active exception").
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
