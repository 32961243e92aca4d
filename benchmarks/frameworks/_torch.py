"""torch in the benchmarks (``benchmarks.frameworks``' shape): ``alig_torch.AliG``, eager."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from alig_torch import AliG, Extrapolation
from benchmarks import extrapolation_cost as cost
from benchmarks._parity_runners import StepRecord, as_numpy, split_extrapolation
from benchmarks.long_run import MAX_LR, MOMENTUM, WARM_UP, Problem, Result, finish, rss_bytes

__all__ = ["ParityRunner", "extrapolation_cost_rows", "long_run", "step_time_rows"]


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


MakeOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def _cost_row(
    problem: cost.CostProblem,
    name: str,
    base: str,
    mode: str | None,
    make_optimizer: MakeOptimizer,
    takes_loss: bool,
    closure: bool,
    evaluations: int = 1,
) -> cost.CostRow:
    """A training loop's iteration: ``step(closure)``, or ``evaluations`` backward passes
    (the gradients cleared before each) then ``step()`` or ``step(loss=)``."""
    model = torch.nn.Sequential(
        torch.nn.Linear(*problem.weights[0].shape),
        torch.nn.ReLU(),
        torch.nn.Linear(*problem.weights[2].shape),
    )
    with torch.no_grad():
        for p, w in zip(model.parameters(), problem.weights, strict=True):
            p.copy_(torch.from_numpy(w.T.copy() if w.ndim == 2 else w))
    optimizer: Any = make_optimizer(list(model.parameters()))  # step(loss=) is AliG's
    xs = [torch.from_numpy(x) for x in problem.x]
    ys = [torch.from_numpy(y) for y in problem.y]
    cross_entropy = torch.nn.functional.cross_entropy
    batches = itertools.cycle(range(len(xs)))
    last = [torch.tensor(0.0)]

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        i = next(batches)
        return xs[i], ys[i]

    if closure:

        def run() -> None:
            x, y = next_batch()

            def evaluate() -> torch.Tensor:
                optimizer.zero_grad()
                loss = cross_entropy(model(x), y)
                loss.backward()
                return loss

            last[0] = optimizer.step(evaluate)
    else:

        def run() -> None:
            x, y = next_batch()
            for _ in range(evaluations):
                optimizer.zero_grad()
                loss = cross_entropy(model(x), y)
                loss.backward()
            if takes_loss:
                optimizer.step(loss=loss)
            else:
                optimizer.step()
            last[0] = loss

    return cost.CostRow(name, base, mode, run, lambda: float(last[0].detach()))


def _extrapolated(make_base: MakeOptimizer, mode: str) -> MakeOptimizer:
    return lambda params: Extrapolation(make_base(params), mode=mode)


def extrapolation_cost_rows(problem: cost.CostProblem) -> tuple[str, list[cost.CostRow]]:
    """The rows of ``benchmarks.extrapolation_cost``: eager, one thread.

    The bases and ``"past"`` rows: ``loss.backward()`` then ``step()`` (SGD) or
    ``step(loss=loss)`` (ALI-G); ``"gradient"`` rows: ``step(closure)`` (two evaluations
    on the same batch); the floor of ``"gradient"`` mode: two forward and backward passes
    and one step of the bare base.
    """
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # refused once inter-op work has started
        torch.set_num_interop_threads(1)

    def sgd(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=cost.LR, momentum=cost.MOMENTUM, nesterov=True)

    def alig(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return AliG(params, max_lr=cost.LR, momentum=cost.MOMENTUM)

    rows = []
    for base, short, make_base, takes_loss in (
        ("torch.optim.SGD nesterov", "SGD", sgd, False),
        ("alig_torch.AliG", "AliG", alig, True),
    ):
        rows.append(_cost_row(problem, base, base, None, make_base, takes_loss, False))
        floor = f"floor: {short}, 2 backward, 1 step"
        rows.append(_cost_row(problem, floor, base, "floor", make_base, takes_loss, False, 2))
        for mode, closure, form in (
            ("past", False, "backward, step"),
            ("gradient", True, "closure"),
        ):
            name = f"Extrapolation({short}, {mode!r}) {form}"
            make = _extrapolated(make_base, mode)
            rows.append(_cost_row(problem, name, base, mode, make, takes_loss, closure))
    info = (
        f"torch {torch.__version__}, eager; torch.get_num_threads()={torch.get_num_threads()}, "
        f"get_num_interop_threads()={torch.get_num_interop_threads()}"
    )
    return info, rows
