"""AliG under ``torch.distributed``: what is added over the ranks, and the check that they agree.

Under data parallelism every rank must take the step of the global batch (docs/specification.md,
section 6): the loss is the mean over the ranks; the squared gradient
norm adds the parts that ranks hold *alone* (a ZeroRedundancyOptimizer partition, an FSDP1
flat-parameter shard) and counts once the parts that every rank holds (the all-reduced
gradients of DDP). DTensors (FSDP2, tensor parallel) say where their entries are themselves:
:func:`sharded_sum_of_squares` adds their shards over their own meshes.

Each step makes one collective: every rank fills its row of a small table,

    [loss, partitioned sum of squares, replicated sum of squares, failed, fingerprint,
     partitioned entries, accumulation dtype, holds partitioned parameters]

and one all-gather hands every rank every row. From the same rows every rank derives the
same loss and norm (summed in rank order: bit for bit the same on every rank), and every
rank checks the same things: that no rank failed its own checks, that the ranks are
configured alike, that the replicated parts (and, with ``all_reduce_loss=False``, the
losses) agree, and that no two ranks hold the same "partitioned" part. When one fails,
every rank raises the same error after the collective, so no rank is left waiting in one.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn

import torch

__all__ = [
    "Ranks",
    "active_group",
    "dtensor_type",
    "fingerprint",
    "sharded_sum_of_squares",
    "split_sharded",
]

_LOSS, _PARTITIONED, _REPLICATED, _FAILED, _FINGERPRINT, _NUMEL, _DTYPE, _HOLDS = range(8)
_COLUMNS = 8

_FLOAT64, _FLOAT32, _NO_DTYPE = 64.0, 32.0, 0.0
"""The accumulation dtype a rank reports (a rank without parameters has none)."""

_RTOL = {_FLOAT64: 1e-8, _FLOAT32: 1e-4}
"""How far (relative) two ranks' values of what must be one number may lie apart: beyond
the rounding of sums taken in another order (another thread count, another BLAS), far below
what a sharded optimizer without ``partitioned=True`` or local losses give. Below it the
ranks still take the same step: every rank uses rank 0's value."""

_PARTITIONED_HELP = (
    "If each rank's AliG holds only a part of the parameters, build it with "
    "partitioned=True: for torch.distributed.optim.ZeroRedundancyOptimizer, "
    "ZeroRedundancyOptimizer(params, optimizer_class=AliG, partitioned=True, ...); for FSDP1 "
    "(FullyShardedDataParallel) with use_orig_params=True and a sharding strategy that "
    "shards (FULL_SHARD, SHARD_GRAD_OP), AliG(model.parameters(), partitioned=True)."
)


