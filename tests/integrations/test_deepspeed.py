"""DeepSpeed: ZeRO stages 0-3, with and without gradient_accumulation_steps, in a hand loop
with ``alig_torch.integrations.deepspeed.backward`` and in ``AliGTrainer``, against one
process on the global batch (2 gloo ranks, CPU, float32; gamma moving below the cap,
momentum 0.9, the projection onto max_norm active every step); and the setups that would
take a wrong step, refused on both ranks before any parameter moves.

One spawn of 2 ranks runs every configuration (``deepspeed_worker.py``: DeepSpeed's import
and a process start are the slow parts), without compiling DeepSpeed's C++ op.

The tolerance: the runs differ from the reference in float32 rounding only. Each step's
gradient is the mean of two half-batch means (DeepSpeed's all-reduce, or its
reduce-scatter over partitions) instead of one mean, and ALI-G's norm is summed over
partitions in another order: a few units of float32's roundoff (6e-8) per step, which
gamma (a quotient with the squared norm) roughly triples, and 6 steps with momentum carry
forward. The runs land within 6e-7 (about 10 roundoffs); ``TOLERANCE`` = 5e-6 leaves a
margin of 8 and lies more than four orders of magnitude below what the natural wrong
loops gave before they were refused (issue 21: DeepSpeed's default clipping 2.3e-1, an
unscaled loss under accumulation 5.4e-1, relative, after 5 steps).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from alig_cases import max_relative_deviation
from worker_scripts import import_script, run_script

WORKER = Path(__file__).with_name("deepspeed_worker.py")
TOLERANCE = 5e-6


@pytest.fixture(scope="module")
def worker() -> ModuleType:
    return import_script(WORKER)


def _reference(worker: ModuleType, stage: int) -> dict[str, Any]:
    """One process on the global batches (this process, no DeepSpeed), with the AliG
    arguments of ``stage``'s runs."""
    result = worker.reference(stage=stage)
    kwargs = worker.alig_kwargs(stage)
    gammas = result["gammas"]
    assert len(set(gammas)) == len(gammas), "gamma must move every step"
    assert all(0 < g < kwargs["max_lr"] for g in gammas), "gamma must stay below the cap"
    if "max_norm" in kwargs:
        max_norm = kwargs["max_norm"]
        assert all(abs(n - max_norm) <= 1e-6 * max_norm for n in result["norms"]), (
            "the projection onto max_norm must be active"
        )
    return result


@pytest.fixture(scope="module")
def worker_results(
    tmp_path_factory: pytest.TempPathFactory, worker: ModuleType
) -> list[dict[str, Any]]:
    """Every rank's results of both parts, from one spawn of 2 ranks."""
    assert set(worker.REFUSALS) == set(REFUSED), "every refused setup is run and checked"
    out = tmp_path_factory.mktemp("deepspeed")
    run_script(WORKER, out, "all", timeout=900)
    ranks: list[dict[str, Any]] = torch.load(out / "all.pt", weights_only=False)
    return ranks


