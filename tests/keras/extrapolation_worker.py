"""alig_tf.Extrapolation on the shared extrapolation table; model.fit; resume in a new process.

Imported by test_keras_extrapolation*.py (``import_script``):

- :class:`KerasRun` (the ``extrapolation_checks.ExtrapolationRun`` of Keras; its base
  outside a wrapper: :class:`BareBase`) drives the wrapper directly with the (loss,
  gradient) evaluations of ``extrapolation_cases.Problem`` (NumPy float64, so the 1e-10
  checks measure the optimizer, not Keras' float64 forward passes), call by call, in both
  call forms, as ``model.fit`` runs it (TensorFlow: XLA; JAX: ``jax.jit`` of
  ``stateless_apply``; torch: eagerly) or another way (``mode``);
- :func:`build_model` is the same problem as a Keras model (float64-safe layer and loss:
  ``keras_float64.Linear`` with a scalar offset, and sums), for ``model.fit``.

Run as a script by test_keras_extrapolation_fit.py: ``python extrapolation_worker.py
MODEL.keras OUT`` loads the ``.keras`` file (model, weights, the wrapper's and the base's
variables), trains it for the remaining epochs of :func:`fit` and writes the weights, the
anchor and the optimizer's variables to OUT (.npz). The backend comes from KERAS_BACKEND.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()
if BACKEND == "jax":
    import jax

    jax.config.update("jax_enable_x64", True)

from alig_core import AliGConfig, ExtrapolationConfig  # noqa: E402
from alig_core.oracle_extrapolation import SGDNesterov  # noqa: E402
from alig_tf import AliG, AliGTrainStep, Extrapolation  # noqa: E402
from extrapolation_cases import (  # noqa: E402
    ExtrapolationCase,
    Problem,
    initial_params,
    wrapper_options,
)
from extrapolation_checks import RunBase  # noqa: E402
from keras_driver import floatx_scope  # noqa: E402
from keras_float64 import Linear  # noqa: E402

DEFAULT_MODE = {"tensorflow": "xla", "jax": "jit", "torch": "eager"}[BACKEND]
"""How ``model.fit`` runs an optimizer on this backend (TensorFlow's ``jit_compile="auto"``
is XLA; the JAX trainer jits ``stateless_apply``; torch's trainer steps eagerly)."""

MODES = {"tensorflow": ("xla", "graph", "eager"), "jax": ("jit", "eager"), "torch": ("eager",)}[
    BACKEND
]


def make_base(config: SGDNesterov | AliGConfig) -> keras.optimizers.Optimizer:
    """keras.optimizers.SGD(nesterov=True) or AliG, from the oracle's description of the base.

    Built under the floatx of the run (Keras keeps the learning rate in a floatx variable).
    """
    if isinstance(config, SGDNesterov):
        return keras.optimizers.SGD(
            learning_rate=config.lr, momentum=config.momentum, nesterov=config.momentum > 0
        )
    return AliG(
        max_lr=config.max_lr,
        momentum=config.momentum,
        adjusted_momentum=config.adjusted_momentum,
        eps=config.eps,
        f_star=config.f_star,
        max_norm=config.max_norm,
    )


def numpy(x: Any) -> np.ndarray:
    return np.array(ops.convert_to_numpy(x.value if isinstance(x, keras.Variable) else x))


def bits(arrays: Sequence[Any]) -> list[bytes]:
    """Each variable's (or tensor's, or array's) bytes."""
    return [numpy(a).tobytes() for a in arrays]


def stepper(
    opt: Extrapolation, variables: list[keras.Variable], mode: str, dtype: str
) -> Callable[[list[Any], float], None]:
    """``apply(grads, loss)``: one call of the wrapper, run the way ``mode`` says."""

    def tensors(grads: list[Any], loss: float) -> tuple[list[Any], Any]:
        return (
            [None if g is None else ops.convert_to_tensor(np.asarray(g, dtype)) for g in grads],
            ops.convert_to_tensor(np.asarray(loss, dtype)),
        )

    if mode == "eager":

        def eager(grads: list[Any], loss: float) -> None:
            g, l_ = tensors(grads, loss)
            opt.apply(g, variables, loss=l_)

        return eager
    if mode in ("graph", "xla"):
        import tensorflow as tf

        @tf.function(jit_compile=mode == "xla")
        def compiled(grads: list[Any], loss: Any) -> None:
            opt.apply(grads, variables, loss=loss)

        def graph(grads: list[Any], loss: float) -> None:
            compiled(*tensors(grads, loss))

        return graph
    assert mode == "jit"
    import jax

    @jax.jit
    def stateless(opt_values: list[Any], values: list[Any], grads: list[Any], loss: Any) -> Any:
        return opt.stateless_apply(opt_values, grads, values, loss=loss)

    def jitted(grads: list[Any], loss: float) -> None:
        new_values, new_opt_values = stateless(
            [v.value for v in opt.variables], [v.value for v in variables], *tensors(grads, loss)
        )
        for v, x in zip(variables, new_values, strict=True):
            v.assign(x)
        for v, x in zip(opt.variables, new_opt_values, strict=True):
            v.assign(x)

    return jitted


CALL_COUNTERS = frozenset({"iteration", "skipped"})
"""The base's variables that count calls (Keras' ``iterations``, AliG's ``steps_skipped``):
the wrapper keeps the base's state on a skip, a bare base counts the skip."""


def base_state_bits(opt: keras.optimizers.Optimizer) -> list[bytes]:
    """Each variable of ``opt`` but :data:`CALL_COUNTERS`: its shape, dtype and bits (not
    its name: Keras numbers the names of a second optimizer's variables)."""
    out: list[bytes] = []
    for v in opt.variables:
        if v.name not in CALL_COUNTERS:
            out += [repr((tuple(v.shape), v.dtype)).encode(), numpy(v).tobytes()]
    return out


class BareBase:
    """The base of a run, outside a wrapper (an ``extrapolation_checks.BareBase``); eager."""

    def __init__(self, config: SGDNesterov | AliGConfig, start: Sequence[np.ndarray]) -> None:
        with floatx_scope("float64"):
            self.variables = [keras.Variable(p, dtype="float64") for p in start]
            self.opt = make_base(config)
            self.opt.build(self.variables)

    def step(self, loss: float, grads: Sequence[np.ndarray | None]) -> None:
        tensors = [None if g is None else ops.convert_to_tensor(g) for g in grads]
        if isinstance(self.opt, AliG):
            self.opt.apply(tensors, self.variables, loss=loss)
        else:
            self.opt.apply(tensors, self.variables)

    def params(self) -> list[np.ndarray]:
        return [numpy(v) for v in self.variables]

    def state_bits(self) -> list[bytes]:
        return base_state_bits(self.opt)


class KerasRun(RunBase):
    """One wrapper run on ``case`` (an ``extrapolation_checks.ExtrapolationRun``):
    ``call(batch)`` is one call of the oracle's loop; ``variables`` are the weights.

    The alternating form makes one evaluation and one ``apply`` per call (``model.fit``'s
    form). The same-batch form (a custom loop) evaluates and applies, and where the
    wrapper then holds ``w~`` (``"gradient"`` mode), evaluates the same batch there and
    applies again. ``log`` keeps every evaluation: (batch, kind, point, loss, grads),
    kind ``"anchor"`` (the call that places w~ in "gradient" mode) or ``"update"``.
    """

    def __init__(self, *args: Any, mode: str = DEFAULT_MODE, **options: Any) -> None:
        """``RunBase``'s arguments; ``mode``: how ``apply`` runs (:data:`MODES`)."""
        super().__init__(*args, **options)
        with floatx_scope(self.dtype):
            self.variables = [keras.Variable(p, dtype=self.dtype) for p in self.start]
            self.base = make_base(self.case.base_config)
            self.opt = Extrapolation(self.base, **wrapper_options(self.config))
            self.opt.build(self.variables)
        self.apply = stepper(self.opt, self.variables, mode, self.dtype)
        base = self.case.base_config
        if isinstance(base, SGDNesterov):  # Keras' SGD keeps m = -lr * b (a constant lr)
            self.sgd_buffer_scale = -base.lr

    def params(self) -> list[np.ndarray]:
        return [numpy(v) for v in self.variables]

    def anchor(self) -> list[np.ndarray]:
        return [numpy(a) for a in self.opt.anchor_params()]

    def evaluate_and_apply(self, batch: int) -> None:
        point = self.params()
        anchor_call = self.config.mode == "gradient" and not self.opt.is_extrapolated
        with np.errstate(all="ignore"):
            loss, grads = self.problem.evaluate(point, batch)
        self.log.append((batch, "anchor" if anchor_call else "update", point, loss, grads))
        self.apply(grads, loss)

    def call(self, batch: int) -> None:
        self.evaluate_and_apply(batch)
        if (
            self.case.call_form == "same_batch"
            and self.config.mode == "gradient"
            and self.opt.is_extrapolated
        ):
            self.evaluate_and_apply(batch)

    def noise(self, t: int) -> list[np.ndarray]:
        """The wrapper's own xi_t (float64), for the oracle."""
        return [numpy(x).astype(np.float64) for x in self.opt.noise(t)]

    def buffers(self) -> list[np.ndarray]:
        """The base's momentum buffers, float64 (zeros without momentum)."""
        momentums = getattr(self.base, "momentums", [])
        if not momentums:
            return [np.zeros_like(p) for p in self.initial]
        return [numpy(b).astype(np.float64) for b in momentums]

    def counters(self) -> tuple[bool, int, int]:
        return self.opt.is_extrapolated, self.opt.iteration, self.opt.iterations_skipped

    def alig_records(self) -> dict[str, Any] | None:
        if not isinstance(self.base, AliG):
            return None
        return {
            "gamma": float(numpy(self.base.gamma)),
            "steps_taken": int(numpy(self.base.steps_taken)),
            "steps_skipped": int(numpy(self.base.steps_skipped)),
        }

    def oracle_base(self) -> SGDNesterov | AliGConfig:
        """On TensorFlow, Keras' SGD casts its Python-float momentum through float32
        (``ops.cast(0.9, "float64")`` is 0.8999999761581421 there): the oracle's SGD has
        that momentum."""
        base = self.case.base_config
        if isinstance(base, SGDNesterov) and BACKEND == "tensorflow":
            return replace(base, momentum=float(np.float32(base.momentum)))
        return base

    def snapshot(self) -> dict[str, list[bytes]]:
        return {
            "anchor": bits(self.opt.anchor_params()),
            "stored": bits(self.opt.anchors),
            "base": bits(self.base.variables),  # buffers, counters, records
        }

    def base_state_bits(self) -> list[bytes]:
        return base_state_bits(self.base)

    def bare_base(self) -> BareBase:
        return BareBase(self.case.base_config, self.initial)

    def watch(self, around: Callable[[Callable[..., None]], Callable[..., None]]) -> None:
        """Every ``apply`` (two a call where the same-batch form evaluates twice)."""
        self.apply = around(self.apply)


# ---------------------------------------------------------------- the problem as a model


@keras.saving.register_keras_serializable(package="alig_tests")
def half_squared_error(y_true: Any, y_pred: Any) -> Any:
    """The problem's loss: ``sum ||residual||^2 / (2 * rows)``, already a scalar."""
    rows = ops.cast(ops.shape(y_true)[0], y_pred.dtype)
    return ops.sum(ops.square(y_pred - y_true)) / (2.0 * rows)


@keras.saving.register_keras_serializable(package="alig_tests")
class ProblemModel(AliGTrainStep, keras.Sequential):
    """The problem's model; the mixin hands the loss to the optimizer on JAX."""


@keras.saving.register_keras_serializable(package="alig_tests")
class PlainProblemModel(keras.Sequential):
    """The problem's model without the mixin (JAX: the optimizer gets no loss)."""


def fit_problem() -> Problem:
    """The problem without events, its data rounded to float32 values (as some backends'
    data adapters pass the batches), so that the oracle and ``model.fit`` see the same."""
    problem = Problem(events=False)
    problem.x = problem.x.astype(np.float32).astype(np.float64)
    problem.y = problem.y.astype(np.float32).astype(np.float64)
    return problem


def build_model(
    case: ExtrapolationCase,
    config: ExtrapolationConfig | None = None,
    *,
    mixin: bool = True,
    lr_x: Any = None,
) -> keras.Model:
    """The problem's model at :func:`initial_params`, compiled with the row's wrapper (float64)."""
    keras.config.set_floatx("float64")
    config = config if config is not None else case.config
    options = wrapper_options(config)
    if lr_x is not None:
        options["lr_x"] = lr_x
    cls = ProblemModel if mixin else PlainProblemModel
    model = cls([keras.Input((5,)), Linear(3, offset=True, kernel_initializer="zeros")])
    for v, p in zip(model.trainable_variables, initial_params(), strict=True):
        v.assign(p)
    model.compile(
        optimizer=Extrapolation(make_base(case.base_config), **options), loss=half_squared_error
    )
    model.optimizer.build(model.trainable_variables)  # its noise can be read before fit
    return model


def fit(model: keras.Model, epochs: int, rows: int = 64, **kwargs: Any) -> Any:
    """``model.fit`` on the problem's first ``rows`` rows, batches of 8 in order."""
    problem = fit_problem()
    return model.fit(
        problem.x[:rows],
        problem.y[:rows],
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        **kwargs,
    )


def state(model: keras.Model) -> dict[str, np.ndarray]:
    """The weights, the anchor and every optimizer variable, as named arrays."""
    opt = model.optimizer
    out = {f"weight_{i}": numpy(v) for i, v in enumerate(model.trainable_variables)}
    out |= {f"anchor_{i}": numpy(a) for i, a in enumerate(opt.anchor_params())}
    out |= {f"opt_{i}": numpy(v) for i, v in enumerate(opt.variables)}
    return out


RESUME_ROWS, RESUME_EPOCHS, RESUME_SPLIT = 56, 3, 1
"""7 batches an epoch: at the split (after 7 calls) "gradient" mode holds w~."""

RESUME_CASES = (
    "gradient-alig_standard_projected-alternating",
    "past-sgd_nesterov-alternating",
    "noise-alig_adjusted-alternating",
)
"""Rows resumed in a new process: ALI-G holding w~ at the split, a Keras schedule as lr_x,
the noise (its seed and iteration)."""


def resume_lr_x(name: str) -> Any:
    """A Keras schedule as lr_x for the SGD row (saved in and restored from the file)."""
    if "sgd" in name:
        return keras.optimizers.schedules.InverseTimeDecay(0.2, decay_steps=4, decay_rate=0.5)
    return None


if __name__ == "__main__":
    path, out = sys.argv[1:]
    keras.config.set_floatx("float64")
    model = keras.saving.load_model(path)
    fit(model, RESUME_EPOCHS - RESUME_SPLIT, RESUME_ROWS)
    np.savez(out, **state(model))
