"""Checkpoint and resume in a new process (run by test_torch_resume.py).

Usage: python resume_worker.py CASE CHECKPOINT OUT. Builds fresh parameters (zeros) and a
fresh AliG for the configuration CASE of alig_cases, loads CHECKPOINT (torch.load with
weights_only=True), continues the shared sequence from SPLIT to TOTAL and writes the
parameters to OUT (.npz).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from alig_cases import CASES, initial_params, make_sequence
from alig_torch import AliG

TOTAL, SPLIT = 60, 27
"""Steps in all, and where the run is cut (after skipped steps, before the frozen layer)."""


def build(case_name: str, fresh: bool = False) -> tuple[list[torch.nn.Parameter], AliG]:
    case = next(c for c in CASES if c.name == case_name)
    start = initial_params()
    params = [
        torch.nn.Parameter(torch.from_numpy(np.array(np.zeros_like(p) if fresh else p)))
        for p in start
    ]
    return params, AliG(params, **case.kwargs)


def run(params: list[torch.nn.Parameter], opt: AliG, start: int, stop: int) -> None:
    for step in make_sequence(TOTAL)[start:stop]:
        for p, g in zip(params, step.grads, strict=True):
            p.grad = None if g is None else torch.from_numpy(np.array(g))
        opt.step(loss=step.loss)


def save(params: list[torch.nn.Parameter], opt: AliG, path: str) -> None:
    torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict()}, path)


if __name__ == "__main__":
    case_name, checkpoint, out = sys.argv[1:]
    params, opt = build(case_name, fresh=True)
    saved = torch.load(checkpoint, weights_only=True)
    with torch.no_grad():
        for p, value in zip(params, saved["params"], strict=True):
            p.copy_(value)
    opt.load_state_dict(saved["optimizer"])
    run(params, opt, SPLIT, TOTAL)
    np.savez(out, *[p.detach().numpy() for p in params])
