"""alig_jax.alig and optax.sgd, seen from the shared tables (NumPy in, NumPy out).

:class:`OptaxDriver` is the :class:`bad_inputs.Driver` of ``alig_jax.alig`` (its update
jitted or not); :class:`OptaxSGD` is the :class:`alig_checks.NesterovSGD` of
``optax.sgd(nesterov=True)``. The parameters are a list of arrays, updated by ``p + u``
(not ``optax.apply_updates``, which casts the update to the parameter's dtype and would
hide an update of the wrong dtype; it also refuses the ``None`` update of a parameter
without a gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alig_jax import alig
from bad_inputs import MISSING

__all__ = ["RECORDS", "OptaxDriver", "OptaxSGD", "apply"]

RECORDS = ("gamma", "gamma_hat", "capped", "steps_taken", "steps_skipped")
"""The fields of ``AliGState`` that record the last step."""


def apply(params: Sequence[Any], updates: Sequence[Any]) -> list[Any]:
    """``p + u``, leaving a parameter whose update is ``None`` (no gradient) as it is."""
    return [p if u is None else p + u for p, u in zip(params, updates, strict=True)]


def _arrays(grads: Sequence[np.ndarray | None]) -> list[jax.Array | None]:
    return [None if g is None else jnp.asarray(g) for g in grads]


class OptaxDriver:
    """``alig`` on a list of arrays, its update jitted or not; the loss goes in ``value=``."""

    framework = "jax"
    loss_help = "value=loss"
    advances_on_skip: frozenset[str] = frozenset()

    def __init__(self, jit: bool = True) -> None:
        self.jit = jit

    def build(self, params: Sequence[np.ndarray], **config: Any) -> None:
        self.tx = alig(**config)
        self.jitted = jax.jit(self.tx.update)
        self.current = [jnp.asarray(p) for p in params]
        self.opt_state = self.tx.init(self.current)

    def step(self, loss: Any, grads: Sequence[np.ndarray | None], *, sparse: bool = False) -> None:
        assert not sparse
        kwargs = {} if loss is MISSING else {"value": loss}
        # Only a number can be traced: the bad values are checked on the eager update.
        update = self.jitted if self.jit and isinstance(loss, float) else self.tx.update
        updates, self.opt_state = update(_arrays(grads), self.opt_state, self.current, **kwargs)
        self.current = apply(self.current, updates)

    def params(self) -> list[np.ndarray]:
        return [np.asarray(p) for p in self.current]

    def state(self) -> dict[str, np.ndarray]:
        out = {name: np.asarray(getattr(self.opt_state, name)) for name in RECORDS}
        for i, buffer in enumerate(jax.tree.leaves(self.opt_state.momentum_buffer)):
            out[f"momentum.{i}"] = np.asarray(buffer)
        return out

    def buffers(self) -> list[np.ndarray | None]:
        if self.opt_state.momentum_buffer is None:
            return [None] * len(self.current)
        return [None if b is None else np.asarray(b) for b in self.opt_state.momentum_buffer]


class OptaxSGD:
    """``optax.sgd(nesterov=True)`` under ``inject_hyperparams`` (its learning rate can be
    set per step): lr outside its trace (ALI-G's adjusted form)."""

    lr_convention = "adjusted"
    missing_gradients = False  # a None gradient does not match the trace's structure

    def hyperparameters(self, lr: float, momentum: float) -> tuple[float, float]:
        return lr, momentum

    def build(self, params: Sequence[np.ndarray], *, lr: float, momentum: float) -> None:
        self.tx = optax.inject_hyperparams(optax.sgd)(
            learning_rate=lr, momentum=momentum, nesterov=True
        )
        self.current = [jnp.asarray(p) for p in params]
        self.opt_state = self.tx.init(self.current)

    def step(self, grads: Sequence[np.ndarray | None], *, lr: float | None = None) -> None:
        if lr is not None:
            rate = self.opt_state.hyperparams["learning_rate"]
            self.opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, rate.dtype)
        updates, self.opt_state = self.tx.update(_arrays(grads), self.opt_state, self.current)
        self.current = apply(self.current, updates)

    def params(self) -> list[np.ndarray]:
        return [np.asarray(p) for p in self.current]

    def buffers(self) -> list[np.ndarray | None]:
        traces = [
            s
            for s in jax.tree.leaves(
                self.opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState)
            )
            if isinstance(s, optax.TraceState)
        ]
        assert len(traces) == 1, traces
        return [-np.asarray(b) for b in traces[0].trace]
