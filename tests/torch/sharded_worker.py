"""Run by test_torch_distributed.py: ALI-G under sharded optimizers and process subgroups (gloo).

Usage: python sharded_worker.py OUT_DIR SETUP, SETUP one of

- ``zero``: ``ZeroRedundancyOptimizer(optimizer_class=AliG, partitioned=True)`` over DDP, on
  2 ranks, for every configuration of :data:`CONFIGS`, then a model of a single tensor
  (ZeRO leaves rank 1's partition empty);
- ``fsdp1``: FSDP1 (``FullyShardedDataParallel`` on the CPU) with ``use_orig_params=False``
  and ``True``, 2 ranks, every configuration;
- ``subgroup``: 3 ranks; ranks 0 and 1 train in a subgroup (DDP, then ZeRO, with
  ``process_group=``), rank 2 trains alone on the whole batch in a group of its own and
  counts the collectives AliG makes there;
- ``refusals``: 2 ranks, a short process-group timeout, setups that cannot take one step on
  every rank: each rank records what it raised.

Each training rank takes its share of every global batch; rank 0 writes OUT_DIR/SETUP.pt.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torch_training import batches, cross_entropy_closure, mlp, run_ranks, share

STEPS = 12
GLOBAL_BATCH = 12
MAX_LR = 5.0
START_RADIUS = 2.0
CONFIGS: list[dict[str, Any]] = [
    # every factor both ways: step form, momentum (and its convention), projection, step path
    {"form": "closure", "momentum": 0.9, "max_norm": 3.0, "foreach": None},
    {"form": "loss", "momentum": 0.0, "max_norm": None, "foreach": False},
    {"form": "loss", "momentum": 0.9, "adjusted_momentum": True, "max_norm": 3.0, "foreach": False},
    {"form": "closure", "momentum": 0.0, "max_norm": 2.5, "foreach": None},
]
"""``form`` is how the loss reaches the step (``step(closure)``, ``step(loss=)``, or
``add_loss`` then ``step()``); the rest are AliG's arguments. The projection's radius is
reached within the run (the test checks)."""


def make_model(single_tensor: bool = False) -> torch.nn.Module:
    """A float64 MLP of 163 entries (odd: FSDP1 pads its flat parameter), or one tensor."""
    if single_tensor:
        torch.manual_seed(0)
        return torch.nn.Linear(6, 3, bias=False).double()
    return mlp(classes=3)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    return batches(STEPS, GLOBAL_BATCH, classes=3)


def alig_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {"max_lr": MAX_LR, **{k: v for k, v in config.items() if k != "form"}}


def train(
    model: torch.nn.Module,
    opt: Any,
    form: str,
    rank: int,
    world: int,
    gamma: Callable[[], float],
    on_step: Callable[[], None] | None = None,
) -> list[float]:
    """``STEPS`` steps on this rank's share of each global batch; the gammas taken."""
    x, y = make_data()
    gammas = []
    for t in range(STEPS):
        closure = cross_entropy_closure(model, opt, *share(x, y, t, rank, world))
        if form == "closure":
            opt.step(closure)
        elif form == "add_loss":  # ZeRO's own AliG takes the loss, ZeRO steps without one
            with torch.enable_grad():
                loss = closure()
            getattr(opt, "optim", opt).add_loss(loss)
            opt.step()
        else:
            with torch.enable_grad():
                loss = closure()
            opt.step(loss=loss)
        gammas.append(gamma())
        if on_step is not None:
            on_step()
    return gammas


def reference(config: dict[str, Any], single_tensor: bool = False) -> dict[str, Any]:
    """One process on the whole batch: the run every setup must equal."""
    from alig_torch import AliG, project_onto_ball

    model = make_model(single_tensor)
    project_onto_ball(model.parameters(), START_RADIUS)
    opt = AliG(model.parameters(), **alig_kwargs(config))
    norms: list[float] = []

    def record_norm() -> None:
        norms.append(float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()))

    gammas = train(model, opt, config["form"], 0, 1, lambda: float(opt.gamma), record_norm)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "gammas": gammas,
        "max_param_norm": max(norms),
    }


def _zero(model: torch.nn.Module, config: dict[str, Any], group: Any = None, **extra: Any) -> Any:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from alig_torch import AliG

    optimizer_class = AliG if group is None else functools.partial(AliG, process_group=group)
    return ZeroRedundancyOptimizer(
        model.parameters(),
        optimizer_class=optimizer_class,
        process_group=group,
        **alig_kwargs(config),
        **extra,
    )


