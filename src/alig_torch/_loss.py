"""The loss a step is handed: taken in, checked, made a 0-d tensor (AliG and Extrapolation).

``docs/specification.md``, "How the loss reaches the optimizer": the loss is the real
scalar that was differentiated, a float or a 0-d tensor; with gradient accumulation, the
sum of the losses of the backward passes. Converting it makes no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from alig_core._config import describe_value
from alig_torch._accumulation import Accumulation, count_mismatch_message

__all__ = ["LossIntake", "LossNames", "loss_as_tensor", "summed_losses"]


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


class LossNames(NamedTuple):
    """How the messages of one optimizer's loss intake name it."""

    step: str
    """The method handed the loss (``"AliG.step"``, ``"Extrapolation.step"``)."""
    who: str
    """The optimizer, as :func:`loss_as_tensor` names it (``"ALI-G"``, ``"Extrapolation"``)."""
    no_loss: str
    """The error where a loss is needed and none was handed over."""
    loss_help: str
    """How to hand the loss over, appended to the errors."""


class LossIntake:
    """The loss of a step, one piece for :class:`AliG` and :class:`Extrapolation`.

    In the order :meth:`AliG.step` documents: the losses added with :meth:`add` since the
    last step (a closure's return value is then ignored), else ``loss=`` (a list: summed),
    else the closure's return value; ``step(loss)`` with a loss that is not callable is
    ``step(loss=loss)``. Where the accumulation counts the backward passes that reached the
    parameters (AliG's hooks), the number of losses handed over must match them. The
    wrapper around AliG shares AliG's intake (the same added losses, the same count); around
    another base it has one of its own that counts nothing.

    Args:
      accumulation: the pending losses and the backward-pass counter.
      device_and_dtype: where the losses are summed (called when one is converted).
    """

    def __init__(
        self,
        accumulation: Accumulation,
        device_and_dtype: Callable[[], tuple[torch.device, torch.dtype]],
    ) -> None:
        self.accumulation = accumulation
        self.device_and_dtype = device_and_dtype

    def add(self, loss: Any, names: LossNames) -> None:
        """Adds the loss of one backward pass (checked now, detached, summed as a 0-d tensor)."""
        device, dtype = self.device_and_dtype()
        self.accumulation.add(
            loss_as_tensor(loss, device, dtype, who=names.who, loss_help=names.loss_help)
        )

    def forget(self) -> None:
        """Drops the added losses and the count (the gradients they belong to are gone)."""
        self.accumulation.forget()

    @staticmethod
    def evaluate(closure: Any, loss: Any, names: LossNames) -> tuple[Any, Any, Any]:
        """``(closure, the closure's loss, loss=)``, the closure called.

        A loss given positionally (not callable) is moved to ``loss=``; the closure is
        called under ``torch.enable_grad()``.
        """
        if closure is not None and not callable(closure):
            if loss is not None:  # step(loss): a loss handed over positionally
                raise ValueError(
                    f"{names.step}() got a loss positionally ({describe_value(closure)}) and "
                    f"loss= as well; give it once. {names.loss_help}"
                )
            closure, loss = None, closure
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        return closure, closure_loss, loss

    def resolve(
        self, closure: Any, closure_loss: Any, loss: Any, names: LossNames, *, required: bool
    ) -> Any:
        """The loss the step uses (``None`` where none is handed over and none is required).

        Checks the count of the losses against the backward passes, and forgets the added
        losses and the count either way.

        Raises:
          ValueError: the loss handed over two ways, none where one is required, an empty
            list, or as many losses as backward passes.
        """
        pending = self.accumulation
        try:
            used, given, how = self._loss_of_step(closure, closure_loss, loss, names, required)
            message = count_mismatch_message(given, how, *pending.backward_passes(), names.step)
            if message is not None:
                raise ValueError(message)
        finally:
            pending.forget()
        return used

    def _loss_of_step(
        self, closure: Any, closure_loss: Any, loss: Any, names: LossNames, required: bool
    ) -> tuple[Any, int, str]:
        """The loss the step uses, how many backward passes' losses it sums, and whence."""
        pending = self.accumulation
        if pending.added:
            if loss is not None:
                added = "1 loss" if pending.added == 1 else f"{pending.added} losses"
                raise ValueError(
                    f"{names.step}() got loss= and also {added} added with add_loss() since "
                    "the last step; hand the loss over one way: either add the loss of every "
                    "backward pass with add_loss() and call step(), or pass them all as "
                    "step(loss=...)."
                )
            return pending.total, pending.added, "added with add_loss()"
        if loss is not None:
            if closure_loss is not None:
                raise ValueError(
                    f"{names.step}() got both a closure and loss=, and the closure returned a "
                    f"loss; give one. {names.loss_help}"
                )
            if isinstance(loss, list | tuple):
                device, dtype = self.device_and_dtype()
                total = summed_losses(
                    loss,
                    device,
                    dtype,
                    who=names.who,
                    step_name=names.step,
                    loss_help=names.loss_help,
                )
                return total, len(loss), "as a list, loss=[...]"
            return loss, 1, "loss="
        if closure_loss is not None:
            return closure_loss, 1, "the closure's"
        if not required:
            return None, 0, "none"
        if closure is not None:
            raise ValueError(
                f"The closure passed to {names.step}() returned None. {names.loss_help}"
            )
        raise ValueError(names.no_loss)
