"""Data parallel: DDP on 2 gloo processes equals one process on the whole batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _load_worker_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddp_on_two_ranks_equals_the_single_process_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert not ddp["warned"]

    worker = _load_worker_module()
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
    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), "local-loss"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["warned"]
    assert ddp["gammas"][0] != ddp["gammas"][1]
