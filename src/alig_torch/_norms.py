"""The sums of squares of a step: of the gradients (for gamma) and of the parameters (projection).

Three kernels, one per step path of :mod:`alig_torch._functional` (the same sum, taken
differently): dot products summed as Python floats on the host, ``_foreach_norm`` per
(device, dtype) on an accelerator, and a plain loop over the tensors (the reference, and
what ``torch.compile`` traces). Each counts DTensors with all their shards
(:func:`alig_torch._distributed.sharded_sum_of_squares`). :class:`Norms` gives a step
its loss and squared norms: this process's, or those the ranks agree on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch.optim.optimizer import Optimizer

import alig_core
from alig_torch import _distributed
from alig_torch._distributed import sharded_sum_of_squares, split_sharded

__all__ = [
    "Norms",
    "accumulation_dtype",
    "as_0d",
    "by_device_and_dtype",
    "foreach_sum_of_squares",
    "host_sum_of_squares",
    "loop_sum_of_squares",
]

SumOfSquares = Callable[[list[torch.Tensor], torch.dtype, torch.device], Any]
"""``(tensors, dtype, device) -> sum of squared entries`` (a float or a 0-d tensor)."""


def accumulation_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The core's accumulation dtype over the dtypes of ``tensors`` (float32 or float64)."""
    dtypes = {t.dtype for t in tensors}
    return getattr(torch, alig_core._math.accumulation_dtype(*dtypes))


def as_0d(value: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (a float or a 0-d tensor) as a 0-d tensor on ``device`` in ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.tensor(value, device=device, dtype=dtype)


def host_sum_of_squares(tensors: list[torch.Tensor], dtype: torch.dtype, device: Any) -> float:
    """One dot product per tensor in ``dtype`` (upcast only below it), summed as a float.

    The kernel of the host path (every tensor on the CPU): a BLAS dot product is
    vectorised and multi-threaded, and the sum is read back at no cost.
    """
    tensors, sharded = split_sharded(tensors)
    total = float(sharded_sum_of_squares(sharded, dtype)) if sharded else 0.0
    for tensor in tensors:
        flat = tensor.reshape(-1)
        if flat.dtype != dtype:
            flat = flat.to(dtype)
        total += float(torch.dot(flat, flat))
    return total


def _start(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> Any:
    """The plain tensors, and the running sum started with the DTensors' (a 0-d tensor)."""
    total = torch.zeros((), dtype=dtype, device=device)
    tensors, sharded = split_sharded(tensors)
    if sharded:
        total = total + sharded_sum_of_squares(sharded, dtype).to(device)
    return tensors, total


def loop_sum_of_squares(
    tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Tensor by tensor, a 0-d tensor: the reference, and what ``torch.compile`` traces.

    Compiled, inductor fuses these reductions (a compiled ``_foreach_norm`` is less
    accurate: ``test_the_norm_of_a_large_float32_gradient_is_accurate``).
    """
    tensors, total = _start(tensors, dtype, device)
    for tensor in tensors:
        total = total + tensor.to(dtype).square().sum().to(device)
    return total


def foreach_sum_of_squares(
    tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``_foreach_norm`` per (device, dtype), a 0-d tensor: no host synchronisation."""
    tensors, total = _start(tensors, dtype, device)
    for group, *_ in by_device_and_dtype([tensors]).values():
        norms = torch._foreach_norm(group, 2, dtype=dtype)
        total = total + torch.stack(norms).to(device).square().sum()
    return total


def by_device_and_dtype(
    tensor_lists: list[list[torch.Tensor]],
) -> dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]]:
    """``tensor_lists`` split by (device, dtype), as ``torch.optim``'s foreach paths do.

    Each value holds, for every list of ``tensor_lists``, its tensors on that device and of
    that dtype, in order (torch's grouping with its ``None`` placeholders and indices left out).
    """
    if not tensor_lists[0]:
        return {}
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        cast("list[list[torch.Tensor | None]]", tensor_lists)
    )
    return {
        cast("tuple[torch.device, torch.dtype]", key): [
            cast("list[torch.Tensor]", tensors) for tensors in lists
        ]
        for key, (lists, _) in grouped.items()
    }


