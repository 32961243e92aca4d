"""DeepSpeed: :func:`backward` in place of ``engine.backward(loss)``.

DeepSpeed's engine calls the client optimizer's ``step()`` itself, so ALI-G must get the
loss of each backward pass beforehand, exactly as the engine backpropagates it (divided by
``gradient_accumulation_steps``). :func:`backward` does that, and first checks that
DeepSpeed's configuration lets ALI-G take the step of one process on the global batch::

    import deepspeed
    from alig_torch import AliG
    from alig_torch.integrations.deepspeed import backward

    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "gradient_clipping": 0.0,            # DeepSpeed clips at 1.0 by default
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    opt = AliG(model.parameters(), max_lr=1.0, momentum=0.9,
               partitioned=True)                   # ZeRO stages 1-3; False at stage 0
    engine, _, loader, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=config, training_data=data)
    for x, y in loader:
        loss = loss_fn(engine(x), y)
        backward(engine, loss)                     # instead of engine.backward(loss)
        engine.step()

Supported: ZeRO stages 0, 1, 2 and 3 in float32, with and without
``gradient_accumulation_steps``, with one param group (stages 1 and 2 call ``step()`` once
per group) and one stage-3 sub-group. Refused, on every rank before any parameter moves,
with the config key to set: gradient clipping, fp16, bf16, torch_autocast, CPU or NVMe
offload, ZenFlow, several param groups under stages 1 and 2, several stage-3 sub-groups,
model or pipeline parallelism, and ``partitioned`` not matching the stage. Under stage 3
the padding of the partitions (uninitialized memory) is set to zero before each backward
pass, so that ALI-G's norms see the parameters only. A step that
DeepSpeed drives without this function raises in ``AliG.step`` (docs/guides/deepspeed.md).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from alig_torch._deepspeed_guard import hand_over
from alig_torch._optimizer import AliG
from alig_torch.integrations._find import alig_optimizers

__all__ = ["backward", "check_engine", "hand_over_loss", "stage3_padding"]

_STEPS_OF_LAST_LOSS: weakref.WeakKeyDictionary[AliG, int] = weakref.WeakKeyDictionary()
"""For each AliG, the engine's ``global_steps`` when it was last handed a loss: a change
with losses still pending means DeepSpeed skipped the step (an overflow), whose losses then
do not belong to the next one."""


_PADDING: weakref.WeakKeyDictionary[Any, list[torch.Tensor]] = weakref.WeakKeyDictionary()
"""For each stage-3 engine, :func:`stage3_padding` (found once)."""


def _offload_device(offload: Any) -> str:
    if offload is None:
        return "none"
    device = getattr(offload, "device", "none")
    return str(getattr(device, "value", device)).lower()


def _config_problem(engine: Any, alig: AliG) -> str | None:
    """What in ``engine``'s configuration would change ALI-G's step; ``None`` if nothing."""
    clipping = float(engine.gradient_clipping() or 0.0)
    if clipping > 0:
        return (
            f'DeepSpeed clips the gradient to norm {clipping} ("gradient_clipping": {clipping};'
            " 1.0 when the key is absent) before ALI-G sees it, so ALI-G would take its step "
            "size from the clipped gradient's norm with the loss of the unclipped one. Set "
            '"gradient_clipping": 0.0 in the DeepSpeed config: ALI-G\'s step is already '
            "bounded by max_lr; to constrain the weights, use AliG's max_norm."
        )
    if engine.fp16_enabled():
        return (
            'DeepSpeed\'s fp16 mode ("fp16": {"enabled": true}) is not supported with ALI-G: '
            "it keeps fp16 weights and steps on loss-scaled gradients through its own "
            "optimizer wrapper, whose ALI-G step alig_torch has not proven equal to the "
            'float32 one. Set "fp16": {"enabled": false} (train in float32).'
        )
    if engine.bfloat16_enabled():
        return (
            'DeepSpeed\'s bf16 mode ("bf16": {"enabled": true}) is not supported with ALI-G: '
            "its bf16 weights and gradients change the loss and the norm that ALI-G's step "
            'size is made of, a step alig_torch has not proven right. Set "bf16": '
            '{"enabled": false} (train in float32).'
        )
    if engine.torch_autocast_enabled():
        return (
            'DeepSpeed\'s "torch_autocast" mode steps the optimizer through a GradScaler '
            "with loss-scaled gradients, which alig_torch does not support under DeepSpeed. "
            'Set "torch_autocast": {"enabled": false}.'
        )
    for key, offload in (
        ("offload_optimizer", engine.zero_offload_optimizer()),
        ("offload_param", engine.zero_offload_param()),
    ):
        device = _offload_device(offload)
        if device != "none":
            return (
                f'DeepSpeed offload ("zero_optimization": {{"{key}": {{"device": "{device}"}}}})'
                " is not supported with ALI-G: DeepSpeed steps offloaded partitions through "
                "its own CPU optimizer path, which alig_torch has not proven to give ALI-G's "
                f'step. Set "zero_optimization": {{"{key}": {{"device": "none"}}}}.'
            )
    if getattr(engine, "zenflow", False):
        return (
            'DeepSpeed ZenFlow ("zero_optimization": {"zenflow": ...}) steps parts of the '
            "model at different times, which cannot be one ALI-G step. Remove the zenflow "
            "section of the DeepSpeed config."
        )
    stage = int(engine.zero_optimization_stage() or 0)
    if stage >= 1 and alig.partitioned is not True:
        return (
            f'Under DeepSpeed ZeRO ("zero_optimization": {{"stage": {stage}}}) each rank\'s '
            "optimizer holds only its partition of the parameters, so ALI-G must add the "
            f"squared gradient norms over the ranks: build AliG(..., partitioned=True) (got "
            f"partitioned={alig.partitioned})."
        )
    if stage == 0 and alig.partitioned:
        return (
            'Under DeepSpeed without ZeRO ("zero_optimization": {"stage": 0}) every rank '
            "holds every parameter and the same all-reduced gradient: build AliG(..., "
            "partitioned=False) (got partitioned=True)."
        )
    if stage in (1, 2) and len(alig.param_groups) > 1:
        return (
            f'DeepSpeed ZeRO stage {stage} ("zero_optimization": {{"stage": {stage}}}) calls '
            f"the optimizer's step() once per param group, and this AliG has "
            f"{len(alig.param_groups)}: each call would see one group's gradient, not the "
            "global norm, and the groups would take different step sizes. Build AliG with "
            "one param group (AliG(model.parameters(), ...); AliGTrainer does), or use "
            '"zero_optimization": {"stage": 0}.'
        )
    if stage == 3:
        sub_groups = len(getattr(engine.optimizer, "fp16_groups", ()))
        if sub_groups > 1:
            return (
                "DeepSpeed ZeRO stage 3 calls the optimizer's step() once per sub-group, and "
                f"this model has {sub_groups} (more than one param group, or a "
                '"zero_optimization": {"sub_group_size": ...} smaller than this rank\'s '
                "partition): each call would see one sub-group's gradient, not the global "
                "norm. Build AliG with one param group and set "
                '"zero_optimization": {"sub_group_size": N} with N at least the number of '
                "parameters (its default, 1e9, is)."
            )
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    data_parallel = int(getattr(engine, "dp_world_size", world) or world)
    if data_parallel != world and alig.process_group is None:
        return (
            f"DeepSpeed splits the batch over {data_parallel} data-parallel ranks of "
            f"{world} (model, pipeline or sequence parallelism), but AliG averages the loss "
            "over all of them: alig_torch supports DeepSpeed's data parallelism only. Train "
            "without model, pipeline or sequence parallelism."
        )
    return None


def check_engine(engine: Any, optimizer: Any = None) -> list[AliG]:
    """The AliG optimizers of ``engine`` (or in ``optimizer``), once their config is checked.

    The checks read DeepSpeed's configuration and the optimizer's settings, the same on
    every rank: every rank raises the same error at the same place, before any collective.

    Raises:
      ValueError: naming DeepSpeed's config key and the value to set (see the module).
    """
    optimizers = alig_optimizers(engine.optimizer if optimizer is None else optimizer)
    if not optimizers:
        given = engine.optimizer if optimizer is None else optimizer
        raise ValueError(
            "alig_torch.integrations.deepspeed.backward(engine, loss) found no "
            f"alig_torch.AliG in {type(given).__name__}; pass AliG(...) as "
            'deepspeed.initialize(optimizer=...) (with no "optimizer" section in the config).'
        )
    for alig in optimizers:
        problem = _config_problem(engine, alig)
        if problem is not None:
            raise ValueError(problem)
    return optimizers


def stage3_padding(engine: Any) -> list[torch.Tensor]:
    """The padding of this rank's ZeRO stage-3 partitions: views into the flat partitions.

    Stage 3 pads the partition of a parameter whose size the ranks do not divide (on the
    last ranks), with uninitialized memory (``torch.empty``). The optimizer steps the
    whole flat partition, so the padding is part of ALI-G's parameter norm (``max_norm``).
    """
    optimizer = engine.optimizer
    rank = torch.distributed.get_rank(group=optimizer.dp_process_group)
    padding = []
    for sub_group, flat in zip(
        optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat, strict=True
    ):
        offset = 0
        for param in sub_group:
            size = int(param.partition_numel())  # the same on every rank
            held = min(max(int(param.ds_numel) - rank * size, 0), size)
            if held < size:
                padding.append(flat.narrow(0, offset + held, size - held))
            offset += size
    return padding


def hand_over_loss(
    engine: Any, loss: torch.Tensor, optimizer: Any = None, *, scale_wrt_gas: bool = True
) -> None:
    """Checks the config and adds the loss ``engine.backward`` will backpropagate to ALI-G.

    The loss added is ``loss / gradient_accumulation_steps`` (``loss`` itself with
    ``scale_wrt_gas=False``, as ``engine.backward`` takes it), unscaled. Under ZeRO stage
    3 the padding of the partitions is zeroed (:func:`stage3_padding`).
    """
    optimizers = check_engine(engine, optimizer)
    if int(engine.zero_optimization_stage() or 0) == 3:
        padding = _PADDING.get(engine)
        if padding is None:  # views into the flat partitions, which stay in place
            padding = _PADDING[engine] = stage3_padding(engine)
        with torch.no_grad():  # zeros count for nothing in ALI-G's norms
            for pad in padding:
                pad.zero_()
    backpropagated = loss / engine.gradient_accumulation_steps() if scale_wrt_gas else loss
    steps = int(engine.global_steps)
    for alig in optimizers:
        if _STEPS_OF_LAST_LOSS.get(alig, steps) != steps:
            alig._accumulation.forget()  # losses of a step DeepSpeed skipped
        _STEPS_OF_LAST_LOSS[alig] = steps
        hand_over(alig)
        alig.add_loss(backpropagated)


def backward(engine: Any, loss: torch.Tensor, optimizer: Any = None, **kwargs: Any) -> Any:
    """``engine.backward(loss, **kwargs)``, handing ALI-G the loss it backpropagates.

    Call it in place of ``engine.backward(loss)``, then ``engine.step()`` as usual: DeepSpeed
    steps ALI-G on the gradient accumulation boundary with the sum of the losses added
    since the last step, the loss of the accumulated gradient.

    Args:
      engine: the ``deepspeed.DeepSpeedEngine`` that ``deepspeed.initialize`` returned.
      loss: the micro-batch's loss, as you would pass it to ``engine.backward``.
      optimizer: where the AliG is (an AliG, DeepSpeed's wrapper, or a list); by default
        ``engine.optimizer``.
      **kwargs: passed on to ``engine.backward`` (``scale_wrt_gas=False``: the loss is
        neither divided for the backward pass nor for ALI-G).

    Returns:
      What ``engine.backward`` returns.

    Raises:
      ValueError: no AliG, or a DeepSpeed configuration that would change ALI-G's step
        (gradient clipping, fp16, bf16, offload, several param groups or sub-groups, ...),
        naming the config key and the value to set, before the backward pass.
    """
    hand_over_loss(engine, loss, optimizer, scale_wrt_gas=kwargs.get("scale_wrt_gas", True))
    return engine.backward(loss, **kwargs)
