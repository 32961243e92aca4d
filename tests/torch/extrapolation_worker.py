"""alig_torch.Extrapolation on the shared extrapolation table; resumes a checkpoint.

Imported by test_torch_extrapolation*.py (the harness: :class:`TorchRun` drives the wrapper
with the evaluations of ``extrapolation_cases.Problem``, call by call, in both call forms)
and run as a script by test_torch_extrapolation_resume.py:

  python extrapolation_worker.py CASE CHECKPOINT OUT

builds a fresh wrapper for CASE (parameters zero), loads CHECKPOINT
(``torch.load(weights_only=True)``), continues from SPLIT to TOTAL calls and writes the
parameters, the anchor and the base's state to OUT (.npz).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from alig_core import AliGConfig, ExtrapolationConfig
from alig_core.oracle_extrapolation import SGDNesterov
from alig_torch import AliG, Extrapolation
from extrapolation_cases import CASES, ExtrapolationCase, Problem, initial_params

SEED = 11
"""The seed of the noise of every run."""

TOTAL, SPLIT = 60, 27
"""Calls in all, and where the resumed run is cut (odd: mid-iteration where calls alternate)."""


def find_case(name: str) -> ExtrapolationCase:
    return next(c for c in CASES if c.name == name)


def make_base(config: SGDNesterov | AliGConfig, params: Sequence[torch.Tensor]) -> Any:
    """torch.optim.SGD(nesterov=True) or AliG, from the oracle's description of the base."""
    if isinstance(config, SGDNesterov):
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0
        )
    return AliG(params, **asdict(config))


def wrapper_options(config: ExtrapolationConfig) -> dict[str, Any]:
    return {
        "mode": config.mode,
        "lr_x": config.lr_x,
        "sigma": config.sigma,
        "linearized": config.linearized,
        "seed": SEED if config.mode == "noise" else None,
    }


class TorchRun:
    """One wrapper run on ``case``: ``call(batch)`` is one call of the loop.

    The same-batch form hands the wrapper a closure (which evaluates the problem at the
    parameters and sets ``.grad``); the alternating form evaluates, sets ``.grad`` and calls
    ``step(loss=...)``. ``log`` keeps every evaluation: (call, kind, point, loss, grads),
    kind ``"anchor"`` (the pass that places w~ in "gradient" mode) or ``"update"``.
    """

    def __init__(
        self,
        case: ExtrapolationCase,
        dtype: torch.dtype = torch.float64,
        *,
        config: ExtrapolationConfig | None = None,
        problem: Problem | None = None,
        fresh: bool = False,
    ) -> None:
        numpy_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.case = case
        self.config = config if config is not None else case.config
        self.problem = problem if problem is not None else Problem()
        start = [np.asarray(p, dtype=numpy_dtype) for p in initial_params()]
        self.params = [
            torch.nn.Parameter(torch.tensor(np.zeros_like(p) if fresh else p, dtype=dtype))
            for p in start
        ]
        self.initial = [p.astype(np.float64) for p in start]
        self.base = make_base(case.base_config, self.params)
        self.opt = Extrapolation(self.base, **wrapper_options(self.config))
        self.log: list[tuple[int, str, list[np.ndarray], float, list[Any]]] = []
        self.current = -1

    def evaluate(self, batch: int) -> float:
        point = [p.detach().numpy().copy() for p in self.params]
        kind = "anchor" if self.opt.anchor_pass else "update"
        loss, grads = self.problem.evaluate(point, batch)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = None if g is None else torch.tensor(g, dtype=p.dtype)
        self.log.append((self.current, kind, point, loss, grads))
        return loss

    def call(self, batch: int) -> None:
        self.current = batch
        if self.case.call_form == "same_batch":
            self.opt.step(lambda: self.evaluate(batch))
        else:
            self.opt.step(loss=self.evaluate(batch))

    def run(self, start: int, stop: int) -> None:
        for batch in range(start, stop):
            self.call(batch)

    def noise(self, t: int) -> list[np.ndarray]:
        """The wrapper's own xi_t (float64), for the oracle."""
        return [x.double().numpy() for x in self.opt.noise(t)]

    def buffers(self) -> list[np.ndarray]:
        """The base's momentum buffers (zeros where none), float64, in the params' shapes."""
        out = []
        for p in self.params:
            buffer = self.base.state[p].get("momentum_buffer")
            out.append(
                np.zeros(p.shape)
                if buffer is None
                else buffer.detach().double().reshape(p.shape).numpy().copy()
            )
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything a resumed run must reproduce, as named float64 arrays."""
        out: dict[str, np.ndarray] = {}
        for i, p in enumerate(self.params):
            out[f"param_{i}"] = p.detach().numpy().copy()
        for i, a in enumerate(self.opt.anchor_params()):
            out[f"anchor_{i}"] = a.numpy()
        for i, b in enumerate(self.buffers()):
            out[f"buffer_{i}"] = b
        out["counters"] = np.array(
            [int(self.opt.is_extrapolated), self.opt.iteration, self.opt.iterations_skipped]
        )
        if isinstance(self.base, AliG) and self.base.gamma is not None:
            out["gamma"] = self.base.gamma.double().numpy().copy()
        return out

    def save(self, path: str) -> None:
        torch.save(
            {
                "params": [p.detach().clone() for p in self.params],
                "optimizer": self.opt.state_dict(),
                "evaluations": self.problem.evaluations,
            },
            path,
        )

    def load(self, path: str) -> None:
        saved = torch.load(path, weights_only=True)
        with torch.no_grad():
            for p, value in zip(self.params, saved["params"], strict=True):
                p.copy_(value)
        self.opt.load_state_dict(saved["optimizer"])
        self.problem.evaluations = int(saved["evaluations"])


if __name__ == "__main__":
    case_name, checkpoint, out = sys.argv[1:]
    resumed = TorchRun(find_case(case_name), fresh=True)
    resumed.load(checkpoint)
    resumed.run(SPLIT, TOTAL)
    np.savez(out, **resumed.arrays())
