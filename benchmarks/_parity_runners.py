"""The parity run in each framework: same model, same start, same minibatches, ALI-G.

Every runner takes the initial weights (NumPy), the ALI-G keyword arguments and a dtype,
and exposes ``step(x, y) -> StepRecord``: one training step on the minibatch, returning
the loss, gamma, the parameters and the momentum buffers after the step as NumPy float64
arrays (so that the caller compares them with the oracle's). ``RUNNERS`` maps a name to
its factory; frameworks are imported only by the runner that needs them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from _parity_setup import numpy_loss_and_grads
from alig_core import AliGConfig
from alig_core.oracle import OracleState, oracle_step

__all__ = ["RUNNERS", "Runner", "StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """What one training step reports, in NumPy float64."""

    loss: float
    gamma: float
    capped: bool
    params: list[np.ndarray]
    buffers: list[np.ndarray] | None
    """Momentum buffers in the SPEC's convention, or ``None`` when momentum is 0."""


class Runner(Protocol):
    """One framework's training loop on the parity model."""

    name: str

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord: ...


def _as_numpy(values: Sequence[Any]) -> list[np.ndarray]:
    return [np.asarray(v, dtype=np.float64) for v in values]


class OracleRunner:
    """The NumPy float64 oracle, with gradients computed by hand."""

    name = "oracle"

    def __init__(self, weights: Sequence[np.ndarray], alig_kwargs: dict[str, Any], dtype: str):
        del dtype  # the oracle always computes in float64
        self.config = AliGConfig(**alig_kwargs)
        self.params = _as_numpy(weights)
        self.state = OracleState.zeros(len(self.params))

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord:
        loss, grads = numpy_loss_and_grads(self.params, x, y)
        self.params, self.state = oracle_step(self.params, grads, loss, self.state, self.config)
        buffers = None if self.config.momentum == 0 else list(self.state.buffers)
        return StepRecord(loss, self.state.gamma, self.state.capped, self.params, buffers)


RUNNERS: dict[str, Callable[[Sequence[np.ndarray], dict[str, Any], str], Runner]] = {
    "oracle": OracleRunner,
}

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
