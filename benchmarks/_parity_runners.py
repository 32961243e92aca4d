"""The parity run in each framework: same model, same start, same minibatches, ALI-G.

Every runner takes the initial weights (NumPy), the ALI-G keyword arguments and a dtype,
and exposes ``step(x, y) -> StepRecord``: one training step on the minibatch, returning
the loss, gamma, the parameters and the momentum buffers after the step as NumPy float64
arrays (so that the caller compares them with the oracle's). ``RUNNERS`` maps a name to
its factory; frameworks are imported only by the runner that needs them.

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
from benchmarks._parity_setup import numpy_loss_and_grads

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
    """float64 copies (a torch tensor's .numpy() shares memory with the live parameter)."""
    return [np.array(v, dtype=np.float64, copy=True) for v in values]


def _split_extrapolation(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
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
        alig_kwargs, extrapolation = _split_extrapolation(alig_kwargs)
        self.config = AliGConfig(**alig_kwargs)
        self.params = _as_numpy(weights)
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


class TorchRunner:
    """alig_torch.AliG, eager, with the loss handed over by a closure."""

    name = "torch"

    def __init__(self, weights: Sequence[np.ndarray], alig_kwargs: dict[str, Any], dtype: str):
        import torch

        from alig_torch import AliG, Extrapolation

        alig_kwargs, extrapolation = _split_extrapolation(alig_kwargs)
        self.torch = torch
        self.dtype = getattr(torch, dtype)
        self.params = [torch.nn.Parameter(torch.tensor(w, dtype=self.dtype)) for w in weights]
        self.alig = AliG(self.params, **alig_kwargs)
        self.opt: Any = (
            self.alig if extrapolation is None else Extrapolation(self.alig, **extrapolation)
        )
        self.momentum = alig_kwargs.get("momentum", 0.0)

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord:
        torch = self.torch
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
            _as_numpy([p.detach().numpy() for p in self.params]),
            None if buffers is None else _as_numpy(buffers),
        )


class JaxRunner:
    """alig_jax.alig, the whole training step under jax.jit."""

    name = "jax"

    def __init__(self, weights: Sequence[np.ndarray], alig_kwargs: dict[str, Any], dtype: str):
        import jax

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        import optax

        from alig_jax import AliGState, alig, extrapolation

        alig_kwargs, extrapolation_kwargs = _split_extrapolation(alig_kwargs)
        tx = alig(**alig_kwargs)
        if extrapolation_kwargs is not None:
            tx = extrapolation(tx, **extrapolation_kwargs)
        self.alig_state_of: Callable[[Any], AliGState] = (
            (lambda state: state) if extrapolation_kwargs is None else _base_state
        )
        self.params = [jnp.asarray(w, dtype=dtype) for w in weights]
        self.state = tx.init(self.params)

        def loss_fn(params: list[Any], x: Any, y: Any) -> Any:
            w1, b1, w2, b2 = params
            logits = jnp.tanh(x @ w1 + b1) @ w2 + b2
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        @jax.jit
        def train_step(params: list[Any], state: Any, x: Any, y: Any) -> Any:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params, value=loss)
            return optax.apply_updates(params, updates), state, loss

        self.train_step = train_step
        self.dtype = dtype

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord:
        self.params, self.state, loss = self.train_step(
            self.params, self.state, x.astype(self.dtype), y
        )
        alig_state = self.alig_state_of(self.state)
        buffers = None if alig_state.momentum is None else _as_numpy(alig_state.momentum)
        return StepRecord(
            float(loss),
            float(alig_state.gamma),
            bool(alig_state.capped),
            _as_numpy(self.params),
            buffers,
        )


def _base_state(state: Any) -> Any:
    """ALI-G's state inside an ``alig_jax.extrapolation`` state."""
    return state.base_state


class KerasRunner:
    """alig_tf.AliG on the TensorFlow backend, the training step under tf.function."""

    name = "keras"

    def __init__(self, weights: Sequence[np.ndarray], alig_kwargs: dict[str, Any], dtype: str):
        import keras

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError("the keras parity runner needs KERAS_BACKEND=tensorflow")
        import tensorflow as tf

        from alig_tf import AliG, Extrapolation

        alig_kwargs, extrapolation = _split_extrapolation(alig_kwargs)
        self.variables = [keras.Variable(w, dtype=dtype) for w in weights]
        self.alig = AliG(**alig_kwargs)
        opt: Any = self.alig if extrapolation is None else Extrapolation(self.alig, **extrapolation)
        opt.build(self.variables)
        variables = self.variables

        @tf.function
        def train_step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                w1, b1, w2, b2 = (v.value for v in variables)
                logits = tf.tanh(x @ w1 + b1) @ w2 + b2
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                )
            grads = tape.gradient(loss, [v.value for v in variables])
            opt.apply(grads, variables, loss=loss)
            return loss

        self.train_step = train_step
        self.dtype = dtype

    def step(self, x: np.ndarray, y: np.ndarray) -> StepRecord:
        loss = self.train_step(x.astype(self.dtype), y)
        buffers = [m.value.numpy() for m in self.alig.momentums] or None
        return StepRecord(
            float(loss),
            float(self.alig.gamma.value.numpy()),
            bool(self.alig.capped.value.numpy()),
            _as_numpy([v.value.numpy() for v in self.variables]),
            None if buffers is None else _as_numpy(buffers),
        )


RUNNERS: dict[str, Callable[[Sequence[np.ndarray], dict[str, Any], str], Runner]] = {
    "oracle": OracleRunner,
    "torch": TorchRunner,
    "keras": KerasRunner,
    "jax": JaxRunner,
}
