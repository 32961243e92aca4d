"""Run by test_deepspeed.py: ALI-G under DeepSpeed on 2 gloo ranks (CPU, float32).

Usage: python deepspeed_worker.py OUT_DIR PART, PART ``all`` (both below, in one spawn) or
one of

- ``runs``: for ZeRO stages 0-3 and gradient_accumulation_steps 1 and 2, a hand loop over
  ``deepspeed.initialize`` with :func:`alig_torch.integrations.deepspeed.backward`, and
  ``AliGTrainer`` with the same DeepSpeed config; the parameters and gammas of each;
- ``refusals``: setups that would take a wrong step: each rank records the error it
  raised and whether any parameter moved.

One spawn runs a whole part (DeepSpeed's import and a process start are the slow bits);
rank 0 writes every rank's results to OUT_DIR/PART.pt (the test runs :func:`reference`, one
process on the global batches, in its own process). DeepSpeed's init would compile a C++ op
(``deepspeed_shm_comm``, minutes on 2 cores): ``build_shm_op`` is replaced by its own
"not available" answer, ``None``, with which DeepSpeed uses torch.distributed's collectives.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

STEPS = 6
GLOBAL_BATCH = 8
FEATURES = 5
CLASSES = 3
WORLD = 2
KWARGS: dict[str, Any] = {"max_lr": 5.0, "momentum": 0.9, "max_norm": 3.2}
"""AliG's arguments: gamma moves below the cap, the projection onto the ball is active."""

STAGES = (0, 1, 2, 3)
SKIPPED = 1
"""The global batch whose gradient is made non-finite in the ``skipped`` runs."""
ACCUMULATION = (1, 2)


def make_model() -> torch.nn.Module:
    """The float32 classifier, always from the same initial weights."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, CLASSES)
    )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """``STEPS`` global batches of ``GLOBAL_BATCH`` rows, one after the other."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * GLOBAL_BATCH, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (STEPS * GLOBAL_BATCH,), generator=generator)
    return x, y


def alig_kwargs(stage: int) -> dict[str, Any]:
    """AliG's arguments at ``stage`` (the same at every stage)."""
    return dict(KWARGS)


def reference(skip: int | None = None, stage: int = 0) -> dict[str, Any]:
    """One process, one ``step(loss=...)`` per global batch: what every run must equal
    (``skip``: a global batch whose step does not happen; ``stage``: AliG's arguments of
    that stage's runs)."""
    from alig_torch import AliG

    model = make_model()
    opt = AliG(model.parameters(), **alig_kwargs(stage))
    x, y = make_data()
    gammas, norms = [], []
    for t in range(STEPS):
        if t == skip:
            continue
        rows = slice(t * GLOBAL_BATCH, (t + 1) * GLOBAL_BATCH)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[rows]), y[rows])
        loss.backward()
        opt.step(loss=loss)
        gammas.append(float(opt.gamma))
        norms.append(float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()))
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "gammas": gammas,
        "norms": norms,
    }


