"""accelerate: :func:`backward` in place of ``accelerator.backward(loss)``.

``AcceleratedOptimizer.step(closure=None)`` passes no keyword on, so ``opt.step(loss=loss)``
cannot reach ALI-G; with ``Accelerator(gradient_accumulation_steps=k)``,
``accelerator.backward(loss)`` backpropagates ``loss / k`` and ``opt.step()`` steps on every
k-th micro-batch only. :func:`backward` hands ALI-G the loss exactly as accelerate
backpropagates it, and ``opt.step()`` then uses the sum::

    from alig_torch.integrations.accelerate import backward

    for x, y in loader:
        with accelerator.accumulate(model):
            loss = loss_fn(model(x), y)
            backward(accelerator, loss, opt)   # instead of accelerator.backward(loss)
            opt.step()
            opt.zero_grad()

The same lines work without ``gradient_accumulation_steps`` (and without ``accumulate``).
"""

from __future__ import annotations

from typing import Any

import torch

from alig_torch.integrations._find import alig_optimizers

__all__ = ["backward"]

_REFUSED = ("DEEPSPEED", "MEGATRON_LM")
"""Distributed types whose backward does its own loss scaling (or none at all)."""


def backward(accelerator: Any, loss: torch.Tensor, optimizer: Any, **kwargs: Any) -> None:
    """``accelerator.backward(loss, **kwargs)``, handing ALI-G the loss it backpropagates.

    accelerate divides the loss by ``accelerator.gradient_accumulation_steps`` before
    backpropagating it; the same quotient is added to each AliG optimizer in ``optimizer``
    (:meth:`alig_torch.AliG.add_loss`), so that the step, when accelerate lets it happen,
    uses the sum of the losses of the accumulated gradient. Under fp16 mixed precision the
    loss added is the unscaled one.

    Args:
      accelerator: the ``accelerate.Accelerator``.
      loss: the micro-batch's loss, as you would pass it to ``accelerator.backward``.
      optimizer: the prepared optimizer (an ``AcceleratedOptimizer`` wrapping an AliG), an
        AliG, or a list of them.
      **kwargs: passed on to ``accelerator.backward``.

    Raises:
      ValueError: when ``optimizer`` holds no AliG, or under DeepSpeed or Megatron-LM
        (whose backward scales the loss itself).
    """
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind in _REFUSED:
        raise ValueError(
            f"alig_torch.integrations.accelerate.backward does not support "
            f"distributed_type={kind}: its engine scales the loss itself, so the loss ALI-G "
            "would get could not be the one backpropagated. Use DDP or FSDP."
        )
    optimizers = alig_optimizers(optimizer)
    if not optimizers:
        raise ValueError(
            "alig_torch.integrations.accelerate.backward(accelerator, loss, optimizer) got no "
            f"alig_torch.AliG in optimizer={type(optimizer).__name__}; pass the optimizer "
            "accelerator.prepare() returned for your AliG."
        )
    backpropagated = loss / accelerator.gradient_accumulation_steps  # as accelerate does
    for alig in optimizers:
        alig.add_loss(backpropagated)
    accelerator.backward(loss, **kwargs)