def _result(gammas: list[float], params: list[torch.Tensor], world: int) -> dict[str, Any]:
    """Every rank's gammas (a collective) and the whole parameters."""
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, gammas)
    return {"gammas": gathered, "params": [p.detach().clone() for p in params]}


def run_zero(rank: int, world: int) -> dict[str, Any]:
    from alig_torch import project_onto_ball

    results: dict[str, Any] = {}
    for index, config in enumerate(CONFIGS):
        model = make_model()
        project_onto_ball(model.parameters(), START_RADIUS)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = _zero(ddp, config, partitioned=True)
        gammas = train(ddp, opt, config["form"], rank, world, lambda o=opt: float(o.optim.gamma))
        results[f"config{index}"] = _result(gammas, list(model.parameters()), world)
        del ddp, opt
    # One tensor for two ranks: rank 1's AliG has empty param groups and takes part anyway,
    # with the loss from a closure, and added with add_loss.
    for form in ("closure", "add_loss"):
        config = {**CONFIGS[0], "form": form}
        model = make_model(single_tensor=True)
        project_onto_ball(model.parameters(), START_RADIUS)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = _zero(ddp, config, partitioned=True)
        sizes: list[Any] = [None] * world
        held = sum(p.numel() for group in opt.optim.param_groups for p in group["params"])
        dist.all_gather_object(sizes, held)
        gammas = train(ddp, opt, form, rank, world, lambda o=opt: float(o.optim.gamma))
        result = {**_result(gammas, list(model.parameters()), world), "sizes": sizes}
        results[f"empty-{form}"] = result
        del ddp, opt
    return results


def run_fsdp1(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from alig_torch import AliG, project_onto_ball

    results: dict[str, Any] = {}
    for use_orig_params in (False, True):
        for index, config in enumerate(CONFIGS):
            model = make_model()
            project_onto_ball(model.parameters(), START_RADIUS)
            fsdp = FullyShardedDataParallel(
                model, device_id=torch.device("cpu"), use_orig_params=use_orig_params
            )
            # Flat parameters say how FSDP1 shards them; original parameters (views) do not.
            extra = {"partitioned": True} if use_orig_params else {}
            opt = AliG(fsdp.parameters(), **alig_kwargs(config), **extra)
            gammas = train(fsdp, opt, config["form"], rank, world, lambda o=opt: float(o.gamma))
            with FullyShardedDataParallel.summon_full_params(fsdp):
                result = _result(gammas, list(fsdp.parameters()), world)
            results[f"orig{use_orig_params}-config{index}"] = result
            del fsdp, opt
    return results


def run_subgroup(rank: int, world: int) -> dict[str, Any]:
    from alig_torch import AliG, project_onto_ball

    pair = dist.new_group([0, 1])  # every rank creates every group
    alone = dist.new_group([2])
    config = CONFIGS[0]
    results: dict[str, Any] = {}
    if rank == 2:  # the whole batch, in a group of one: AliG makes no collective
        calls = []
        real = dist.all_reduce

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return real(*args, **kwargs)

        dist.all_reduce = counting  # type: ignore[assignment]
        try:
            model = make_model()
            project_onto_ball(model.parameters(), START_RADIUS)
            opt = AliG(model.parameters(), **alig_kwargs(config), process_group=alone)
            gammas = train(model, opt, config["form"], 0, 1, lambda: float(opt.gamma))
        finally:
            dist.all_reduce = real  # type: ignore[assignment]
        results["alone"] = {
            "gammas": gammas,
            "params": [p.detach().clone() for p in model.parameters()],
            "collectives": len(calls),
        }
    else:
        for name in ("ddp", "zero"):
            model = make_model()
            project_onto_ball(model.parameters(), START_RADIUS)
            ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=pair)
            if name == "ddp":
                opt = AliG(ddp.parameters(), **alig_kwargs(config), process_group=pair)
                gamma = lambda o=opt: float(o.gamma)  # noqa: E731
            else:
                opt = _zero(ddp, config, group=pair, partitioned=True)
                gamma = lambda o=opt: float(o.optim.gamma)  # noqa: E731
            gammas = train(ddp, opt, config["form"], rank, 2, gamma)
            gathered: list[Any] = [None] * 2
            dist.all_gather_object(gathered, gammas, group=pair)
            params = [p.detach().clone() for p in model.parameters()]
            results[name] = {"gammas": gathered, "params": params}
            del ddp, opt
    everything: list[Any] = [None] * world
    dist.all_gather_object(everything, results)
    return {**everything[0], **everything[2]}


