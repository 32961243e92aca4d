"""Data parallel: every wrapper on gloo processes equals one process on the whole batch, or
every rank refuses together.

DDP and FSDP2 (``ddp_worker.py``); ZeroRedundancyOptimizer, FSDP1 and process subgroups
(``sharded_worker.py``); the cross-rank check's logic, in this process.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from alig_cases import max_relative_deviation
from worker_scripts import import_script, run_script

WORKER = Path(__file__).with_name("ddp_worker.py")
SHARDED = Path(__file__).with_name("sharded_worker.py")


@pytest.fixture(scope="module")
def sharded() -> ModuleType:
    return import_script(SHARDED)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-single-tensor"])
def test_two_ranks_equal_the_single_process_run(mode: str, tmp_path: Path) -> None:
    """DDP, and FSDP2 (parameters and gradients sharded as DTensors: the norms must add
    every rank's shards), both step paths."""
    run_script(WORKER, tmp_path, mode)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    worker = import_script(WORKER)
    model = worker.make_model()
    gammas = worker.train(model, rank=0, world=1)

    # Every rank used the same step sizes, those of the global batch.
    assert ddp["gammas"][0] == ddp["gammas"][1]
    assert max(abs(a - b) for a, b in zip(ddp["gammas"][0], gammas, strict=True)) <= 1e-10
    assert len(set(gammas)) > 1  # gamma moved: the loss really mattered
    expected = [p.detach() for p in model.parameters()]
    assert max_relative_deviation(ddp["params"], expected) <= 1e-10


def _assert_equals_reference(
    result: dict[str, Any], reference: dict[str, Any], config: dict[str, Any], max_lr: float
) -> None:
    """Every rank took the one-process step sizes, and the parameters ended where its did."""
    gammas = reference["gammas"]
    assert len(set(gammas)) > 1  # gamma moved
    assert min(gammas) < max_lr  # not pinned at the cap
    if config["max_norm"] is not None:  # the projection acted: its (global) norm mattered
        assert reference["max_param_norm"] >= config["max_norm"] * (1 - 1e-9)
    first = result["gammas"][0]
    assert all(other == first for other in result["gammas"])
    assert max(abs(a - b) for a, b in zip(first, gammas, strict=True)) <= 1e-10
    assert max_relative_deviation(result["params"], reference["params"]) <= 1e-10


def test_zero_redundancy_optimizer_equals_one_process(sharded: ModuleType, tmp_path: Path) -> None:
    """ZeroRedundancyOptimizer(optimizer_class=AliG, partitioned=True) over DDP: each rank's
    AliG holds a partition, the norms (gradients, and parameters for the projection) add the
    ranks' partitions. Both step forms, momentum on and off, projection on and off, both
    CPU step paths; a rank whose partition is empty takes part and takes the same gamma."""
    run_script(SHARDED, tmp_path, "zero")
    results = torch.load(tmp_path / "zero.pt", weights_only=True)
    for index, config in enumerate(sharded.CONFIGS):
        reference = sharded.reference(config)
        _assert_equals_reference(results[f"config{index}"], reference, config, sharded.MAX_LR)

    reference = sharded.reference(sharded.CONFIGS[0], single_tensor=True)
    for form in ("closure", "add_loss"):  # the loss from a closure, or added (add_loss)
        empty = results[f"empty-{form}"]
        assert empty["sizes"] == [18, 0]  # one tensor of 18 entries: rank 1's partition is empty
        _assert_equals_reference(empty, reference, sharded.CONFIGS[0], sharded.MAX_LR)


def test_fsdp1_equals_one_process(sharded: ModuleType, tmp_path: Path) -> None:
    """FSDP1 on the CPU, use_orig_params=False (flat parameters: AliG reads their sharding)
    and True (views of the shards: partitioned=True), padding included (163 entries on 2
    ranks), every configuration."""
    run_script(SHARDED, tmp_path, "fsdp1")
    results = torch.load(tmp_path / "fsdp1.pt", weights_only=True)
    for use_orig_params in (False, True):
        for index, config in enumerate(sharded.CONFIGS):
            reference = sharded.reference(config)
            result = results[f"orig{use_orig_params}-config{index}"]
            _assert_equals_reference(result, reference, config, sharded.MAX_LR)


def test_a_subgroup_trains_apart_from_the_other_ranks(sharded: ModuleType, tmp_path: Path) -> None:
    """3 ranks: DDP and then ZeRO on the subgroup of ranks 0 and 1 (AliG's process_group),
    while rank 2 trains alone in a group of its own, where AliG makes no collective. All
    three equal one process on the whole batch: the subgroup averages over its own ranks."""
    run_script(SHARDED, tmp_path, "subgroup")
    results = torch.load(tmp_path / "subgroup.pt", weights_only=True)
    config = sharded.CONFIGS[0]
    reference = sharded.reference(config)
    for name in ("ddp", "zero"):
        _assert_equals_reference(results[name], reference, config, sharded.MAX_LR)
    alone = results["alone"]
    assert alone["collectives"] == 0
    alone_result = {"gammas": [alone["gammas"]], "params": alone["params"]}
    _assert_equals_reference(alone_result, reference, config, sharded.MAX_LR)


def test_inconsistent_setups_raise_on_every_rank(tmp_path: Path) -> None:
    """Setups whose ranks cannot take one step: every rank raises (none waits in a
    collective until the 60 s process-group timeout, which would raise another error), with
    a message that names the cause, and no parameter moves."""
    run_script(SHARDED, tmp_path, "refusals")
    ranks = torch.load(tmp_path / "refusals.pt", weights_only=True)["ranks"]
    expected = {
        "local-loss": [("RuntimeError", "all_reduce_loss=False) got different losses")] * 2,
        "bad-loss-on-rank-0": [
            ("ValueError", "ALI-G needs the loss as a scalar"),
            ("RuntimeError", "failed its checks on rank(s) [0]"),
        ],
        "no-loss-on-rank-1": [
            ("RuntimeError", "failed its checks on rank(s) [1]"),
            ("ValueError", "AliG.step() got no loss"),
        ],
        "other-max-lr": [("RuntimeError", "not configured alike on every rank")] * 2,
        "partitioned-ddp": [("RuntimeError", "ranks 0 and 1 hold identical parts")] * 2,
        "zero-without-partitioned": [("RuntimeError", "partitioned=True")] * 2,
        "fsdp1-orig-params-unsaid": [("ValueError", "use_orig_params=True")] * 2,
    }
    for case, per_rank in expected.items():
        for rank, (kind, text) in enumerate(per_rank):
            outcome = ranks[rank][case]
            assert outcome["type"] == kind, (case, rank, outcome)
            assert text in outcome["message"], (case, rank, outcome)
            assert outcome["unchanged"], (case, rank)
    # Both ranks raise the very same message where the cause is shared.
    for case in ("local-loss", "other-max-lr", "partitioned-ddp", "zero-without-partitioned"):
        assert ranks[0][case]["message"] == ranks[1][case]["message"]
    assert (
        "ZeroRedundancyOptimizer(params, optimizer_class=AliG, partitioned=True"
        in (ranks[0]["zero-without-partitioned"]["message"])
    )


# ---------------------------------------------------------------- the check, in this process


def _row(
    loss: float = 1.0,
    partitioned: float = 0.0,
    replicated: float = 2.0,
    failed: float = 0.0,
    fingerprint: float = 7.0,
    numel: float = 0.0,
    dtype: float = 64.0,
    holds: float = 0.0,
) -> list[float]:
    return [loss, partitioned, replicated, failed, fingerprint, numel, dtype, holds]


def test_disagreement_names_each_cause() -> None:
    from alig_torch._distributed import disagreement

    def check(rows: list[list[float]], all_reduce_loss: bool = True) -> str | None:
        return disagreement(rows, all_reduce_loss=all_reduce_loss)

    assert check([_row(), _row(loss=5.0)]) is None  # local losses are averaged
    assert check([_row(replicated=math.nan), _row(replicated=math.nan)]) is None  # all skip
    assert "rank(s) [1]" in check([_row(), _row(failed=1.0, fingerprint=0.0)])
    assert "not configured alike" in check([_row(), _row(fingerprint=8.0)])
    assert "different gradients" in check([_row(), _row(replicated=2.5)])
    assert "different gradients" in check([_row(), _row(replicated=math.inf)])
    assert "different gradients" in check([_row(), _row(replicated=math.nan)])
    # Rounding (sums in another order) is not a disagreement; float32 sums are looser.
    assert check([_row(), _row(replicated=2.0 * (1 + 1e-12))]) is None
    assert check([_row(), _row(replicated=2.0 * (1 + 1e-6))]) is not None
    assert check([_row(dtype=32.0), _row(dtype=32.0, replicated=2.0 * (1 + 1e-5))]) is None
    assert check([_row(dtype=32.0), _row(dtype=32.0, replicated=2.0 * (1 + 1e-3))]) is not None
    assert check([_row(), _row(dtype=0.0, replicated=2.0 * (1 + 1e-6))]) is not None  # empty
    losses = [_row(), _row(loss=1.5)]
    assert "all_reduce_loss=False) got different losses" in check(losses, all_reduce_loss=False)
    assert check([_row(), _row()], all_reduce_loss=False) is None
    same_part = _row(partitioned=3.0, numel=10.0, holds=1.0)
    assert "ranks 0 and 1 hold identical parts" in check([same_part, same_part])
    assert check([same_part, _row(partitioned=3.5, numel=10.0, holds=1.0)]) is None
    zero_part = _row(partitioned=0.0, numel=10.0, holds=1.0)
    assert check([zero_part, zero_part]) is None  # zero gradients: nothing to tell apart


def _fsdp1(shape: tuple[int, ...], **attributes: Any) -> torch.Tensor:
    """A tensor carrying the attributes FSDP1 puts on the parameters it manages."""
    tensor = torch.zeros(shape)
    tensor._fsdp_flattened = True  # type: ignore[attr-defined]
    for name, value in attributes.items():
        setattr(tensor, name, value)
    return tensor


def test_fsdp1_parameters_are_read_or_refused() -> None:
    """Flat parameters: sharded iff FSDP1 padded them for sharding, over as many ranks as the
    group has (HYBRID_SHARD, which replicates the shards, is refused); original parameters
    need partitioned= given, and one kept whole (NO_SHARD) contradicts partitioned=True."""
    from alig_torch._distributed import partitioned_mask

    plain = torch.zeros(3)
    sharded = _fsdp1((82,), _sharded_size=torch.Size([82]), _padded_unsharded_size=(164,))
    whole = _fsdp1((163,), _sharded_size=torch.Size([163]))
    assert partitioned_mask([plain, sharded, whole], None, 2) == [False, True, False]
    assert partitioned_mask([plain], True, 2) == [True]
    with pytest.raises(ValueError, match="HYBRID_SHARD"):
        partitioned_mask([sharded], None, 4)
    with pytest.raises(ValueError, match="leave partitioned unset"):
        partitioned_mask([whole], True, 2)
    view = _fsdp1((41,))
    with pytest.raises(ValueError, match=r"partitioned=True\) for FULL_SHARD"):
        partitioned_mask([view], None, 2)
    assert partitioned_mask([view], True, 2) == [True]
    assert partitioned_mask([view], False, 2) == [False]
    with pytest.raises(ValueError, match="does not shard it"):
        partitioned_mask([_fsdp1((4, 3))], True, 2)


def test_partitioned_must_be_a_bool_or_none() -> None:
    from alig_torch import AliG

    with pytest.raises(ValueError, match="partitioned must be True, False or None"):
        AliG([torch.nn.Parameter(torch.ones(2))], max_lr=1.0, partitioned="yes")  # type: ignore[arg-type]


def test_a_single_process_makes_no_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torch.distributed initialized, a step (both paths, with projection) calls no
    collective: the single-process step is the one it always was."""
    import torch.distributed as dist

    from alig_torch import AliG

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a collective in a single process")

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast"):
        monkeypatch.setattr(dist, name, refuse)
    assert not dist.is_initialized()
    for foreach in (None, False):
        w = torch.nn.Parameter(torch.ones(3))
        opt = AliG([w], max_lr=1.0, momentum=0.9, max_norm=1.0, foreach=foreach)
        w.grad = torch.full((3,), 0.5)
        opt.step(loss=torch.tensor(2.0))
        assert int(opt.steps_taken) == 1
