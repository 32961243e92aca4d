"""alig_tf.Extrapolation in model.fit: unchanged on every backend, evaluation at the anchor,
a .keras file resumed in a new process.

The model is the shared extrapolation problem (``extrapolation_worker.build_model``: a
kernel, a bias and a scalar offset, a float64-safe layer and loss), fitted in minibatches of
8 in order, so that ``model.fit`` makes exactly the oracle's calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from alig_cases import max_relative_deviation
from alig_core.oracle_extrapolation import SGDNesterov, run_extrapolation_oracle
from alig_tf import EvaluateAtAnchor
from extrapolation_cases import ExtrapolationCase, find_case
from worker_scripts import import_script, run_script

WORKER = Path(__file__).with_name("extrapolation_worker.py")
HARNESS = import_script(WORKER)
BACKEND = keras.backend.backend()
TOL = 1e-10
EPOCHS = 5
"""40 calls of 8 rows (20 iterations in "gradient" mode, 40 otherwise)."""

FIT_CASES = (
    "gradient-sgd_nesterov-alternating",
    "gradient-alig_adjusted_projected-alternating",
    "past-alig_standard_projected-alternating",
    "noise-sgd_nesterov-alternating",
)


@pytest.fixture(autouse=True)
def _floatx(floatx):
    """The models are float64 (build_model sets it); restored after each test."""
    floatx(keras.config.floatx())


def oracle_base(case: ExtrapolationCase) -> Any:
    """Keras 3.15's TensorFlow SGD casts its momentum through float32 (test_keras_extrapolation)."""
    base = case.base_config
    if isinstance(base, SGDNesterov) and BACKEND == "tensorflow":
        return SGDNesterov(lr=base.lr, momentum=float(np.float32(base.momentum)))
    return base


def weights(model: keras.Model) -> list[np.ndarray]:
    return [HARNESS.numpy(v) for v in model.trainable_variables]


def oracle_records(case: ExtrapolationCase, model: keras.Model, calls: int) -> list[Any]:
    noise = None
    if case.mode == "noise":
        opt = model.optimizer

        def noise(t: int) -> list[np.ndarray]:
            return [HARNESS.numpy(x).astype(np.float64) for x in opt.noise(t)]

    problem = HARNESS.fit_problem()
    return run_extrapolation_oracle(
        [p.copy() for p in weights(model)],
        problem.evaluate,
        calls,
        case.config,
        oracle_base(case),
        call_form="alternating",
        noise=noise,
    )


def check(model: keras.Model, record: Any) -> None:
    opt = model.optimizer
    assert (opt.is_extrapolated, opt.iteration, opt.iterations_skipped) == (
        record.extrapolated,
        record.iterations,
        record.skipped,
    )
    assert max_relative_deviation(weights(model), record.params) <= TOL
    anchor = [HARNESS.numpy(a) for a in opt.anchor_params()]
    assert max_relative_deviation(anchor, record.anchor) <= TOL


