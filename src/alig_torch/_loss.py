"""The loss a step is handed, checked and made a detached 0-d tensor (AliG and Extrapolation).

``docs/specification.md``, "How the loss reaches the optimizer": the loss is the real
scalar that was differentiated, a float or a 0-d tensor; with gradient accumulation, the
sum of the losses of the backward passes. Converting it makes no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["loss_as_tensor", "summed_losses"]


def loss_as_tensor(
    loss: Any, device: torch.device, dtype: torch.dtype, *, who: str, loss_help: str
) -> torch.Tensor:
    """Checks ``loss`` and returns it as a detached 0-d tensor on ``device`` in ``dtype``.

    Args:
      loss: a float or a one-element real tensor.
      device: where the step's numbers live.
      dtype: the accumulation dtype.
      who: the optimizer, as the messages name it (``"ALI-G"``, ``"Extrapolation"``).
      loss_help: how to hand the loss over, appended where the loss is not a number.

    Raises:
      ValueError: a tensor of more than one entry, of a complex or bool dtype, or a value
        that is not a real number; the message says what was given and what to pass.
    """
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"{who} needs the loss as a scalar, one real scalar; got a tensor of shape "
                f"{tuple(loss.shape)}. Reduce it first (e.g. loss.mean()) and pass the value "
                "that was differentiated."
            )
        if loss.is_complex() or loss.dtype == torch.bool:
            raise ValueError(
                f"{who} needs a real-valued loss, got a tensor of dtype {loss.dtype}. "
                "Pass the real scalar that was differentiated."
            )
        return loss.detach().reshape(()).to(device=device, dtype=dtype)
    if isinstance(loss, bool) or not isinstance(loss, int | float):
        raise ValueError(
            f"{who} needs the loss as a real scalar, a float or a 0-d tensor; got {loss!r} "
            f"(type {type(loss).__name__}). {loss_help}"
        )
    return torch.tensor(float(loss), device=device, dtype=dtype)


def summed_losses(
    losses: Sequence[Any],
    device: torch.device,
    dtype: torch.dtype,
    *,
    who: str,
    step_name: str,
    loss_help: str,
) -> torch.Tensor:
    """The loss of an accumulated gradient: the sum of the losses of its backward passes.

    Args:
      losses: one loss per backward pass, each as :func:`loss_as_tensor` takes it.
      device: where the step's numbers live.
      dtype: the accumulation dtype.
      who: the optimizer, as the messages name it.
      step_name: the method given the list, for the message (``"AliG.step"``).
      loss_help: how to hand the loss over.

    Raises:
      ValueError: an empty list, or a loss :func:`loss_as_tensor` refuses.
    """
    if not losses:
        raise ValueError(
            f"{step_name}(loss=[]) got an empty list of losses; pass the loss of every "
            f"backward pass that accumulated the gradient. {loss_help}"
        )
    rules = {"who": who, "loss_help": loss_help}
    total = loss_as_tensor(losses[0], device, dtype, **rules)
    for item in losses[1:]:
        total = total + loss_as_tensor(item, device, dtype, **rules)
    return total
