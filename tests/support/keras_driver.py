"""alig_tf.AliG and keras.optimizers.SGD, seen from the shared tables (NumPy in, NumPy out).

:class:`KerasDriver` is the :class:`bad_inputs.Driver` of ``alig_tf.AliG`` through
``apply(grads, variables, loss=...)``, on any Keras backend: eagerly, or (TensorFlow) inside
a plain ``tf.function`` as a custom loop runs it (``"graph"``) and compiled by XLA
(``"xla"``), each its own path through the norm and the skipped-step select.
:class:`KerasSGD` is the :class:`alig_checks.NesterovSGD` of
``keras.optimizers.SGD(nesterov=True)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np

from alig_tf import AliG
from bad_inputs import MISSING

__all__ = ["MODES", "RECORDS", "KerasDriver", "KerasSGD", "floatx_scope"]

RECORDS = ("gamma", "gamma_hat", "capped", "steps_taken", "steps_skipped")
"""AliG's record variables (attributes of the same names)."""

MODES: tuple[str, ...] = (
    ("eager", "graph", "xla") if keras.backend.backend() == "tensorflow" else ("eager",)
)
"""How ``apply`` can run on this backend."""


@contextlib.contextmanager
def floatx_scope(dtype: str) -> Iterator[None]:
    """``keras.config.floatx()`` is ``dtype`` inside (the optimizer's own variables, the
    learning rate among them, take it), and what it was after."""
    previous = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(previous)


def _tensors(grads: Sequence[np.ndarray | None], variables: Sequence[keras.Variable]) -> list[Any]:
    return [
        None if g is None else keras.ops.convert_to_tensor(g, dtype=v.dtype)
        for g, v in zip(grads, variables, strict=True)
    ]


def _numpy(variables: Sequence[keras.Variable]) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]


class KerasDriver:
    """AliG on keras.Variables through ``apply(grads, variables, loss=...)``."""

    framework = "keras"
    loss_help = "loss=loss"
    advances_on_skip = frozenset({"iterations"})  # Keras counts every apply()

    def __init__(self, mode: str = "eager") -> None:
        assert mode in MODES, f"{mode!r} is not a mode of {keras.backend.backend()}: {MODES}"
        self.mode = mode

    def build(self, params: Sequence[np.ndarray], **config: Any) -> None:
        self.variables = [
            keras.Variable(p, dtype=str(p.dtype), trainable=p.dtype.kind == "f") for p in params
        ]
        self.opt = AliG(**config)
        self._compiled: Callable[[list[Any], Any], None] | None = None
        if self.mode != "eager":  # a tf.function must not create the optimizer's variables
            import tensorflow as tf

            self.opt.build(self.variables)

            @tf.function(jit_compile=self.mode == "xla")
            def compiled(grads: list[Any], loss: Any) -> None:
                self.opt.apply(grads, self.variables, loss=loss)

            self._compiled = compiled

    def step(self, loss: Any, grads: Sequence[np.ndarray | None], *, sparse: bool = False) -> None:
        assert not sparse
        tensors = _tensors(grads, self.variables)
        if self._compiled is not None:
            import tensorflow as tf

            self._compiled(tensors, tf.constant(loss, dtype=self.variables[0].dtype))
        elif loss is MISSING:
            self.opt.apply(tensors, self.variables)
        else:
            self.opt.apply(tensors, self.variables, loss=loss)

    def params(self) -> list[np.ndarray]:
        return _numpy(self.variables)

    def state(self) -> dict[str, np.ndarray]:
        if not self.opt.built:
            return {}
        named = {id(getattr(self.opt, name)): name for name in RECORDS}
        named[id(self.opt.iterations)] = "iterations"
        return {  # by position: variable paths carry a process-wide counter
            named.get(id(v), f"variables[{i}]"): np.array(keras.ops.convert_to_numpy(v.value))
            for i, v in enumerate(self.opt.variables)
        }

    def buffers(self) -> list[np.ndarray | None]:
        momentums = getattr(self.opt, "momentums", None)  # built with momentum > 0
        return _numpy(momentums) if momentums else [None] * len(self.variables)


class KerasSGD:
    """``keras.optimizers.SGD(nesterov=True)``: lr inside its buffer (``m <- mu*m - lr*g;
    w <- w + mu*m - lr*g``), ALI-G's standard form."""

    lr_convention = "standard"
    missing_gradients = True  # apply() leaves a variable without a gradient alone

    def hyperparameters(self, lr: float, momentum: float) -> tuple[float, float]:
        """On TensorFlow ``ops.cast(self.momentum, dtype)`` converts the Python float to a
        float32 tensor first; the learning rate is a variable (floatx)."""
        if keras.backend.backend() == "tensorflow":
            return lr, float(np.float32(momentum))
        return lr, momentum

    def build(self, params: Sequence[np.ndarray], *, lr: float, momentum: float) -> None:
        self.variables = [keras.Variable(p, dtype=str(p.dtype)) for p in params]
        self.opt = keras.optimizers.SGD(learning_rate=lr, momentum=momentum, nesterov=True)

    def step(self, grads: Sequence[np.ndarray | None], *, lr: float | None = None) -> None:
        if lr is not None:
            self.opt.learning_rate = lr  # assigns its learning-rate variable (floatx)
        self.opt.apply(_tensors(grads, self.variables), self.variables)

    def params(self) -> list[np.ndarray]:
        return _numpy(self.variables)

    def buffers(self) -> list[np.ndarray | None]:
        return _numpy(self.opt.momentums)