def _attempt(step: Callable[[], Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """One step that must fail: what was raised, and whether the parameters stayed."""
    before = [p.detach().clone() for p in params]
    try:
        step()
    except Exception as error:  # recorded for the test to check
        outcome = {"type": type(error).__name__, "message": str(error)}
    else:
        outcome = {"type": None, "message": ""}
    outcome["unchanged"] = all(
        torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True)
    )
    return outcome


def run_refusals(rank: int, world: int) -> dict[str, Any]:
    from alig_torch import AliG

    xs, ys = share(*make_data(), 0, rank, world)
    config = {"momentum": 0.9, "max_norm": None, "foreach": None}
    outcomes: dict[str, Any] = {}

    def ddp_case(
        name: str,
        loss_for: Callable[[torch.Tensor], Any],
        step: Callable[[Any, Any], Any] = lambda opt, loss: opt.step(loss=loss),
        **kwargs: Any,
    ) -> None:
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = AliG(ddp.parameters(), **{**alig_kwargs(config), **kwargs})
        loss = torch.nn.functional.cross_entropy(ddp(xs), ys)
        loss.backward()
        outcomes[name] = _attempt(lambda: step(opt, loss_for(loss)), list(model.parameters()))

    # Each rank hands over its local loss, promising the global mean.
    ddp_case("local-loss", lambda loss: loss, all_reduce_loss=False)
    # Rank 0 hands over a vector: it refuses it, rank 1 (whose loss is fine) raises too.
    ddp_case("bad-loss-on-rank-0", lambda loss: loss.expand(3) if rank == 0 else loss)
    # Rank 1 hands over no loss at all: step() itself refuses, before the step's collective.
    ddp_case(
        "no-loss-on-rank-1",
        lambda loss: loss,
        step=lambda opt, loss: opt.step(loss=loss) if rank == 0 else opt.step(),
    )
    # Rank 1 was built with another cap.
    ddp_case("other-max-lr", lambda loss: loss, max_lr=MAX_LR if rank == 0 else MAX_LR / 2)
    # Plain DDP said to be partitioned: every rank holds the same parts.
    ddp_case("partitioned-ddp", lambda loss: loss, partitioned=True)

    # ZeRO without partitioned=True: each rank's AliG sees its partition only.
    outcomes["zero-without-partitioned"] = _zero_without_partitioned(xs, ys, config)
    # FSDP1's original parameters do not say whether they are sharded.
    outcomes["fsdp1-orig-params-unsaid"] = _fsdp1_orig_params_unsaid(xs, ys, config)

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, outcomes)
    return {"ranks": gathered}


def _zero_without_partitioned(
    xs: torch.Tensor, ys: torch.Tensor, config: dict[str, Any]
) -> dict[str, Any]:
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = _zero(ddp, {"form": "loss", **config})
    loss = torch.nn.functional.cross_entropy(ddp(xs), ys)
    loss.backward()
    return _attempt(lambda: opt.step(loss=loss), list(model.parameters()))


def _fsdp1_orig_params_unsaid(
    xs: torch.Tensor, ys: torch.Tensor, config: dict[str, Any]
) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from alig_torch import AliG

    fsdp = FullyShardedDataParallel(
        make_model(), device_id=torch.device("cpu"), use_orig_params=True
    )
    opt = AliG(fsdp.parameters(), **alig_kwargs(config))
    loss = torch.nn.functional.cross_entropy(fsdp(xs), ys)
    loss.backward()
    return _attempt(lambda: opt.step(loss=loss), list(fsdp.parameters()))


SETUPS = {
    "zero": (run_zero, 2),
    "fsdp1": (run_fsdp1, 2),
    "subgroup": (run_subgroup, 3),
    "refusals": (run_refusals, 2),
}


def worker(rank: int, world: int, out_dir: str, setup: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # FSDP1's deprecation notice
    warnings.filterwarnings("ignore", category=UserWarning)
    result = SETUPS[setup][0](rank, world)
    if rank == 0:
        torch.save(result, Path(out_dir) / f"{setup}.pt")


if __name__ == "__main__":
    out, setup = sys.argv[1], sys.argv[2]
    # A short timeout: a rank left waiting in a collective fails within a minute, not 30.
    run_ranks(worker, SETUPS[setup][1], out, out, setup, timeout_s=60)
