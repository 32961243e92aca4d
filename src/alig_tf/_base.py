"""The base of alig_tf's optimizers: how the loss reaches them, which variables they take.

The loss (docs/specification.md, section 5): ``model.fit`` hands it to ``scale_loss`` on
the TensorFlow and torch backends; custom loops pass ``loss=`` to ``apply``,
``apply_gradients`` or ``stateless_apply``; on JAX the :class:`~alig_tf.AliGTrainStep`
mixin passes it to ``stateless_apply``. Either way it waits in a :class:`PendingLosses`
slot until the step takes it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

import alig_core
from alig_tf import _backend

__all__ = ["LossTakingOptimizer", "PendingLosses", "as_loss", "loss_in"]


def as_loss(loss: Any) -> Any:
    """Checks the loss and returns it as a tensor with no gradient attached."""
    if isinstance(loss, str | bytes | bool):
        raise ValueError(
            f"ALI-G needs the loss as a real scalar tensor or number, got {loss!r} "
            f"(type {type(loss).__name__}). Pass the value that was differentiated: "
            "optimizer.apply(grads, variables, loss=loss)."
        )
    if isinstance(loss, int | float):  # converted at the step, in the accumulation dtype
        return float(loss)
    tensor = ops.convert_to_tensor(loss)
    if len(tensor.shape) != 0 and math.prod(tensor.shape) != 1:
        raise ValueError(
            f"ALI-G needs the loss as a scalar, got a tensor of shape {tuple(tensor.shape)}. "
            "Reduce it first (e.g. ops.mean(loss)) and pass the value that was differentiated."
        )
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if "float" not in dtype and "int" not in dtype:
        raise ValueError(
            f"ALI-G needs the loss as a real scalar, got {loss!r} of dtype {dtype}. "
            "Pass the real-valued loss that was differentiated."
        )
    return ops.stop_gradient(ops.reshape(tensor, ()))


def loss_in(loss: Any, dtype: str) -> Any:
    """A loss from :func:`as_loss` as a tensor of ``dtype`` (a Python number not via float32)."""
    if isinstance(loss, float):  # not through float32 (TensorFlow's default)
        return ops.convert_to_tensor(loss, dtype=dtype)
    return ops.cast(loss, dtype)


class PendingLosses:
    """The loss handed over for the next step: one slot per replica.

    Filled by ``scale_loss`` (or ``loss=``), taken by the step. Under MirroredStrategy the
    replicas' threads share the optimizer and may pass a merge call between the two (Keras'
    own steps make several), so each replica keeps its loss in a slot of its own.
    """

    def __init__(self) -> None:
        self._slots: dict[Any, Any] = {}

    def put(self, loss: Any) -> None:
        self._slots[_backend.replica_key()] = loss

    def take(self) -> Any:
        """This replica's loss (``None`` if there is none), and the slot emptied."""
        return self._slots.pop(_backend.replica_key(), None)

    def clear(self) -> None:
        self._slots.pop(_backend.replica_key(), None)


