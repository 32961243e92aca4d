"""alig_torch.Extrapolation on the shared extrapolation table; resumes a checkpoint.

Imported by test_torch_extrapolation*.py (the harness: :class:`TorchRun`, the
``extrapolation_checks.ExtrapolationRun`` of torch, drives the wrapper with the evaluations
of ``extrapolation_cases.Problem``, call by call, in both call forms; :class:`BareBase`, its
base outside a wrapper) and run as a script by test_torch_extrapolation_resume.py:

  python extrapolation_worker.py CASE CHECKPOINT OUT

builds a fresh wrapper for CASE (parameters zero), loads CHECKPOINT
(``torch.load(weights_only=True)``), continues from SPLIT to TOTAL calls and writes the
parameters, the anchor and the base's state to OUT (.npz).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from alig_core import AliGConfig
from alig_core.oracle_extrapolation import SGDNesterov
from alig_torch import AliG, Extrapolation
from extrapolation_cases import (
    find_case,
    wrapper_options,
)
from extrapolation_checks import RunBase

TOTAL, SPLIT = 60, 27
"""Calls in all, and where the resumed run is cut (odd: mid-iteration where calls alternate)."""


def make_base(config: SGDNesterov | AliGConfig, params: Sequence[torch.Tensor]) -> Any:
    """torch.optim.SGD(nesterov=True) or AliG, from the oracle's description of the base."""
    if isinstance(config, SGDNesterov):
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0
        )
    return AliG(params, **asdict(config))


def bits(tensors: Sequence[Any]) -> list[bytes]:
    """Each tensor's (or array's) bytes."""
    return [np.asarray(t.detach() if isinstance(t, torch.Tensor) else t).tobytes() for t in tensors]


