"""alig_torch.AliG and torch.optim.SGD, seen from the shared tables (NumPy in, NumPy out).

:class:`TorchDriver` is the :class:`bad_inputs.Driver` of ``alig_torch.AliG`` on one step
path (``foreach``); :class:`TorchSGD` is the :class:`alig_checks.NesterovSGD` of
``torch.optim.SGD(nesterov=True)``. Every torch test that runs a shared table or a generic
check (``alig_checks``) builds its optimizer through them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from alig_torch import AliG
from bad_inputs import MISSING

__all__ = ["RECORDS", "TorchDriver", "TorchSGD"]

RECORDS = ("gamma", "gamma_hat", "capped", "steps_taken", "steps_skipped")
"""What AliG records in each param group (every group holds the same values)."""


def _leaves(params: Sequence[np.ndarray]) -> list[torch.Tensor]:
    tensors = [torch.from_numpy(np.array(p)) for p in params]
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            t.requires_grad_(True)
    return tensors


def _set_grads(tensors: Sequence[torch.Tensor], grads: Sequence[np.ndarray | None]) -> None:
    for t, g in zip(tensors, grads, strict=True):
        t.grad = None if g is None else torch.from_numpy(np.array(g)).to(t.dtype)


class TorchDriver:
    """AliG on leaf tensors; the loss arrives by ``loss=``, or by a closure returning None."""

    framework = "torch"
    loss_help = "opt.step(loss=loss)"
    advances_on_skip: frozenset[str] = frozenset()

    def __init__(self, foreach: bool | None = None) -> None:
        self.foreach = foreach

    def build(self, params: Sequence[np.ndarray], **config: Any) -> None:
        self.tensors = _leaves(params)
        self.opt = AliG(self.tensors, foreach=self.foreach, **config)

    def step(self, loss: Any, grads: Sequence[np.ndarray | None], *, sparse: bool = False) -> None:
        _set_grads(self.tensors, grads)
        if sparse:
            self.tensors[0].grad = self.tensors[0].grad.to_sparse()
        if loss is MISSING:
            self.opt.step()
        elif loss is None:
            self.opt.step(lambda: None)
        elif isinstance(loss, np.ndarray):
            self.opt.step(loss=torch.from_numpy(loss))
        else:
            self.opt.step(loss=loss)

    def params(self) -> list[np.ndarray]:
        return [t.detach().numpy().copy() for t in self.tensors]

    def state(self) -> dict[str, np.ndarray]:
        state_dict = self.opt.state_dict()
        out = {
            f"{index}.{key}": value.numpy().copy()
            for index, entry in state_dict["state"].items()
            for key, value in entry.items()
        }
        for group in state_dict["param_groups"]:
            for key in RECORDS:
                out[key] = group[key].numpy().copy()
        return out

    def buffers(self) -> list[np.ndarray | None]:
        return [
            self.opt.state[t]["momentum_buffer"].numpy().copy()
            if "momentum_buffer" in self.opt.state[t]
            else None
            for t in self.tensors
        ]


class TorchSGD:
    """``torch.optim.SGD(nesterov=True)``: lr outside its buffer (ALI-G's adjusted form)."""

    lr_convention = "adjusted"
    missing_gradients = True

    def hyperparameters(self, lr: float, momentum: float) -> tuple[float, float]:
        return lr, momentum

    def build(self, params: Sequence[np.ndarray], *, lr: float, momentum: float) -> None:
        self.tensors = _leaves(params)
        self.opt = torch.optim.SGD(self.tensors, lr=lr, momentum=momentum, nesterov=True)

    def step(self, grads: Sequence[np.ndarray | None], *, lr: float | None = None) -> None:
        _set_grads(self.tensors, grads)
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        self.opt.step()

    def params(self) -> list[np.ndarray]:
        return [t.detach().numpy().copy() for t in self.tensors]

    def buffers(self) -> list[np.ndarray | None]:
        return [
            -self.opt.state[t]["momentum_buffer"].numpy()
            if "momentum_buffer" in self.opt.state[t]
            else None
            for t in self.tensors
        ]
