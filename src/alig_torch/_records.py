"""AliG's monitoring records: where they live (each param group) and how a step moves them.

The transitions are :func:`alig_core._math.record_step`'s; this module keeps the tensors they are
written to and the read-only properties (``opt.gamma`` etc.) that show them.
"""

from __future__ import annotations

from typing import Any, overload

import torch
from torch.optim.optimizer import Optimizer

import alig_core
from alig_core._math import Records, record_step
from alig_torch._functional import StepPath

__all__ = ["RecordProperty", "stored_shape", "write_records"]

RECORD_DOCS = {
    "gamma": "The step size of the last step taken (first group), a 0-d tensor.",
    "gamma_hat": "The Polyak step before clamp and cap, of the last step taken (first group).",
    "capped": "Whether the last step taken hit the cap (first group), a 0-d bool tensor.",
    "steps_taken": "How many steps were taken (not skipped), a 0-d int64 tensor.",
    "steps_skipped": "How many steps were skipped (non-finite loss or gradient), 0-d int64.",
}


class RecordProperty:
    """An optimizer property: a record of the first param group, as a 0-d view (no copy).

    ``None`` before the first step. The records live in each group (:func:`write_records`).
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name
        self.__doc__ = RECORD_DOCS[name]

    @overload
    def __get__(self, optimizer: None, owner: type) -> RecordProperty: ...

    @overload
    def __get__(self, optimizer: Optimizer, owner: type | None = None) -> torch.Tensor | None: ...

    def __get__(self, optimizer: Optimizer | None, owner: type | None = None) -> Any:
        if optimizer is None:
            return self
        value = optimizer.param_groups[0].get(self.key) if optimizer.param_groups else None
        return None if value is None else value.view(())


def stored_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape in which a tensor of ``p``'s shape is kept in the optimizer's state.

    A 0-d float CPU tensor in optimizer state is not mutable inside ``torch.compile``
    (dynamo takes it for a Python scalar and drops in-place writes to it:
    ``test_compiled_step_equals_eager_without_recompiling``, whose parameters include a
    0-d one), so 0-d state is kept with shape ``(1,)`` and viewed as 0-d for the math.
    """
    return (1,) if p.dim() == 0 else tuple(p.shape)


def ensure_records(group: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
    """Creates ``group``'s monitoring records (zeros), once.

    They are 1-element tensors, not 0-d ones: see :func:`stored_shape`.
    """
    if "gamma" not in group:
        group["gamma"] = torch.zeros(1, dtype=dtype, device=device)
        group["gamma_hat"] = torch.zeros(1, dtype=dtype, device=device)
        group["capped"] = torch.zeros(1, dtype=torch.bool, device=device)
        group["steps_taken"] = torch.zeros(1, dtype=torch.int64, device=device)
        group["steps_skipped"] = torch.zeros(1, dtype=torch.int64, device=device)


def write_records(
    group: dict[str, Any],
    size: alig_core.StepSize,
    path: StepPath,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Moves ``group``'s records (:class:`alig_core._math.Records`) with the core's ``record_step``.

    Off the host path the 1-element tensors are the core's arrays, written back with
    ``copy_`` (no host synchronisation). On the host path the core picks between the step's
    Python numbers and the stored tensors themselves (handed back untouched where the step
    is skipped, and then not written); ``capped`` and the counters are read as Python
    numbers (no synchronisation on the CPU) and written only where they changed.
    """
    ensure_records(group, device, dtype)
    gamma, gamma_hat, capped, taken, skips = (group[key] for key in Records._fields)
    if path.on_host:
        old = Records(gamma, gamma_hat, capped.item(), taken.item(), skips.item())
    else:
        old = Records(gamma, gamma_hat, capped, taken, skips)
    new = record_step(path.xp, old, size)
    for key, before, after in zip(Records._fields, old, new, strict=True):
        if after is before:
            continue
        if isinstance(after, torch.Tensor):
            group[key].copy_(after)
        else:
            group[key].fill_(after)