def _plus(total: Any, sharded: torch.Tensor) -> Any:
    """``total`` (a float or a 0-d tensor) plus the DTensors' sum, in ``total``'s kind."""
    if isinstance(total, float):
        return total + float(sharded)
    return total + sharded.to(device=total.device, dtype=total.dtype)


class Norms:
    """The loss and the sums of squares of one step: this process's, or agreed by the ranks.

    With ``ranks=None`` (a single process) the local numbers, untouched. Otherwise the
    gradients and parameters are sorted into those this rank holds alone (partitioned: their
    sums are added over the ranks), those every rank holds whole (replicated: counted once)
    and DTensors (added over their own meshes), and the ranks agree on the numbers in one
    collective (:meth:`_distributed.Ranks.agree`).

    Args:
      ranks: the ranks of the step's process group, or ``None``.
      all_params: every parameter of the optimizer.
      partitioned_ids: the ids of the parameters this rank holds a part of only.
      fingerprint: the optimizer's settings as one number, given the count of DTensor
        gradients (:func:`_distributed.fingerprint`).
      holds_partitioned: whether this rank's optimizer was said to hold a partition.
    """

    def __init__(
        self,
        ranks: _distributed.Ranks | None,
        all_params: list[torch.Tensor],
        partitioned_ids: set[int],
        fingerprint: Callable[[int], float],
        holds_partitioned: bool,
    ) -> None:
        self.ranks = ranks
        self.all_params = all_params
        self.partitioned_ids = partitioned_ids
        self.fingerprint = fingerprint
        self.holds_partitioned = holds_partitioned or bool(partitioned_ids)
        self.agreement: _distributed.Agreement | None = None

    def _sort(
        self, params: list[torch.Tensor], tensors: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Any]]:
        dtensor = _distributed.dtensor_type()
        partitioned, replicated, sharded = [], [], []
        for p, t in zip(params, tensors, strict=True):
            if dtensor is not None and isinstance(t, dtensor):
                sharded.append(t)
            elif id(p) in self.partitioned_ids:
                partitioned.append(t)
            else:
                replicated.append(t)
        return partitioned, replicated, sharded

    def agree(
        self,
        loss: Any,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        sum_of_squares: Callable[[list[torch.Tensor]], Any],
        accumulate: torch.dtype,
    ) -> tuple[Any, Any]:
        """The step's loss and squared gradient norm (``grads[i]`` is ``params[i]``'s)."""
        if self.ranks is None:
            return loss, sum_of_squares(grads)
        partitioned, replicated, sharded = self._sort(params, grads)
        self.agreement = self.ranks.agree(
            loss=loss,
            partitioned_sq=sum_of_squares(partitioned),
            replicated_sq=sum_of_squares(replicated),
            partitioned_numel=sum(t.numel() for t in partitioned),
            float64=(accumulate == torch.float64) if self.all_params else None,
            holds_partitioned=self.holds_partitioned,
            fingerprint=self.fingerprint(len(sharded)),
        )
        sq_grad_norm = self.agreement.sq_grad_norm
        if sharded:  # a collective over the DTensors' meshes, after the checks
            sq_grad_norm = _plus(sq_grad_norm, sharded_sum_of_squares(sharded, accumulate))
        return self.agreement.loss, sq_grad_norm

    def of_params(
        self, sum_of_squares: Callable[[list[torch.Tensor]], Any], accumulate: torch.dtype
    ) -> Any:
        """The squared norm of all the parameters, for the projection."""
        if self.ranks is None:
            return sum_of_squares(self.all_params)
        partitioned, replicated, sharded = self._sort(self.all_params, self.all_params)
        assert self.agreement is not None
        if self.agreement.partitioned:
            total = self.ranks.add_parts(sum_of_squares(partitioned), sum_of_squares(replicated))
        else:
            total = sum_of_squares(replicated)
        if sharded:
            total = _plus(total, sharded_sum_of_squares(sharded, accumulate))
        return total

    def record_dtype(self, accumulate: torch.dtype) -> torch.dtype:
        """The dtype of the records: a rank without parameters takes the other ranks'."""
        if self.all_params or self.agreement is None:
            return accumulate
        return torch.float64 if self.agreement.float64 else torch.float32
