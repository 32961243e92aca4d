"""The parity run in each framework: same model, same start, same minibatches, ALI-G.

Every runner takes the initial weights (NumPy), the ALI-G keyword arguments and a dtype,
and exposes ``step(x, y) -> StepRecord``: one training step on the minibatch, returning
the loss, gamma, the parameters and the momentum buffers after the step as NumPy float64
arrays (so that the caller compares them with the oracle's). ``RUNNERS`` maps a name to
its factory: the oracle's here, each framework's ``ParityRunner`` in
``benchmarks.frameworks._<name>``, imported only by the runner that needs it.

With ``extrapolation`` (the options of ``alig_core.ExtrapolationConfig``, e.g.
``{"mode": "past"}``), every runner wraps its ALI-G in its framework's extrapolation
wrapper and the oracle runs ``alig_core.oracle_extrapolation``: the record's parameters are
then what the parameters hold after the call (``w~`` where extrapolated) and its gamma
ALI-G's of the last update. Only ``"past"`` mode is offered: one evaluation per call, so
every framework's call form is the same loop, and no random numbers to share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from alig_core import AliGConfig, ExtrapolationConfig
from alig_core.oracle import OracleState, oracle_step
from alig_core.oracle_extrapolation import ExtrapolationOracle
from benchmarks import frameworks
from benchmarks._parity_setup import numpy_loss_and_grads

__all__ = ["RUNNERS", "Runner", "StepRecord", "as_numpy", "split_extrapolation"]


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


def as_numpy(values: Sequence[Any]) -> list[np.ndarray]:
    """float64 copies (a torch tensor's .numpy() shares memory with the live parameter)."""
    return [np.array(v, dtype=np.float64, copy=True) for v in values]


def split_extrapolation(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """ALI-G's keyword arguments, and the extrapolation options (``None``: not wrapped)."""
    kwargs = dict(kwargs)
    extrapolation = kwargs.pop("extrapolation", None)
    if extrapolation is not None and extrapolation.get("mode") != "past":
        raise ValueError(
            f"The parity runners take the extrapolation mode 'past' only (one evaluation per "
            f"call, no random numbers), got {extrapolation!r}: pass mode='past'."
        )
    return kwargs, extrapolation


class OracleRunner:
    """The NumPy float64 oracle, with gradients computed by hand."""

    name = "oracle"

    def __init__(self, weights: Sequence[np.ndarray], alig_kwargs: dict[str, Any], dtype: str):
        del dtype  # the oracle always computes in float64
        alig_kwargs, extrapolation = split_extrapolation(alig_kwargs)
        self.config = AliGConfig(**alig_kwargs)
        self.params = as_numpy(weights)
        self.state = OracleState.zeros(len(self.params))
        self.extrapolation = (
            None
            if extrapolation is None
            else ExtrapolationOracle(self.params, ExtrapolationConfig(**extrapolation), self.config)
        )

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord:
        if self.extrapolation is not None:
            losses: list[float] = []

            def evaluate(point: Sequence[np.ndarray], batch: int) -> Any:
                del batch
                loss, grads = numpy_loss_and_grads(list(point), x, y)
                losses.append(loss)
                return loss, grads

            record = self.extrapolation.call(evaluate, 0)
            state = record.alig_state
            assert state is not None
            buffers = None if self.config.momentum == 0 else list(state.buffers)
            return StepRecord(losses[-1], state.gamma, state.capped, record.params, buffers)
        loss, grads = numpy_loss_and_grads(self.params, x, y)
        self.params, self.state = oracle_step(self.params, grads, loss, self.state, self.config)
        buffers = None if self.config.momentum == 0 else list(self.state.buffers)
        return StepRecord(loss, self.state.gamma, self.state.capped, self.params, buffers)


RunnerFactory = Callable[[Sequence[np.ndarray], dict[str, Any], str], Runner]


def _framework_runner(name: str) -> RunnerFactory:
    """The ``ParityRunner`` of ``benchmarks.frameworks._<name>`` (imported when called)."""

    def make(weights: Sequence[np.ndarray], alig_kwargs: dict[str, Any], dtype: str) -> Runner:
        runner: Runner = frameworks.load(name).ParityRunner(weights, alig_kwargs, dtype)
        return runner

    return make


RUNNERS: dict[str, RunnerFactory] = {
    "oracle": OracleRunner,
    **{name: _framework_runner(name) for name in ("torch", "keras", "jax")},
}
