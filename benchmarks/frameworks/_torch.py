"""torch in the benchmarks (``benchmarks.frameworks``' shape): ``alig_torch.AliG``, eager."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from alig_torch import AliG, Extrapolation
from benchmarks._parity_runners import StepRecord, as_numpy, split_extrapolation
from benchmarks.long_run import MAX_LR, MOMENTUM, WARM_UP, Problem, Result, finish, rss_bytes

__all__ = ["ParityRunner", "long_run", "step_time_rows"]


class ParityRunner:
    """alig_torch.AliG, eager, with the loss handed over by a closure."""

    name = "torch"

    def __init__(self, weights: Sequence[np.ndarray], alig_kwargs: dict[str, Any], dtype: str):
        alig_kwargs, extrapolation = split_extrapolation(alig_kwargs)
        self.dtype = getattr(torch, dtype)
        self.params = [torch.nn.Parameter(torch.tensor(w, dtype=self.dtype)) for w in weights]
        self.alig = AliG(self.params, **alig_kwargs)
        self.opt: Any = (
            self.alig if extrapolation is None else Extrapolation(self.alig, **extrapolation)
        )
        self.momentum = alig_kwargs.get("momentum", 0.0)

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord:
        xs, ys = torch.tensor(x, dtype=self.dtype), torch.tensor(y)
        w1, b1, w2, b2 = self.params

        def closure() -> Any:
            self.opt.zero_grad()
            logits = torch.tanh(xs @ w1 + b1) @ w2 + b2
            loss = torch.nn.functional.cross_entropy(logits, ys)
            loss.backward()
            return loss

        loss = self.opt.step(closure)
        buffers = None
        if self.momentum:
            buffers = [
                self.alig.state[p]["momentum_buffer"].reshape(p.shape).numpy() for p in self.params
            ]
        return StepRecord(
            float(loss.detach()),
            float(self.alig.gamma),
            bool(self.alig.capped),
            as_numpy([p.detach().numpy() for p in self.params]),
            None if buffers is None else as_numpy(buffers),
        )


def long_run(problem: Problem) -> Result:
    """The long run with ``alig_torch.AliG``, eager, the loss by a closure."""
    torch.manual_seed(0)
    x, y = torch.from_numpy(problem.x), torch.from_numpy(problem.y)
    w = torch.nn.Parameter(torch.from_numpy(problem.w0.copy()))
    opt = AliG([w], max_lr=MAX_LR, momentum=MOMENTUM)
    gamma_min = torch.full((), torch.inf)
    gamma_max = torch.full((), -torch.inf)
    any_nan = torch.zeros((), dtype=torch.bool)
    batches = torch.from_numpy(problem.batches)
    start, rss_warm = time.perf_counter(), 0
    for t in range(len(batches)):
        rows = batches[t]

        def closure(rows: torch.Tensor = rows) -> torch.Tensor:
            opt.zero_grad()
            loss = 0.5 * ((x[rows] @ w - y[rows]) ** 2).mean()
            loss.backward()
            return loss

        loss = opt.step(closure)
        gamma_min = torch.minimum(gamma_min, opt.gamma)
        gamma_max = torch.maximum(gamma_max, opt.gamma)
        any_nan |= loss.isnan() | w.isnan().any()
        if t + 1 == WARM_UP:
            rss_warm = rss_bytes()
    return finish(
        "torch", problem, (any_nan, gamma_min, gamma_max), w.detach().numpy(), rss_warm, start
    )


def _stepper(
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    shapes: list[tuple[int, ...]],
    needs_loss: bool,
) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-2
    optimizer = make_optimizer(params)
    loss = torch.tensor(1.0)

    if needs_loss:

        def step() -> None:
            optimizer.step(loss=loss)
    else:

        def step() -> None:
            optimizer.step(lambda: loss)

    for _ in range(3):  # warm up: state allocation
        step()
    return step


def step_time_rows(shapes: list[tuple[int, ...]]) -> tuple[str, dict[str, Callable[[], None]]]:
    rows = {
        "torch.optim.SGD nesterov (foreach)": _stepper(
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, foreach=True),
            shapes,
            needs_loss=False,
        ),
        "torch.optim.SGD nesterov (for-loop)": _stepper(
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, foreach=False),
            shapes,
            needs_loss=False,
        ),
        "alig_torch.AliG momentum=0.9 (foreach)": _stepper(
            lambda p: AliG(p, max_lr=0.1, momentum=0.9, foreach=True), shapes, needs_loss=True
        ),
        "alig_torch.AliG momentum=0.9 (single-tensor)": _stepper(
            lambda p: AliG(p, max_lr=0.1, momentum=0.9, foreach=False), shapes, needs_loss=True
        ),
    }
    try:
        from pytorch_optimizer import AliG as PeerAliG

        rows["pytorch_optimizer.AliG momentum=0.9"] = _stepper(
            lambda p: PeerAliG(p, max_lr=0.1, momentum=0.9), shapes, needs_loss=False
        )
    except ImportError:  # the peer is optional
        pass
    return "torch.optim.SGD nesterov (foreach)", rows
