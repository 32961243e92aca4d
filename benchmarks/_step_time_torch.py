"""torch rows of step_time.py: AliG (foreach, single-tensor) vs SGD(nesterov) and the peer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from alig_torch import AliG


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


def candidates(shapes: list[tuple[int, ...]]) -> tuple[str, dict[str, Callable[[], None]]]:
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