@functools.cache
def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` (FSDP2, tensor parallel), if this torch has it."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def split_sharded(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[Any]]:
    """Separates plain tensors from DTensors (whose entries are spread over ranks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensors, []  # no process group, no DTensor (and no import of their module)
    dtensor = dtensor_type()
    if dtensor is None:
        return tensors, []
    plain = [t for t in tensors if not isinstance(t, dtensor)]
    if len(plain) == len(tensors):
        return tensors, []
    return plain, [t for t in tensors if isinstance(t, dtensor)]


def sharded_sum_of_squares(tensors: list[Any], dtype: torch.dtype) -> torch.Tensor:
    """Sum of squared entries of DTensors over *all* their shards: a 0-d plain tensor.

    Each rank sums the squares of its local shards; the sums are then added over the mesh
    dimensions along which the tensors are sharded (a ``Partial`` DTensor made whole), once
    per (mesh, placements) group, and not over the replicated ones. A collective: every
    rank of the meshes must call it with the same kinds of DTensors.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    local_sums: dict[tuple[Any, tuple[Any, ...]], torch.Tensor] = {}
    for tensor in tensors:
        if any(p.is_partial() for p in tensor.placements):  # not yet reduced: reduce first
            tensor = tensor.redistribute(
                placements=[Replicate() if p.is_partial() else p for p in tensor.placements]
            )
        placements = tuple(Partial() if p.is_shard() else Replicate() for p in tensor.placements)
        key = (tensor.device_mesh, placements)
        local = tensor.to_local().reshape(-1).to(dtype)
        local_sums[key] = local_sums.get(key, 0) + local.dot(local)
    total = None
    for (mesh, placements), local_sum in local_sums.items():
        whole = DTensor.from_local(local_sum, mesh, placements, run_check=False).full_tensor()
        total = whole if total is None else total + whole.to(total.device)
    assert total is not None
    return total


def active_group(process_group: Any) -> Any | None:
    """The process group a step's collectives run over; ``None`` when there are none to make.

    ``None`` when ``torch.distributed`` is not initialized (the single-process step makes no
    collective and costs nothing more) or the group has a single rank. ``process_group=None``
    is the default group.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"This process (global rank {dist.get_rank()}) is not a member of AliG's "
            f"process_group ({process_group!r}): only the ranks of that group may step this "
            "optimizer. Build it with the process group this rank trains in."
        )
    return group if dist.get_world_size(group) > 1 else None


def _collective_device(group: Any) -> torch.device:
    """Where the table goes: the CPU if the group's backend takes CPU tensors, else its device.

    The same on every rank (it depends on the group only), so that every rank's all-gather
    reaches the same backend.
    """
    backend = str(torch.distributed.get_backend(group)).lower()
    if ":" in backend:  # "cpu:gloo,cuda:nccl"
        device_types = [pair.split(":")[0] for pair in backend.split(",")]
    else:
        device_types = torch.distributed.Backend.backend_capability.get(backend, ["cpu"])
    if "cpu" in device_types:
        return torch.device("cpu")
    device_type = device_types[0]
    return torch.device(device_type, torch.get_device_module(device_type).current_device())


def fingerprint(values: Sequence[float]) -> float:
    """A number that differs when ``values`` differ (but for a 2**-48 chance).

    The same on every rank for the same values: a hash of their bytes, not Python's salted
    ``hash``.
    """
    packed = struct.pack(f"<{len(values)}d", *values)
    digest = hashlib.blake2b(packed, digest_size=6).digest()
    return float(int.from_bytes(digest, "little"))


def _fsdp1_shards(p: torch.Tensor) -> int:
    """Over how many ranks FSDP1 spreads the entries of the flat parameter ``p``.

    1 when it does not shard it (``NO_SHARD``, or a shard group of one rank). FSDP1 pads a
    flat parameter it shards to a multiple of the shard count and records that padded size.
    """
    padded = getattr(p, "_padded_unsharded_size", None)
    if padded is None:
        return 1
    return max(1, math.prod(padded) // max(1, math.prod(p._sharded_size)))  # type: ignore[attr-defined]


def partitioned_mask(
    params: list[torch.Tensor], partitioned: bool | None, ranks: int
) -> list[bool]:
    """For each parameter, whether this rank holds only a part (of it, or of the parameters).

    The other parts lie on the other ranks of the group (``ranks`` of them).

    Raises:
      ValueError: FSDP1 parameters whose sharding AliG cannot read or that contradict
        ``partitioned``, or that FSDP1 shards over a number of ranks other than the group's.
    """
    mask = []
    for p in params:
        if not getattr(p, "_fsdp_flattened", False):
            mask.append(bool(partitioned))
            continue
        if hasattr(p, "_sharded_size"):  # an FSDP1 FlatParameter (use_orig_params=False)
            shards = _fsdp1_shards(p)
            if shards not in (1, ranks):
                raise ValueError(
                    f"FSDP1 shards a flat parameter of {math.prod(p.shape)} local entries over "
                    f"{shards} ranks, but AliG's process group has {ranks}: the shards are "
                    "replicated over the rest of the group (HYBRID_SHARD or "
                    "_HYBRID_SHARD_ZERO2), which AliG does not support. Use FULL_SHARD or "
                    "SHARD_GRAD_OP over the whole group, or FSDP2 (fully_shard) on a 2-d mesh, "
                    "whose DTensors AliG reads."
                )
            sharded = shards > 1
            if partitioned is not None and partitioned != sharded:
                raise ValueError(
                    f"AliG was built with partitioned={partitioned}, but its parameters are "
                    f"FSDP1 flat parameters that FSDP1 {'shards' if sharded else 'does not shard'}"
                    " (use_orig_params=False, where AliG reads the sharding itself): leave "
                    "partitioned unset (None)."
                )
            mask.append(sharded)
            continue
        # An original parameter that FSDP1 manages (use_orig_params=True): a view into a flat
        # parameter that does not say whether (or over which ranks) it is sharded.
        if partitioned is None:
            raise ValueError(
                "These parameters are FSDP1's (FullyShardedDataParallel) with "
                "use_orig_params=True, which do not show whether FSDP1 shards them. Say it: "
                "AliG(model.parameters(), partitioned=True) for FULL_SHARD or SHARD_GRAD_OP "
                "(the default strategy; pass process_group= FSDP's group if it is not the "
                "default one), partitioned=False for NO_SHARD. HYBRID_SHARD is not supported."
            )
        if partitioned and p.dim() != 1:
            raise ValueError(
                f"AliG was built with partitioned=True, but an FSDP1 parameter has its "
                f"original shape {tuple(p.shape)}: FSDP1 does not shard it (NO_SHARD keeps "
                "parameters whole; sharded ones are 1-d views of a shard). Pass "
                "partitioned=False."
            )
        mask.append(partitioned)
    return mask


class Agreement(NamedTuple):
    """What every rank takes from the table: the same numbers on every rank."""

    loss: Any
    """The loss of the step: the ranks' mean (their common value with all_reduce_loss=False)."""
    sq_grad_norm: Any
    """The partitioned parts added over the ranks, plus the replicated part."""
    float64: bool
    """Whether any rank accumulates in float64 (the dtype a rank without parameters records)."""
    partitioned: bool
    """Whether any rank holds partitioned parameters (then the parameter norm of the
    projection is added over the ranks too)."""


def _same(a: float, b: float, rtol: float) -> bool:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def _differing(rows: list[list[float]], column: int, rtol: float) -> str | None:
    """The ranks' values of ``column``, listed, where they differ; ``None`` where they agree."""
    values = [row[column] for row in rows]
    if all(_same(v, values[0], rtol) for v in values):
        return None
    return "[" + ", ".join(f"{v:.17g}" for v in values) + "]"


def disagreement(rows: list[list[float]], *, all_reduce_loss: bool) -> str | None:
    """Why the ranks cannot take the same step, from their rows; ``None`` when they can.

    A pure function of the rows, which every rank holds alike: every rank finds the same
    message.
    """
    failed = [r for r, row in enumerate(rows) if row[_FAILED]]
    if failed:
        return (
            f"AliG.step() failed its checks on rank(s) {failed} of its process group (that "
            "rank raised the error that says why; the values here were fine). Every rank "
            "raises, so that none is left waiting for the others in a collective."
        )
    differing = [r for r, row in enumerate(rows) if row[_FINGERPRINT] != rows[0][_FINGERPRINT]]
    if differing:
        return (
            f"AliG is not configured alike on every rank: rank(s) {differing} differ from rank 0 "
            "in a setting that decides the step (a param group's max_lr (lr), momentum, "
            "adjusted_momentum, eps or f_star; max_norm, partitioned, all_reduce_loss; the "
            "number of param groups or of DTensor gradients). Build AliG with the same "
            "arguments on every rank, and step any LR scheduler on every rank."
        )
    codes = {row[_DTYPE] for row in rows} - {_NO_DTYPE}
    rtol = _RTOL[_FLOAT32] if _FLOAT32 in codes else _RTOL[_FLOAT64]
    replicated = _differing(rows, _REPLICATED, rtol)
    if replicated is not None:
        return (
            "The ranks hold different gradients for the parameters AliG takes as replicated "
            f"(held whole by every rank): squared norms {replicated} in rank order. "
            "Under DistributedDataParallel every rank holds the same all-reduced gradient. "
            f"{_PARTITIONED_HELP} Otherwise the gradients are not all-reduced: wrap the model "
            "in DistributedDataParallel (or all-reduce the gradients before step)."
        )
    losses = None if all_reduce_loss else _differing(rows, _LOSS, rtol)
    if losses is not None:
        return (
            f"AliG(all_reduce_loss=False) got different losses on different ranks: {losses} in "
            "rank order. With all_reduce_loss=False every rank must pass the mean loss of the "
            "global batch, the same on every rank; leave all_reduce_loss=True (the default) "
            "to have AliG average the ranks' losses."
        )
    seen: dict[tuple[float, float], int] = {}
    for r, row in enumerate(rows):
        part = row[_PARTITIONED]
        if not row[_HOLDS] or part == 0 or not math.isfinite(part):
            continue
        key = (row[_NUMEL], part)
        if key in seen:
            return (
                "AliG adds the squared gradient norms of its parameters over the ranks "
                "(partitioned=True, or FSDP1 flat parameters), but ranks "
                f"{seen[key]} and {r} hold identical parts ({row[_NUMEL]:.0f} entries, squared "
                f"norm {part:.17g}): the parameters are replicated over the group, at least in "
                "part, and would be counted more than once. Plain DDP and FSDP1 NO_SHARD need "
                "partitioned=False; FSDP1 HYBRID_SHARD is not supported; a "
                "ZeroRedundancyOptimizer must partition over AliG's process group (for a "
                "subgroup: optimizer_class=functools.partial(AliG, process_group=group))."
            )
        seen[key] = r
    return None


def _all_gather(output: torch.Tensor, tensor: torch.Tensor, group: Any) -> None:
    """``torch.distributed.all_gather_single`` (torch >= 2.13), else its older name."""
    dist = torch.distributed
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _rank_order_sum(rows: Any, column: int, size: int) -> Any:
    """``rows[0][column] + rows[1][column] + ...``, left to right (floats or 0-d tensors)."""
    total = rows[0][column]
    for r in range(1, size):
        total = total + rows[r][column]
    return total


class Ranks:
    """The ranks of AliG's process group, as one step sees them.

    Args:
      group: the process group (more than one rank).
      partitioned: AliG's ``partitioned`` argument.
      all_reduce_loss: AliG's ``all_reduce_loss`` argument.
    """

    def __init__(self, group: Any, *, partitioned: bool | None, all_reduce_loss: bool) -> None:
        self.group = group
        self.size = torch.distributed.get_world_size(group)
        self.rank = torch.distributed.get_rank(group)
        self.partitioned = partitioned
        self.all_reduce_loss = all_reduce_loss
        self.device = _collective_device(group)

    def partitioned_ids(self, params: list[torch.Tensor]) -> set[int]:
        """The ids of the parameters of which this rank holds a part only (see below)."""
        mask = partitioned_mask(params, self.partitioned, self.size)
        return {id(p) for p, part in zip(params, mask, strict=True) if part}  # partitioned_mask

    def _table(self, row: Sequence[Any]) -> torch.Tensor:
        """Every rank's ``row``, stacked in rank order: one all-gather."""
        if all(isinstance(v, float) for v in row):
            mine = torch.tensor(row, dtype=torch.float64, device=self.device)
        else:
            mine = torch.stack(
                [torch.as_tensor(v).to(device=self.device, dtype=torch.float64) for v in row]
            )
        table = mine.new_empty(self.size * len(row))
        _all_gather(table, mine, self.group)
        return table.view(self.size, len(row))

    def agree(
        self,
        *,
        loss: Any,
        partitioned_sq: Any,
        replicated_sq: Any,
        partitioned_numel: int,
        float64: bool | None,
        holds_partitioned: bool,
        fingerprint: float,
    ) -> Agreement:
        """The collective of a step: every rank gets the same loss and norm, or every one raises.

        Numbers are floats (then so are the results) or 0-d tensors (then the results are
        0-d float64 tensors on the group's device).

        Raises:
          RuntimeError: on every rank alike, when the ranks cannot take the same step.
        """
        dtype = _NO_DTYPE if float64 is None else _FLOAT64 if float64 else _FLOAT32
        row = [
            loss,
            partitioned_sq,
            replicated_sq,
            0.0,
            fingerprint,
            float(partitioned_numel),
            dtype,
            float(holds_partitioned),
        ]
        table = self._table(row)
        if torch.compiler.is_compiling():  # no data-dependent raise inside a graph
            rows: Any = table
            codes = None
        else:
            rows = table.tolist()
            problem = disagreement(rows, all_reduce_loss=self.all_reduce_loss)
            if problem is not None:
                raise RuntimeError(problem)
            codes = {row[_DTYPE] for row in rows}
        loss_value = rows[0][_LOSS]
        if self.all_reduce_loss:
            loss_value = _rank_order_sum(rows, _LOSS, self.size) / self.size
        sq_grad_norm = _rank_order_sum(rows, _PARTITIONED, self.size) + rows[0][_REPLICATED]
        if codes is None:
            any64 = bool(float64)
            holds = True  # cannot be read back inside a graph: add the norms (zeros add nothing)
        else:
            any64 = _FLOAT64 in codes
            holds = any(row[_HOLDS] for row in rows)
        return Agreement(loss_value, sq_grad_norm, any64, holds)

    def fail_together(self, error: Exception) -> NoReturn:
        """Takes part in the step's collective with a failure flag, then raises ``error``.

        The other ranks raise too (see :func:`disagreement`): none waits.
        """
        row = [0.0] * _COLUMNS
        row[_FAILED] = 1.0
        self._table(row)
        raise error

    def add_parts(self, partitioned_sq: Any, replicated_sq: Any) -> Any:
        """The parameters' squared norm for the projection, over the ranks.

        The partitioned parts added over the ranks, in rank order, plus rank 0's replicated
        part: a second collective, made only when some rank holds partitioned parameters.
        """
        rows: Any = self._table([partitioned_sq, replicated_sq])
        if not torch.compiler.is_compiling():
            rows = rows.tolist()
        return _rank_order_sum(rows, 0, self.size) + rows[0][1]
