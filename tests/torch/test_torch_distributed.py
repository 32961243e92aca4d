"""Data parallel: DDP or FSDP2 on 2 gloo processes equals one process on the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker_scripts import import_script, run_script

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-single-tensor"])
def test_two_ranks_equal_the_single_process_run(mode: str, tmp_path: Path) -> None:
    """DDP, and FSDP2 (parameters and gradients sharded as DTensors: the norms must add
    every rank's shards), both step paths."""
    run_script(WORKER, tmp_path, mode)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert not ddp["warned"]

    worker = import_script(WORKER)
    model = worker.make_model()
    gammas = worker.train(model, rank=0, world=1)

    # Every rank used the same step sizes, those of the global batch.
    assert ddp["gammas"][0] == ddp["gammas"][1]
    assert max(abs(a - b) for a, b in zip(ddp["gammas"][0], gammas, strict=True)) <= 1e-10
    assert len(set(gammas)) > 1  # gamma moved: the loss really mattered
    scale = max(float(p.abs().max()) for p in model.parameters())
    for ours, theirs in zip(ddp["params"], model.parameters(), strict=True):
        assert float((ours - theirs.detach()).abs().max()) / scale <= 1e-10


def test_local_losses_without_all_reduce_warn_and_diverge(tmp_path: Path) -> None:
    """The guard: with all_reduce_loss=False and local losses, the ranks' gammas differ,
    which is why AliG averages the loss by default, and warns when told not to."""
    run_script(WORKER, tmp_path, "local-loss")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["warned"]
    assert ddp["gammas"][0] != ddp["gammas"][1]