def micro_batch(t: int, m: int, rank: int, gas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s micro-batch ``m`` of global batch ``t``: the ranks' micro-batches of
    a step are equal parts of it (so the mean of their means is its mean)."""
    x, y = make_data()
    per_rank = GLOBAL_BATCH // WORLD
    size = per_rank // gas
    start = t * GLOBAL_BATCH + rank * per_rank + m * size
    return x[start : start + size], y[start : start + size]


def ds_config(stage: int, gas: int, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD // gas,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        elif isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def whole_params(engine: Any) -> list[torch.Tensor]:
    """The whole parameters on every rank (stage 3 gathers its partitions)."""
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def hand_loop(
    stage: int,
    gas: int,
    rank: int,
    *,
    form: str = "helper",
    groups: int = 1,
    alig_overrides: dict[str, Any] | None = None,
    fp16_flag: bool = False,
    poison: int | None = None,
    garbage: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """``deepspeed.initialize`` and ``STEPS`` optimizer steps; ``form`` is how ALI-G gets
    its loss: ``helper`` (the documented way), ``add_loss`` (the loss by hand, divided by
    gas), ``unscaled`` (the micro-batch loss by hand), ``none``; ``sgd``: torch's SGD with
    the helper. ``poison``: a global batch
    whose first micro-batch on rank 0 holds a NaN (a non-finite gradient: ZeRO skips the
    step without calling the optimizer, AliG skips it itself at stage 0)."""
    import deepspeed

    from alig_torch import AliG
    from alig_torch.integrations.deepspeed import backward

    model = make_model()
    params: Any = list(model.parameters())
    if groups == 2:
        params = [{"params": params[:2]}, {"params": params[2:]}]
    kwargs = {**alig_kwargs(stage), "partitioned": stage >= 1, **(alig_overrides or {})}
    opt = torch.optim.SGD(params, lr=0.1) if form == "sgd" else AliG(params, **kwargs)
    config = ds_config(stage, gas, **overrides)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    if fp16_flag:
        engine._config.float16_config.enabled = True
    if garbage:  # what torch.empty may hold in stage 3's padding, made certain
        from alig_torch.integrations.deepspeed import stage3_padding

        padding = stage3_padding(engine)
        assert (rank == WORLD - 1) == bool(padding)  # the last rank's partition is padded
        with torch.no_grad():
            for pad in padding:
                pad.fill_(float("inf"))
    start = whole_params(engine)
    gammas, losses = [], []
    try:
        for t in range(STEPS):
            for m in range(gas):
                x, y = micro_batch(t, m, rank, gas)
                if t == poison and m == 0 and rank == 0:
                    x = x.clone()
                    x[0, 0] = float("nan")
                loss = F.cross_entropy(engine(x.to(start[0].dtype)), y)
                losses.append(float(loss))
                if form in ("helper", "sgd"):
                    backward(engine, loss)
                else:
                    if form == "add_loss":
                        opt.add_loss(loss / gas)
                    elif form == "unscaled":
                        opt.add_loss(loss)
                    engine.backward(loss)
                engine.step()
            gammas.append(float(opt.gamma))
    except (ValueError, RuntimeError) as error:
        moved = any(not torch.equal(a, b) for a, b in zip(start, whole_params(engine), strict=True))
        return {"error": f"{type(error).__name__}: {error}", "moved": moved}
    finally:
        end = whole_params(engine)
        engine.destroy()  # DeepSpeed's hooks on the model, before the next engine's
        gc.collect()
    return {
        "params": end,
        "gammas": gammas,
        "steps": int(opt.steps_taken),
        "losses": losses,
        "skipped_by_alig": int(opt.steps_skipped or 0),
    }


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def trainer_run(
    stage: int, gas: int, out_dir: str, *, own_optimizer: bool = False, **overrides: Any
) -> dict[str, Any]:
    """``AliGTrainer`` with ``TrainingArguments(deepspeed=config)``: Trainer's sequential
    sampler hands the ranks consecutive micro-batches, so each optimizer step's micro-batches
    make up one global batch of ``make_data``."""
    import transformers
    from accelerate.state import AcceleratorState, GradientState

    from alig_torch import AliG
    from alig_torch.integrations.transformers import AliGTrainer

    class TinyConfig(transformers.PretrainedConfig):
        model_type = "alig-tiny-deepspeed"

    class Tiny(transformers.PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config: TinyConfig) -> None:
            super().__init__(config)
            self.net = make_model()

        def _init_weights(self, module: torch.nn.Module) -> None:
            pass

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    gammas: list[float] = []

    class Gammas(transformers.TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            gammas.append(float(alig.gamma))

    config = ds_config(stage, gas, **overrides)
    config.pop("zero_allow_untested_optimizer")  # Trainer sets it for an optimizer of its own
    args = transformers.TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=GLOBAL_BATCH // WORLD // gas,
        gradient_accumulation_steps=gas,
        max_steps=STEPS,
        learning_rate=KWARGS["max_lr"],
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        deepspeed=config,
    )
    model = Tiny(TinyConfig())
    alig: Any = None
    try:
        trainer = AliGTrainer(
            model=model,
            args=args,
            train_dataset=_Rows(*make_data()),
            callbacks=[Gammas()],
            alig_kwargs={k: v for k, v in alig_kwargs(stage).items() if k != "max_lr"},
            optimizers=(AliG(model.parameters(), **KWARGS), None)
            if own_optimizer
            else (None, None),
        )
        original = trainer.create_optimizer

        def create_optimizer(*a: Any, **k: Any) -> Any:
            nonlocal alig
            alig = original(*a, **k)
            return alig

        trainer.create_optimizer = create_optimizer  # type: ignore[method-assign]
        start = [p.detach().clone() for p in model.parameters()]
        try:
            trainer.train()
        except (ValueError, RuntimeError) as error:
            engine = trainer.model_wrapped
            now = whole_params(engine) if hasattr(engine, "module") else start
            moved = any(not torch.equal(a, b) for a, b in zip(start, now, strict=True))
            return {"error": f"{type(error).__name__}: {error}", "moved": moved}
        except AssertionError:
            raise
        engine = trainer.model_wrapped
        params = whole_params(engine)
        engine.destroy()
        gc.collect()
        return {
            "params": params,
            "gammas": gammas,
            "steps": int(alig.steps_taken),
            "partitioned": alig.partitioned,
        }
    except ValueError as error:  # refused by AliGTrainer(...) itself
        return {"error": f"ValueError: {error}", "moved": False}
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


def runs(rank: int, out_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for stage in STAGES:
        for gas in ACCUMULATION:
            results[f"hand-stage{stage}-gas{gas}"] = hand_loop(stage, gas, rank)
            results[f"trainer-stage{stage}-gas{gas}"] = trainer_run(stage, gas, out_dir)
    for gas in ACCUMULATION:  # stage 3's padding holding inf at the start
        results[f"garbage-stage3-gas{gas}"] = hand_loop(3, gas, rank, garbage=True)
    for stage in (0, 2):  # a non-finite gradient at step SKIPPED
        results[f"skipped-stage{stage}"] = hand_loop(stage, 2, rank, poison=SKIPPED)
    return results


REFUSALS: dict[str, Callable[[int, str], dict[str, Any]]] = {
    # DeepSpeed's default clipping (the key absent), at stage 0 and under ZeRO
    "default-clipping-stage0": lambda r, o: hand_loop(0, 1, r, gradient_clipping=None),
    "clipping-stage2": lambda r, o: hand_loop(2, 2, r, gradient_clipping=1.0),
    # the loss handed over by hand: right (divided by gas) or not, DeepSpeed drives the step
    "by-hand-stage0": lambda r, o: hand_loop(0, 2, r, form="add_loss"),
    "unscaled-default-clipping-stage1": lambda r, o: hand_loop(
        1, 2, r, form="unscaled", gradient_clipping=None
    ),
    "no-loss-stage2": lambda r, o: hand_loop(2, 1, r, form="none"),
    # the helper on an engine without AliG
    "sgd-stage1": lambda r, o: hand_loop(1, 1, r, form="sgd"),
    # ZeRO's step() per param group and per sub-group
    "param-groups-stage1": lambda r, o: hand_loop(1, 1, r, groups=2),
    "param-groups-stage2": lambda r, o: hand_loop(2, 2, r, groups=2),
    "sub-groups-stage3": lambda r, o: hand_loop(
        3, 1, r, zero_optimization={"stage": 3, "sub_group_size": 20}
    ),
    # partitioned against the stage
    "not-partitioned-stage2": lambda r, o: hand_loop(
        2, 1, r, alig_overrides={"partitioned": False}
    ),
    "partitioned-stage0": lambda r, o: hand_loop(0, 1, r, alig_overrides={"partitioned": True}),
    # precisions and offload
    "bf16-stage2": lambda r, o: hand_loop(2, 1, r, bf16={"enabled": True}),
    # DeepSpeed refuses fp16 on a CPU without fp16 kernels ("Type fp16 is not supported on
    # your device"): the engine is built in float32 and its config then says fp16, which
    # is what the check reads (engine.fp16_enabled()).
    "fp16-stage0": lambda r, o: hand_loop(0, 1, r, fp16_flag=True),
    "torch-autocast-stage1": lambda r, o: hand_loop(
        1, 1, r, torch_autocast={"enabled": True, "dtype": "bfloat16"}
    ),
    "offload-optimizer-stage2": lambda r, o: hand_loop(
        2,
        1,
        r,
        zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}},
        zero_force_ds_cpu_optimizer=False,
    ),
    "offload-param-stage3": lambda r, o: hand_loop(
        3,
        1,
        r,
        zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}},
        zero_force_ds_cpu_optimizer=False,
    ),
    # AliGTrainer: DeepSpeed's own optimizer, its default clipping, an optimizer of your own
    "trainer-optimizer-section": lambda r, o: trainer_run(
        0, 1, o, optimizer={"type": "AdamW", "params": {"lr": 1e-3}}
    ),
    "trainer-default-clipping": lambda r, o: trainer_run(2, 1, o, gradient_clipping=None),
    "trainer-own-optimizer": lambda r, o: trainer_run(1, 1, o, own_optimizer=True),
}


def refusals(rank: int, out_dir: str) -> dict[str, Any]:
    return {name: case(rank, out_dir) for name, case in REFUSALS.items()}


def _rank(rank: int, port: int, part: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    import deepspeed
    import deepspeed.comm.torch

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no C++ compile
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    import torch.distributed as dist

    try:
        parts = {"runs": runs, "refusals": refusals}
        if part == "all":
            results = {name: run(rank, out_dir) for name, run in parts.items()}
        else:
            results = parts[part](rank, out_dir)
    except BaseException:
        traceback.print_exc()
        raise
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, Path(out_dir) / f"{part}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    out, which = sys.argv[1], sys.argv[2]
    mp.spawn(_rank, args=(_free_port(), which, out), nprocs=WORLD, join=True)
