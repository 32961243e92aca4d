"""Lightning: :class:`AliGCallback` hands ALI-G every loss Lightning backpropagates.

Lightning's automatic optimization passes ALI-G a closure, which is enough without
accumulation. With ``Trainer(accumulate_grad_batches=k)`` the gradient is the sum of k
backward passes but the closure returns only the last micro-batch's loss (divided by k),
and Lightning's fp16 AMP plugin calls ``scaler.step(opt)`` with no loss at all. The
callback adds each loss Lightning is about to backpropagate (``on_before_backward``,
unscaled under a ``GradScaler``) to the AliG optimizers, so their step uses the sum::

    import lightning as L
    from alig_torch.integrations.lightning import AliGCallback

    trainer = L.Trainer(accumulate_grad_batches=4, callbacks=[AliGCallback()])

In manual optimization the callback does nothing: hand the loss over yourself,
``self.manual_backward(loss); opt.step(loss=loss)``, or, accumulating,
``opt.add_loss(loss)`` after each ``manual_backward`` and ``opt.step()``.

The callback refuses ``Trainer(gradient_clip_val=...)``: clipping changes the gradient
before ALI-G takes its norm, so the step size would no longer be the one of the loss.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from alig_torch._optimizer import AliG
from alig_torch.integrations._find import alig_optimizers

__all__ = ["AliGCallback"]


def _unscaled(loss: torch.Tensor, trainer: pl.Trainer) -> torch.Tensor:
    """``loss`` divided by the precision plugin's loss scale, if it has an enabled scaler.

    The scale is a power of two (GradScaler's growth and backoff factors are 2 and 0.5 by
    default), so the division gives back the loss exactly.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return loss
    scale = getattr(scaler, "_scale", None)  # the tensor scale() multiplied by: no host sync
    if not isinstance(scale, torch.Tensor):
        scale = scaler.get_scale()
        return loss.detach() / scale
    return loss.detach() / scale.to(device=loss.device).reshape(())


class AliGCallback(pl.Callback):
    """Adds every loss Lightning backpropagates to the AliG optimizers (automatic optimization).

    Lightning calls ``on_before_backward(trainer, pl_module, loss)`` with the loss exactly
    as it is about to backpropagate it (divided by ``accumulate_grad_batches``, scaled
    under fp16 AMP); the callback unscales it and calls :meth:`AliG.add_loss` on each AliG
    optimizer of the trainer. ALI-G's step then uses the sum of these losses, the loss of
    the accumulated gradient, and ignores the closure's value.

    Raises:
      ValueError: at ``fit``, when the trainer clips gradients (``gradient_clip_val``) or
        has no AliG optimizer.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuses gradient clipping, which would change the gradient ALI-G takes the norm of."""
        clip = trainer.gradient_clip_val
        if clip is not None and clip != 0:
            raise ValueError(
                f"Trainer(gradient_clip_val={clip}) clips the gradient before ALI-G takes its "
                "norm, so the step size would not be that of the loss and gradient of the "
                "batch. Leave gradient_clip_val unset (None or 0): ALI-G's step is bounded by "
                "max_lr; to constrain the weights, use AliG(max_norm=...)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks that there is an AliG optimizer to hand the losses to."""
        if not self._optimizers(trainer):
            raise ValueError(
                "AliGCallback found no alig_torch.AliG among the trainer's optimizers "
                f"({[type(o).__name__ for o in trainer.optimizers]}); return an AliG from "
                "configure_optimizers(), or remove the callback."
            )

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        """Adds the (unscaled) loss Lightning is about to backpropagate to the AliG optimizers."""
        if not pl_module.automatic_optimization:
            return  # manual optimization: the training step hands the loss over itself
        loss = _unscaled(loss, trainer)
        for optimizer in self._optimizers(trainer):
            optimizer.add_loss(loss)

    @staticmethod
    def _optimizers(trainer: Any) -> list[AliG]:
        return alig_optimizers(list(trainer.optimizers))