def state_bits(opt: torch.optim.Optimizer) -> list[bytes]:
    """Every tensor and value of a state_dict, as bytes (a deep copy, taken now)."""
    out: list[bytes] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            out.append(value.detach().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                out.append(repr(key).encode())
                walk(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        else:
            out.append(repr(value).encode())

    walk(copy.deepcopy(opt.state_dict()))
    return out


ALIG_RECORDS = ("gamma", "gamma_hat", "capped", "steps_taken")
"""AliG's records but steps_skipped, the counter of calls (the wrapper never hands it a skip)."""


def base_state_bits(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[bytes]:
    """Each parameter's state (names, dtypes, shapes, bits) and AliG's records, in order."""
    out: list[bytes] = []
    for p in params:
        for key, value in opt.state[p].items():
            out.append(repr((key, value.dtype, tuple(value.shape))).encode())
            out.append(value.detach().numpy().tobytes())
    group = opt.param_groups[0]
    out += [group[k].numpy().tobytes() for k in ALIG_RECORDS if group.get(k) is not None]
    return out


class BareBase:
    """The base of a run, outside a wrapper (an ``extrapolation_checks.BareBase``)."""

    def __init__(self, config: SGDNesterov | AliGConfig, start: Sequence[np.ndarray]) -> None:
        self.tensors = [torch.nn.Parameter(torch.tensor(p)) for p in start]
        self.opt = make_base(config, self.tensors)

    def step(self, loss: float, grads: Sequence[np.ndarray | None]) -> None:
        for p, g in zip(self.tensors, grads, strict=True):
            p.grad = None if g is None else torch.tensor(g)
        if isinstance(self.opt, AliG):
            self.opt.step(loss=loss)
        else:
            self.opt.step()

    def params(self) -> list[np.ndarray]:
        return [p.detach().numpy().copy() for p in self.tensors]

    def state_bits(self) -> list[bytes]:
        return base_state_bits(self.opt, self.tensors)


class TorchRun(RunBase):
    """One wrapper run on ``case`` (an ``extrapolation_checks.ExtrapolationRun``):
    ``call(batch)`` is one call of the loop; ``tensors`` are the parameters.

    The same-batch form hands the wrapper a closure (which evaluates the problem at the
    parameters and sets ``.grad``); the alternating form evaluates, sets ``.grad`` and calls
    ``step(loss=...)``. ``log`` keeps every evaluation: (call, kind, point, loss, grads),
    kind ``"anchor"`` (the pass that places w~ in "gradient" mode) or ``"update"``.
    """

    def __init__(self, *args: Any, fresh: bool = False, **options: Any) -> None:
        """``RunBase``'s arguments; ``fresh``: the parameters start at zero (to be loaded)."""
        super().__init__(*args, **options)
        self.tensors = [
            torch.nn.Parameter(torch.tensor(np.zeros_like(p) if fresh else p)) for p in self.start
        ]
        self.base = make_base(self.case.base_config, self.tensors)
        self.opt = Extrapolation(self.base, **wrapper_options(self.config))
        self.current = -1

    def evaluate(self, batch: int) -> float:
        point = self.params()
        kind = "anchor" if self.opt.anchor_pass else "update"
        loss, grads = self.problem.evaluate(point, batch)
        for p, g in zip(self.tensors, grads, strict=True):
            p.grad = None if g is None else torch.tensor(g, dtype=p.dtype)
        self.log.append((self.current, kind, point, loss, grads))
        return loss

    def call(self, batch: int) -> None:
        self.current = batch
        if self.case.call_form == "same_batch":
            self.opt.step(lambda: self.evaluate(batch))
        else:
            self.opt.step(loss=self.evaluate(batch))

    def params(self) -> list[np.ndarray]:
        return [p.detach().numpy().copy() for p in self.tensors]

    def anchor(self) -> list[np.ndarray]:
        return [a.numpy().copy() for a in self.opt.anchor_params()]

    def counters(self) -> tuple[bool, int, int]:
        return self.opt.is_extrapolated, self.opt.iteration, self.opt.iterations_skipped

    def alig_records(self) -> dict[str, Any] | None:
        if not isinstance(self.base, AliG):
            return None
        if self.base.gamma is None:
            return {"gamma": None, "steps_taken": 0, "steps_skipped": 0}
        return {
            "gamma": float(self.base.gamma),
            "steps_taken": int(self.base.steps_taken),
            "steps_skipped": int(self.base.steps_skipped),
        }

    def snapshot(self) -> dict[str, list[bytes]]:
        return {
            "anchor": bits(self.opt.anchor_params()),
            "stored": bits([self.opt.state[p]["anchor"] for p in self.tensors]),
            "base": state_bits(self.base),
        }

    def base_state_bits(self) -> list[bytes]:
        return base_state_bits(self.base, self.tensors)

    def bare_base(self) -> BareBase:
        return BareBase(self.case.base_config, self.initial)

    def watch(self, around: Callable[[Callable[..., None]], Callable[..., None]]) -> None:
        """A step of the closure form makes the whole call: the call is watched."""
        self.call = around(self.call)  # type: ignore[method-assign]

    def noise(self, t: int) -> list[np.ndarray]:
        """The wrapper's own xi_t (float64), for the oracle."""
        return [x.double().numpy() for x in self.opt.noise(t)]

    def buffers(self) -> list[np.ndarray]:
        """The base's momentum buffers (zeros where none), float64, in the params' shapes."""
        out = []
        for p in self.tensors:
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
        for i, p in enumerate(self.params()):
            out[f"param_{i}"] = p
        for i, a in enumerate(self.anchor()):
            out[f"anchor_{i}"] = a
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
                "params": [p.detach().clone() for p in self.tensors],
                "optimizer": self.opt.state_dict(),
                "evaluations": self.problem.evaluations,
            },
            path,
        )

    def load(self, path: str) -> None:
        saved = torch.load(path, weights_only=True)
        with torch.no_grad():
            for p, value in zip(self.tensors, saved["params"], strict=True):
                p.copy_(value)
        self.opt.load_state_dict(saved["optimizer"])
        self.problem.evaluations = int(saved["evaluations"])


if __name__ == "__main__":
    case_name, checkpoint, out = sys.argv[1:]
    resumed = TorchRun(find_case(case_name), fresh=True)
    resumed.load(checkpoint)
    resumed.run(SPLIT, TOTAL)
    np.savez(out, **resumed.arrays())
