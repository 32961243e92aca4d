"""The methods of the convergence benchmark: one :class:`Method` entry each in :data:`METHODS`.

To add a method, add one entry: its name (the row of every table), its framework (which
training loop runs it: ``"torch"`` or ``"jax"``), how to build its optimizer from a grid
point, its learning-rate grids (full and quick) and the name of that hyperparameter, and
any other grid axes. Nothing else names a method.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from alig_torch import AliG, project_onto_ball
from benchmarks.convergence.tasks import Task

__all__ = [
    "ALIG",
    "METHODS",
    "METHODS_BY_NAME",
    "MOMENTUM",
    "Method",
]

MOMENTUM = 0.9

Hyperparameters = dict[str, float | None]
TorchOptimizer = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]
TorchBuild = Callable[[Mapping[str, Any], list[nn.Parameter], int], TorchOptimizer]
"""``(grid point, the model's parameters, epochs) -> (optimizer, per-epoch scheduler)``."""
JaxBuild = Callable[[Mapping[str, Any]], Any]
"""``(grid point as JAX scalars) -> optax transformation``, called inside the jitted step
(the grid point is an argument of the step, so that every grid point shares one compile)."""
GridAxis = Callable[[Task, bool], tuple[float, ...]]
"""``(task, quick) -> values`` of a hyperparameter besides the learning rate."""
TorchStep = Callable[[torch.optim.Optimizer, torch.Tensor], None]
"""How the training loop calls ``optimizer.step`` with the minibatch's loss."""


def step_with_loss(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """``alig_torch``'s form: the loss as a keyword argument."""
    optimizer.step(loss=loss)  # type: ignore[call-arg]


def step_with_loss_closure(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """A closure that returns the loss's value (``pytorch_optimizer.AliG``)."""
    loss_value = float(loss.detach())
    optimizer.step(lambda value=loss_value: value)  # type: ignore[arg-type, misc]


def step_plain(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """No loss: the gradient only."""
    del loss
    optimizer.step()


@dataclass(frozen=True)
class Method:
    """One optimizer of the benchmark, with the grid it is tuned over."""

    name: str
    framework: Literal["torch", "jax"]
    build: TorchBuild | JaxBuild
    """:data:`TorchBuild` for ``"torch"``, :data:`JaxBuild` for ``"jax"``."""
    lr_key: str
    """The name of the learning rate (a cap for the Polyak methods): the sensitivity axis."""
    lrs: tuple[float, ...]
    quick_lrs: tuple[float, ...]
    axes: Mapping[str, GridAxis] = field(default_factory=dict)
    """The other hyperparameters' grids, crossed with the learning rates."""
    step: TorchStep = step_plain
    records_gamma: bool = False
    """Record the step size at every step (seed 0): the ALI-G methods, for ``gamma.png``."""

    def grid(self, task: Task, quick: bool) -> list[Hyperparameters]:
        """The hyperparameter settings searched on ``task`` (learning rate outermost)."""
        values = [axis(task, quick) for axis in self.axes.values()]
        return [
            {self.lr_key: lr, **dict(zip(self.axes, combination, strict=True))}
            for lr in (self.quick_lrs if quick else self.lrs)
            for combination in itertools.product(*values)
        ]

    def runs_on(self, task: Task) -> bool:
        """The JAX loop mirrors MLPs and linear models only (``Task.jax_compatible``)."""
        return self.framework == "torch" or task.jax_compatible


def _weight_decays(task: Task, quick: bool) -> tuple[float, ...]:
    del task
    return (0.0,) if quick else (0.0, 5e-4)


def _max_norms(task: Task, quick: bool) -> tuple[float, ...]:
    return task.max_norms[:1] if quick else task.max_norms


def _alig(hp: Mapping[str, Any], params: list[nn.Parameter], epochs: int) -> TorchOptimizer:
    del epochs
    max_norm = hp.get("max_norm")
    if max_norm is not None:
        project_onto_ball(params, max_norm)
    return AliG(params, max_lr=hp["max_lr"], momentum=MOMENTUM, max_norm=max_norm), None


def _sgd_nesterov(hp: Mapping[str, Any], params: list[nn.Parameter]) -> torch.optim.SGD:
    return torch.optim.SGD(
        params, lr=hp["lr"], momentum=MOMENTUM, nesterov=True, weight_decay=hp["weight_decay"]
    )


def _sgd_constant(hp: Mapping[str, Any], params: list[nn.Parameter], epochs: int) -> TorchOptimizer:
    del epochs
    return _sgd_nesterov(hp, params), None


def _sgd_step(hp: Mapping[str, Any], params: list[nn.Parameter], epochs: int) -> TorchOptimizer:
    optimizer = _sgd_nesterov(hp, params)
    milestones = [epochs // 2, (3 * epochs) // 4]
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)


def _adam(hp: Mapping[str, Any], params: list[nn.Parameter], epochs: int) -> TorchOptimizer:
    del epochs
    return torch.optim.Adam(params, lr=hp["lr"]), None


def _pytorch_optimizer_alig(
    hp: Mapping[str, Any], params: list[nn.Parameter], epochs: int
) -> TorchOptimizer:
    del epochs
    from pytorch_optimizer import AliG as PoAliG

    return PoAliG(params, max_lr=hp["max_lr"], momentum=MOMENTUM), None


def _optax_polyak_sgd(hp: Mapping[str, Any]) -> Any:
    import optax

    return optax.polyak_sgd(max_learning_rate=hp["max_lr"], f_min=0.0)


POLYAK_LRS = (1e-2, 1e-1, 1.0, 10.0)
POLYAK_QUICK_LRS = (1e-1, 1.0)
SGD_LRS = (1e-3, 1e-2, 1e-1, 1.0)
SGD_QUICK_LRS = (1e-2, 1e-1)

ALIG = "ALI-G"
"""The method whose step sizes ``gamma.png`` plots."""

METHODS: tuple[Method, ...] = (
    Method(ALIG, "torch", _alig, "max_lr", POLYAK_LRS, POLYAK_QUICK_LRS,
           step=step_with_loss, records_gamma=True),
    Method("ALI-G + max_norm", "torch", _alig, "max_lr", POLYAK_LRS, POLYAK_QUICK_LRS,
           axes={"max_norm": _max_norms}, step=step_with_loss, records_gamma=True),
    Method("SGD Nesterov, constant", "torch", _sgd_constant, "lr", SGD_LRS, SGD_QUICK_LRS,
           axes={"weight_decay": _weight_decays}),
    Method("SGD Nesterov, step", "torch", _sgd_step, "lr", SGD_LRS, SGD_QUICK_LRS,
           axes={"weight_decay": _weight_decays}),
    Method("Adam", "torch", _adam, "lr", (1e-4, 1e-3, 1e-2, 1e-1), (1e-3, 1e-2)),
    Method("pytorch_optimizer.AliG", "torch", _pytorch_optimizer_alig, "max_lr", POLYAK_LRS,
           POLYAK_QUICK_LRS, step=step_with_loss_closure),
    Method("optax.polyak_sgd", "jax", _optax_polyak_sgd, "max_lr", POLYAK_LRS,
           POLYAK_QUICK_LRS),
)  # fmt: skip
"""Every method, in the order of the tables (the ``"jax"`` ones run with ``--with-jax``)."""

METHODS_BY_NAME: dict[str, Method] = {method.name: method for method in METHODS}