def loss_at(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    residual = x @ params[0] + params[1] + params[2] - y
    return 0.5 * float(np.sum(residual * residual)) / len(x)


# ---------------------------------------------------------------- model.fit, unchanged


@pytest.mark.parametrize("name", FIT_CASES)
def test_model_fit_equals_the_oracle(name: str) -> None:
    """model.fit makes the oracle's calls (float64, 1e-10): weights, anchor, counters."""
    case = find_case(name)
    model = HARNESS.build_model(case)
    records = oracle_records(case, model, EPOCHS * 8)
    HARNESS.fit(model, EPOCHS)
    check(model, records[-1])
    assert records[-1].iterations >= 20
    assert max_relative_deviation(records[-1].params, records[0].params) > 1e-2  # it trained
    if case.is_alig:
        gamma = float(HARNESS.numpy(model.optimizer.base_optimizer.gamma))
        assert gamma == pytest.approx(records[-1].alig_state.gamma, rel=TOL)
        assert 0 < gamma < 0.8  # moving: neither at 0 nor at the cap


def _loss_and_grads(model: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[Any, list[Any]]:
    """The loss and its gradients by this backend's own autodiff (a custom loop's way)."""
    variables = model.trainable_variables
    loss_fn = HARNESS.half_squared_error
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(tf.constant(y), model(tf.constant(x), training=True))
        return loss, tape.gradient(loss, [v.value for v in variables])
    if BACKEND == "torch":
        for v in variables:
            v.value.grad = None
        loss = loss_fn(keras.ops.convert_to_tensor(y), model(keras.ops.convert_to_tensor(x)))
        loss.backward()
        return loss.detach(), [v.value.grad for v in variables]
    import jax

    def loss_of(values: list[Any]) -> Any:
        prediction, _ = model.stateless_call(values, [], x, training=True)
        return loss_fn(y, prediction)

    return jax.value_and_grad(loss_of)([v.value for v in variables])


def test_model_fit_equals_a_custom_loop_driving_the_same_wrapper() -> None:
    case = find_case("gradient-alig_standard_projected-alternating")
    fitted = HARNESS.build_model(case)
    HARNESS.fit(fitted, 3)
    looped = HARNESS.build_model(case)
    problem = HARNESS.fit_problem()
    for _ in range(3):
        for start in range(0, 64, 8):
            x, y = problem.x[start : start + 8], problem.y[start : start + 8]
            loss, grads = _loss_and_grads(looped, x, y)
            looped.optimizer.apply(grads, looped.trainable_variables, loss=loss)
    assert fitted.optimizer.iteration == looped.optimizer.iteration == 12
    assert max_relative_deviation(weights(looped), weights(fitted)) <= TOL
    anchors = [[HARNESS.numpy(a) for a in m.optimizer.anchor_params()] for m in (looped, fitted)]
    assert max_relative_deviation(*anchors) <= TOL


def test_a_model_without_the_mixin() -> None:
    """TensorFlow and torch need nothing from the model; on JAX the loss reaches the
    optimizer only through AliGTrainStep: SGD trains without it (the skip rule then tests
    the gradient alone) and AliG refuses to step without a loss."""
    sgd = find_case("past-sgd_nesterov-alternating")
    model = HARNESS.build_model(sgd, mixin=False)
    records = oracle_records(sgd, model, 16)
    HARNESS.fit(model, 2)
    check(model, records[-1])

    alig = find_case("gradient-alig_adjusted_projected-alternating")
    model = HARNESS.build_model(alig, mixin=False)
    if BACKEND == "jax":
        with pytest.raises(ValueError, match=r"add alig_tf\.AliGTrainStep"):
            HARNESS.fit(model, 1)
        return
    records = oracle_records(alig, model, 16)
    HARNESS.fit(model, 2)
    check(model, records[-1])


# ---------------------------------------------------------------- the anchor


class Recorder(keras.callbacks.Callback):
    """The weights and the anchor at the end of every epoch (after its validation)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []
        self.anchors: list[list[np.ndarray]] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.weights.append(weights(self.model))
        self.anchors.append([HARNESS.numpy(a) for a in self.model.optimizer.anchor_params()])


def test_evaluate_at_anchor_validates_at_the_anchor_and_training_carries_on() -> None:
    case = find_case("past-sgd_nesterov-alternating")
    problem = HARNESS.fit_problem()
    x_val, y_val = problem.x[:32], problem.y[:32] + 0.25
    plain = HARNESS.build_model(case)
    HARNESS.fit(plain, 3)

    model = HARNESS.build_model(case)
    recorder = Recorder()
    history = HARNESS.fit(
        model,
        3,
        validation_data=(x_val, y_val),
        validation_batch_size=32,
        callbacks=[EvaluateAtAnchor(), recorder],
    )
    for epoch, val_loss in enumerate(history.history["val_loss"]):
        at_anchor = loss_at(recorder.anchors[epoch], x_val, y_val)
        at_w_tilde = loss_at(recorder.weights[epoch], x_val, y_val)
        assert val_loss == pytest.approx(at_anchor, rel=1e-6)  # Keras' float32 tracker
        assert abs(at_anchor - at_w_tilde) > 1e-3 * at_anchor  # a different point
    # Training carried on from w~: the same run as without validation, bit for bit.
    assert model.optimizer.is_extrapolated
    assert [w.tobytes() for w in weights(model)] == [w.tobytes() for w in weights(plain)]


def test_evaluate_at_anchor_needs_the_wrapper() -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"compiled with alig_tf\.Extrapolation"):
        model.evaluate(np.ones((4, 2)), np.ones((4, 1)), verbose=0, callbacks=[EvaluateAtAnchor()])


def test_at_anchor_evaluates_and_saves_the_anchor_then_puts_w_tilde_back(tmp_path: Path) -> None:
    case = find_case("past-alig_adjusted_projected-alternating")
    problem = HARNESS.fit_problem()
    model = HARNESS.build_model(case)
    HARNESS.fit(model, 1)
    opt = model.optimizer
    assert opt.is_extrapolated
    held = weights(model)
    anchor = [HARNESS.numpy(a) for a in opt.anchor_params()]
    assert max_relative_deviation(held, anchor) > 1e-3
    iteration = opt.iteration
    with opt.at_anchor():
        assert [w.tobytes() for w in weights(model)] == [a.tobytes() for a in anchor]
        assert not opt.is_extrapolated
        loss = model.evaluate(problem.x, problem.y, batch_size=64, verbose=0)
        # (Keras' loss tracker reports in float32 on some backends.)
        assert loss == pytest.approx(loss_at(anchor, problem.x, problem.y), rel=1e-6)
        model.save(tmp_path / "anchor.keras")
        with pytest.raises(RuntimeError, match=r"inside opt\.at_anchor"):
            opt.apply([keras.ops.zeros(v.shape) for v in model.trainable_variables])
        with pytest.raises(RuntimeError, match="already active"), opt.at_anchor():
            pass
    assert [w.tobytes() for w in weights(model)] == [w.tobytes() for w in held]
    assert opt.is_extrapolated
    assert opt.iteration == iteration
    # The file saved inside is a consistent checkpoint at the anchor (phase 0).
    loaded = keras.saving.load_model(tmp_path / "anchor.keras")
    assert [w.tobytes() for w in weights(loaded)] == [a.tobytes() for a in anchor]
    assert not loaded.optimizer.is_extrapolated
    assert loaded.optimizer.iteration == iteration
    HARNESS.fit(loaded, 1)  # and trains on from there
    assert loaded.optimizer.iteration == iteration + 8


# ---------------------------------------------------------------- resume in a new process


@pytest.mark.parametrize("name", HARNESS.RESUME_CASES)
def test_resume_in_a_new_process_is_the_uninterrupted_run(name: str, tmp_path: Path) -> None:
    """Fit, save a .keras file mid-run, load and fit on in a new process: bitwise the run
    that was not interrupted (the weights, the anchor, every variable of the wrapper and of
    the base)."""
    case = find_case(name)
    lr_x = HARNESS.resume_lr_x(name)
    rows, epochs, split = HARNESS.RESUME_ROWS, HARNESS.RESUME_EPOCHS, HARNESS.RESUME_SPLIT
    uninterrupted = HARNESS.build_model(case, lr_x=lr_x)
    HARNESS.fit(uninterrupted, epochs, rows)
    expected = HARNESS.state(uninterrupted)

    first = HARNESS.build_model(case, lr_x=lr_x)
    HARNESS.fit(first, split, rows)
    assert first.optimizer.is_extrapolated  # cut while the weights hold w~
    first.save(tmp_path / "model.keras")
    run_script(
        WORKER, tmp_path / "model.keras", tmp_path / "out.npz", env={"KERAS_BACKEND": BACKEND}
    )
    resumed = np.load(tmp_path / "out.npz")
    assert sorted(resumed.files) == sorted(expected)
    for key, value in expected.items():
        assert resumed[key].tobytes() == value.tobytes(), key
    assert uninterrupted.optimizer.iteration >= 8