class LossTakingOptimizer(keras.optimizers.Optimizer):
    """A Keras optimizer that takes the loss with the gradients (AliG, Extrapolation).

    The loss arrives through :meth:`scale_loss` or a ``loss=`` argument and serves one
    call only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_losses = PendingLosses()

    def _check_variables(
        self, variables: list[Any], how_to_pass: str, *, allow_empty: bool = False
    ) -> str:
        """Raises for a non-float variable (and no variable, unless ``allow_empty``).

        Returns their accumulation dtype (``floatx``'s with no variable). ``how_to_pass``
        ends the message for an empty list (how to give the variables).
        """
        who = type(self).__name__
        if not variables and allow_empty:  # Keras' optimizers build on [] (nothing trains)
            return alig_core._math.accumulation_dtype(keras.config.floatx())
        if not variables:
            raise ValueError(
                f"{who} got no variables to optimize (an empty list). Pass the model's "
                f"trainable variables: {how_to_pass}."
            )
        for variable in variables:
            dtype = keras.backend.standardize_dtype(variable.dtype)
            if "float" not in dtype:
                raise ValueError(
                    f"{who} optimizes real floating-point variables; {variable.path!r} has "
                    f"dtype {dtype} and shape {tuple(variable.shape)}. Leave integer "
                    "variables out of the optimized list (trainable=False), and optimize a "
                    "complex quantity as two float variables (its real and imaginary parts)."
                )
        return alig_core._math.accumulation_dtype(*(v.dtype for v in variables))

    def _gradients_of_built_variables(
        self, grads: list[Any], trainable_variables: list[Any] | None
    ) -> list[Any] | None:
        """Checks one call's arguments; one gradient per built variable (``None``: none).

        Builds the optimizer on its first call. Returns ``None`` for no gradient at all
        (Keras' no-op on ``[]``); raises a ``ValueError`` for variables missing before the
        build, a count that differs, or every gradient ``None``.
        """
        who = f"{type(self).__name__}.apply()"
        if len(grads) == 0:
            return None
        if trainable_variables is None and not self.built:
            raise ValueError(
                f"{who} without variables before it is built: pass "
                "apply(grads, model.trainable_variables, ...) on the first call."
            )
        given = list(
            self._trainable_variables if trainable_variables is None else trainable_variables
        )
        if len(grads) != len(given):
            raise ValueError(
                f"{who} got {len(grads)} gradients for {len(given)} variables; pass one "
                "gradient per variable."
            )
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(given)
        self._check_variables_are_known(given)
        if all(g is None for g in grads):
            raise ValueError(
                f"No gradient reached {type(self).__name__} for any variable (every gradient "
                "is None). Check that the loss depends on the trainable variables."
            )
        full: list[Any] = [None] * len(self._trainable_variables)
        for g, v in zip(grads, given, strict=True):
            full[self._get_variable_index(v)] = g
        return full

    def _refuse_other_settings(
        self, store: Any, index: int, ours: int, describe: Any, why: str, this: str = ""
    ) -> None:
        """Raises where the variables in ``store`` were saved with other settings.

        ``store[str(index)]`` holds the saved settings as one int (``ours`` is this
        optimizer's); ``describe`` names an int's settings, ``why`` says what would change,
        ``this`` names this optimizer in the message (its class by default).
        """
        if not (self.built and len(store.keys()) == len(self.variables)):
            return
        saved = int(ops.convert_to_numpy(store[str(index)]))
        if saved != ours:
            who = type(self).__name__
            raise ValueError(
                f"These optimizer variables were saved by an {who} with {describe(saved)}, "
                f"and this {this or who} has {describe(ours)}: {why}. Compile the model with "
                f"an {who} of the checkpoint's settings to resume."
            )

    @contextlib.contextmanager
    def _loss_of_this_call(self, loss: Any) -> Iterator[None]:
        """Holds ``loss`` (if given) for the block; no loss is left pending after it."""
        if loss is not None:
            self._pending_losses.put(as_loss(loss))
        try:
            yield
        finally:
            self._pending_losses.clear()  # a loss serves one call only

    def scale_loss(self, loss: Any) -> Any:
        """Keeps the (unscaled) training loss for the next call, then scales it as Keras does.

        The TensorFlow and torch trainers call this just before differentiating.
        """
        if _backend.name() != "jax":  # the JAX trainer runs this in a scope it discards
            self._pending_losses.put(as_loss(loss))
        return super().scale_loss(loss)

    def apply_gradients(self, grads_and_vars: Any, loss: Any = None) -> Any:
        """``apply_gradients`` with the loss, for tf.keras-style loops."""
        grads, trainable_variables = zip(*grads_and_vars, strict=True)
        self.apply(list(grads), list(trainable_variables), loss=loss)
        return self._iterations

    def stateless_apply(
        self,
        optimizer_variables: list[Any],
        grads: list[Any],
        trainable_variables: list[Any],
        loss: Any = None,
    ) -> tuple[list[Any], list[Any]]:
        """``stateless_apply`` with the loss (JAX: custom loops, :class:`AliGTrainStep`)."""
        with self._loss_of_this_call(loss):
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)
