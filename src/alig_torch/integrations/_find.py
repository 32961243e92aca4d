"""Finds the :class:`~alig_torch.AliG` optimizers inside the wrappers trainers put around them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from alig_torch._optimizer import AliG

__all__ = ["alig_optimizers"]

_WRAPPED = ("optimizer", "_optimizer")
"""Where wrappers keep the optimizer they wrap (accelerate's ``AcceleratedOptimizer``,
Lightning's ``LightningOptimizer``, DeepSpeed's and others' ``.optimizer``)."""


def _unwrap(optimizer: Any) -> AliG | None:
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, AliG):
            return optimizer
        seen.add(id(optimizer))
        optimizer = (
            next((vars(optimizer)[name] for name in _WRAPPED if name in vars(optimizer)), None)
            if hasattr(optimizer, "__dict__")
            else None
        )
    return None


def alig_optimizers(optimizers: Any) -> list[AliG]:
    """The AliG optimizers in ``optimizers`` (one optimizer, a wrapper, or an iterable)."""
    if optimizers is None:
        return []
    items: Iterable[Any] = optimizers if isinstance(optimizers, list | tuple) else [optimizers]
    found: list[AliG] = []
    for item in items:
        alig = _unwrap(item)
        if alig is not None and all(alig is not f for f in found):
            found.append(alig)
    return found