@pytest.fixture(scope="module")
def runs(worker_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [results["runs"] for results in worker_results]


@pytest.fixture(scope="module")
def refusals(worker_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [results["refusals"] for results in worker_results]


@pytest.mark.parametrize("gas", [1, 2], ids=lambda g: f"gas{g}")
@pytest.mark.parametrize("stage", [0, 1, 2, 3], ids=lambda s: f"stage{s}")
@pytest.mark.parametrize("loop", ["hand", "trainer"])
def test_equals_one_process_on_the_global_batch(
    runs: list[dict[str, Any]], worker: ModuleType, loop: str, stage: int, gas: int
) -> None:
    """``hand``: ``deepspeed.initialize`` and ``backward(engine, loss)``; ``trainer``:
    ``AliGTrainer`` with ``TrainingArguments(deepspeed=config)`` (AliG partitioned from
    stage 1 on)."""
    reference = _reference(worker, stage)
    for rank, results in enumerate(runs):
        result = results[f"{loop}-stage{stage}-gas{gas}"]
        assert "error" not in result, (rank, result)
        assert result["steps"] == len(reference["gammas"])
        if loop == "trainer":
            assert result["partitioned"] is (stage >= 1)
        gaps = [abs(a - b) / b for a, b in zip(result["gammas"], reference["gammas"], strict=True)]
        assert max(gaps) <= TOLERANCE, (rank, result["gammas"], reference["gammas"])
        deviation = max_relative_deviation(result["params"], reference["params"])
        assert deviation <= TOLERANCE, (rank, deviation)


@pytest.mark.parametrize("gas", [1, 2], ids=lambda g: f"gas{g}")
def test_stage3_padding_does_not_reach_the_norms(
    runs: list[dict[str, Any]], worker: ModuleType, gas: int
) -> None:
    """Stage 3 pads the last rank's partition of a parameter the ranks do not divide with
    uninitialized memory: here set to inf before the first step. The helper zeroes it, so
    ALI-G's projection sees the parameters only (it zeroed them in about one run in ten
    before)."""
    reference = _reference(worker, 3)
    for rank, results in enumerate(runs):
        result = results[f"garbage-stage3-gas{gas}"]
        assert "error" not in result, (rank, result)
        deviation = max_relative_deviation(result["params"], reference["params"])
        assert deviation <= TOLERANCE, (rank, deviation)


@pytest.mark.parametrize("stage", [0, 2], ids=lambda s: f"stage{s}")
def test_a_skipped_step_leaves_no_loss_to_the_next(
    runs: list[dict[str, Any]], worker: ModuleType, stage: int
) -> None:
    """A NaN in one micro-batch: under ZeRO, DeepSpeed skips the step without calling
    AliG (its losses are dropped at the next backward); at stage 0 AliG skips it itself.
    Either way the run equals one process that leaves that step out."""
    expected = worker.reference(skip=worker.SKIPPED)
    for rank, results in enumerate(runs):
        result = results[f"skipped-stage{stage}"]
        assert "error" not in result, (rank, result)
        assert result["steps"] == worker.STEPS - 1
        assert result["skipped_by_alig"] == (1 if stage == 0 else 0)
        deviation = max_relative_deviation(result["params"], expected["params"])
        assert deviation <= TOLERANCE, (rank, deviation)


REFUSED: dict[str, tuple[str, ...]] = {
    "default-clipping-stage0": ('"gradient_clipping": 1.0', '"gradient_clipping": 0.0'),
    "clipping-stage2": ('"gradient_clipping": 1.0', '"gradient_clipping": 0.0'),
    "by-hand-stage0": (
        "DeepSpeed's engine.step() stepped this AliG",
        "alig_torch.integrations.deepspeed.backward(engine, loss)",
    ),
    "unscaled-default-clipping-stage1": (
        "DeepSpeed's engine.step() stepped this AliG",
        "gradient_accumulation_steps",
        "alig_torch.integrations.deepspeed.backward(engine, loss)",
    ),
    "no-loss-stage2": (
        "DeepSpeed's engine.step() stepped this AliG",
        "replace engine.backward(loss) with alig_torch.integrations.deepspeed.backward",
    ),
    "sgd-stage1": ("found no alig_torch.AliG in DeepSpeedZeroOptimizer", "pass AliG(...)"),
    "param-groups-stage1": ("step() once per param group", "has 2", "one param group"),
    "param-groups-stage2": ("step() once per param group", "has 2", "one param group"),
    "sub-groups-stage3": ("once per sub-group", "has 2", '"sub_group_size": N'),
    "not-partitioned-stage2": ('{"stage": 2}', "partitioned=True", "got partitioned=False"),
    "partitioned-stage0": ('{"stage": 0}', "partitioned=False", "got partitioned=True"),
    "bf16-stage2": ('"bf16": {"enabled": true}', '"bf16": {"enabled": false}'),
    "fp16-stage0": ('"fp16": {"enabled": true}', '"fp16": {"enabled": false}'),
    "torch-autocast-stage1": ('"torch_autocast"', '"torch_autocast": {"enabled": false}'),
    "offload-optimizer-stage2": (
        '"offload_optimizer": {"device": "cpu"}',
        '"offload_optimizer": {"device": "none"}',
    ),
    "offload-param-stage3": (
        '"offload_param": {"device": "cpu"}',
        '"offload_param": {"device": "none"}',
    ),
    "trainer-optimizer-section": ('an "optimizer" section', "Remove it"),
    "trainer-default-clipping": ('"gradient_clipping": 1.0', '"gradient_clipping": 0.0'),
    "trainer-own-optimizer": ("discards optimizers=(AliG(...), ...)", "alig_kwargs={...}"),
}
"""Each refused setup and the words its error must hold: the cause and the fix."""


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_on_every_rank_before_any_parameter_moves(
    refusals: list[dict[str, Any]], case: str
) -> None:
    errors = {results[case].get("error") for results in refusals}
    assert len(errors) == 1, f"the ranks raised differently: {errors}"
    (error,) = errors
    assert error is not None
    assert error.startswith("ValueError: "), error
    for words in REFUSED[case]:
        assert words in error, (words, error)
    assert not any(results[case]["moved"] for results in refusals), "a parameter moved"
