"""Run by test_torch_extrapolation_ddp.py: Extrapolation under DDP on 2 gloo processes (CPU).

Usage: python extrapolation_ddp_worker.py OUT_DIR. Each rank trains every configuration of
CONFIGS on its half of every global batch, and rank 0 writes, per configuration, both ranks'
final parameters, the anchor after every call, the points of the update evaluations and the
counters to OUT_DIR/extrapolation_ddp.pt. In the configurations with
``anchor_gradient="local"`` the anchor pass runs under ``ddp_model.no_sync()``.

Rank 1 hands over a NaN loss (its gradient stays finite) at the anchor of one iteration and
at the update of another: the ranks must skip together.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torch_training import batches, mlp, run_ranks, share

CALLS = 12
GLOBAL_BATCH = 16
ALIG_KWARGS: dict[str, Any] = {"max_lr": 5.0, "momentum": 0.9, "max_norm": 4.0}
SGD_KWARGS: dict[str, Any] = {"lr": 0.2, "momentum": 0.9, "nesterov": True}

CONFIGS: dict[str, dict[str, Any]] = {
    "alig-all_reduced": {"base": "alig", "anchor_gradient": "all_reduced", "form": "same_batch"},
    "alig-local": {"base": "alig", "anchor_gradient": "local", "form": "same_batch"},
    "sgd-all_reduced": {"base": "sgd", "anchor_gradient": "all_reduced", "form": "alternating"},
    "sgd-local": {"base": "sgd", "anchor_gradient": "local", "form": "alternating"},
}
"""ALI-G (linearised, default lr_x) with the closure; SGD Nesterov with step(loss=...)."""

NAN_AT = {(4, "anchor"), (8, "update")}
"""(call, pass) where rank 1 (in one process: the whole batch) hands over a NaN loss."""


CLASSES = 4


def make_model() -> torch.nn.Module:
    return mlp(CLASSES)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    return batches(CALLS, GLOBAL_BATCH, CLASSES)


def make_base(kind: str, params: Any) -> torch.optim.Optimizer:
    from alig_torch import AliG

    if kind == "alig":
        return AliG(params, **ALIG_KWARGS)
    return torch.optim.SGD(params, **SGD_KWARGS)


COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather_single", "all_gather")
"""The torch.distributed calls a step could make (DDP's own gradient all-reduce is not one:
its reducer runs in C++)."""


@contextlib.contextmanager
def counting_collectives(counter: list[int]) -> Any:
    """Counts the calls of :data:`COLLECTIVES` made from Python while active."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counted(function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            counter[0] += 1
            return function(*args, **kwargs)

        return call

    for name, function in originals.items():
        setattr(dist, name, counted(function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def flat(params: Any) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def train(model: torch.nn.Module, rank: int, world: int, name: str) -> dict[str, Any]:
    """``world == 1``: one process on the whole batch (events wherever any rank has one)."""
    from alig_torch import Extrapolation, project_onto_ball

    config = CONFIGS[name]
    module = getattr(model, "module", model)
    with torch.no_grad():  # the same start for every configuration
        for p, q in zip(module.parameters(), make_model().parameters(), strict=True):
            p.copy_(q)
    project_onto_ball(module.parameters(), 2.0)
    opt = Extrapolation(
        make_base(config["base"], model.parameters()), anchor_gradient=config["anchor_gradient"]
    )
    x, y = make_data()
    anchors, points = [], []
    evaluations, collectives = [0], [0]

    def evaluate(t: int) -> torch.Tensor:
        evaluations[0] += 1
        kind = "anchor" if opt.anchor_pass else "update"
        xs, ys = share(x, y, t, rank, world)
        local = config["anchor_gradient"] == "local" and kind == "anchor" and world > 1
        opt.zero_grad()
        with model.no_sync() if local else contextlib.nullcontext():  # type: ignore[operator]
            loss = torch.nn.functional.cross_entropy(model(xs), ys)
            loss.backward()
        if kind == "update":
            points.append(flat(module.parameters()))
        if (t, kind) in NAN_AT and (rank == 1 or world == 1):
            return torch.full_like(loss, float("nan"))
        return loss.detach()

    for t in range(CALLS):
        with counting_collectives(collectives):
            if config["form"] == "same_batch":
                opt.step(lambda t=t: evaluate(t))
            else:
                opt.step(loss=evaluate(t))
        anchors.append(flat(opt.anchor_params()))
    return {
        "params": flat(module.parameters()),
        "anchors": anchors,
        "points": points,
        "counters": (opt.iteration, opt.iterations_skipped),
        "evaluations": evaluations[0],
        "collectives": collectives[0],
    }


def worker(rank: int, world: int, out_dir: str) -> None:
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    results = {}
    for name in CONFIGS:
        ours = train(model, rank, world, name)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, ours)
        results[name] = gathered
    if rank == 0:
        torch.save(results, Path(out_dir) / "extrapolation_ddp.pt")


if __name__ == "__main__":
    out = sys.argv[1]
    run_ranks(worker, 2, out, out)
