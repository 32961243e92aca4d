"""Whether DeepSpeed steps an AliG whose loss did not come through DeepSpeed's integration.

DeepSpeed's engine calls the client optimizer's ``step()`` itself, after changing what the
optimizer sees: it clips the gradient (``gradient_clipping``, 1.0 by default), divides the
backpropagated loss by ``gradient_accumulation_steps``, and under ZeRO calls ``step()`` once
per param group (stages 1 and 2) or per sub-group (stage 3). A loss added by hand with
:meth:`AliG.add_loss` cannot know about any of it, so a step driven by DeepSpeed must get its
loss from :func:`alig_torch.integrations.deepspeed.backward`, which checks DeepSpeed's
configuration and hands ALI-G the loss as DeepSpeed backpropagates it. This module holds the
optimizers that function has checked, and tells :meth:`AliG.step` when DeepSpeed is its
caller: without ``deepspeed`` imported it costs a dictionary lookup.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

__all__ = ["DEEPSPEED_HELP", "check_stepped_by_deepspeed", "hand_over"]

DEEPSPEED_HELP = (
    "Under DeepSpeed, replace engine.backward(loss) with "
    "alig_torch.integrations.deepspeed.backward(engine, loss), then call engine.step(): it "
    "checks DeepSpeed's config (gradient_clipping must be 0.0, ...) and hands ALI-G the loss "
    "exactly as DeepSpeed backpropagates it (divided by gradient_accumulation_steps); with "
    "transformers, AliGTrainer does it."
)
"""How a DeepSpeed loop hands ALI-G its loss, named in the errors."""

_HANDED_OVER: weakref.WeakSet[Any] = weakref.WeakSet()
"""The AliG optimizers whose losses :func:`alig_torch.integrations.deepspeed.backward` adds."""

_PASS_THROUGH = ("torch.", "alig_torch.", "functools", "contextlib")
"""Modules whose frames may lie between DeepSpeed and ``AliG.step`` (torch's step hooks,
an LR scheduler's step counter)."""


def hand_over(optimizer: Any) -> None:
    """Records that DeepSpeed's integration hands ``optimizer`` its losses (checked)."""
    _HANDED_OVER.add(optimizer)


def _stepped_by_deepspeed() -> bool:
    """Whether the first caller of ``AliG.step`` outside torch and alig_torch is DeepSpeed."""
    frame = sys._getframe(2)  # AliG.step (alig_torch passes through), then its callers
    for _ in range(10):
        if frame is None:
            return False
        name = str(frame.f_globals.get("__name__", ""))
        if name.startswith("deepspeed."):
            return True
        if not name.startswith(_PASS_THROUGH):
            return False
        frame = frame.f_back  # type: ignore[assignment]
    return False


def check_stepped_by_deepspeed(optimizer: Any) -> None:
    """Refuses a step that DeepSpeed drives when the loss did not come through its helper.

    Raises:
      ValueError: DeepSpeed calls ``step()`` on an AliG that
        :func:`alig_torch.integrations.deepspeed.backward` never handed a loss.
    """
    if "deepspeed" not in sys.modules or optimizer in _HANDED_OVER:
        return
    if _stepped_by_deepspeed():
        raise ValueError(
            "DeepSpeed's engine.step() stepped this AliG, but its loss did not come through "
            "alig_torch.integrations.deepspeed.backward(engine, loss): DeepSpeed clips the "
            "gradient (gradient_clipping, 1.0 by default), divides the backpropagated loss by "
            "gradient_accumulation_steps and, under ZeRO, calls step() once per param group "
            "or sub-group, none of which a loss added by hand can follow, so ALI-G would "
            f"take a wrong step. {DEEPSPEED_HELP}"
        )
