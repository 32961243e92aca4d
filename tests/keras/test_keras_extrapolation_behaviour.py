"""alig_tf.Extrapolation: refusals with the fix, serialization, a base that already stepped,
the base's learning rate, sparse and partial gradients, the noise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from alig_cases import max_relative_deviation
from alig_core import ExtrapolationConfig
from alig_core.oracle_extrapolation import ExtrapolationOracle, SGDNesterov
from alig_tf import AliG, Extrapolation
from extrapolation_cases import Problem, find_case, initial_params, invalid_options_for
from worker_scripts import import_script

HARNESS = import_script(Path(__file__).with_name("extrapolation_worker.py"))
BACKEND = keras.backend.backend()

pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist")


@pytest.fixture(autouse=True)
def _float64(floatx):
    floatx("float64")


def variables() -> list[keras.Variable]:
    return [keras.Variable(p) for p in initial_params()]


def tensors(grads: list[Any]) -> list[Any]:
    return [None if g is None else keras.ops.convert_to_tensor(g) for g in grads]


def values(vs: list[Any]) -> list[np.ndarray]:
    return [HARNESS.numpy(v) for v in vs]


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("kwargs", "match"), invalid_options_for("keras"))
def test_invalid_options_are_refused_with_the_fix(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Extrapolation(keras.optimizers.SGD(0.1), **kwargs)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: "sgd", "expected a keras.optimizers.Optimizer"),
        (lambda: Extrapolation(keras.optimizers.SGD(0.1)), "does not nest"),
        (
            lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
            "got a LossScaleOptimizer",
        ),
        (
            lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
            "gradient_accumulation_steps=2.*once per accumulated gradient",
        ),
        (
            lambda: keras.optimizers.SGD(0.1, loss_scale_factor=8.0),
            "loss_scale_factor=8.0.*scaled gradients",
        ),
        (lambda: keras.optimizers.SGD(0.1, use_ema=True), "use_ema=True.*anchor_params"),
    ],
)
def test_invalid_bases_are_refused(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Extrapolation(make())


def test_keras_optimizer_arguments_belong_to_the_base() -> None:
    with pytest.raises(TypeError, match="clipnorm"):
        Extrapolation(keras.optimizers.SGD(0.1), clipnorm=1.0)  # type: ignore[call-arg]


def test_bad_variables_losses_and_gradients_are_refused() -> None:
    with pytest.raises(ValueError, match="no variables to optimize"):
        Extrapolation(keras.optimizers.SGD(0.1)).build([])
    with pytest.raises(ValueError, match="real floating-point variables"):
        Extrapolation(keras.optimizers.SGD(0.1)).build(
            [keras.Variable(np.ones(2, np.int32), trainable=False)]
        )
    vs = variables()
    loss, grads = Problem(events=False).evaluate(values(vs), 0)
    opt = Extrapolation(AliG(max_lr=0.8, momentum=0.9))
    with pytest.raises(ValueError, match="without variables before it is built"):
        opt.apply(tensors(grads))
    with pytest.raises(ValueError, match="needs the loss of every evaluation"):
        opt.apply(tensors(grads), vs)
    with pytest.raises(ValueError, match=r"scalar, got a tensor of shape \(3,\)"):
        opt.apply(tensors(grads), vs, loss=np.ones(3))
    with pytest.raises(ValueError, match="got 'high'"):
        opt.apply(tensors(grads), vs, loss="high")
    with pytest.raises(ValueError, match="every gradient is None"):
        opt.apply([None, None, None], vs, loss=loss)
    with pytest.raises(ValueError, match="got 2 gradients for 3 variables"):
        opt.apply(tensors(grads)[:2], vs, loss=loss)
    assert (opt.is_extrapolated, opt.iteration, opt.iterations_skipped) == (False, 0, 0)
    assert [v.tobytes() for v in values(vs)] == [p.tobytes() for p in initial_params()]
    opt.apply(tensors(grads), vs, loss=loss)  # and then it works
    assert opt.is_extrapolated


def test_a_base_built_on_other_variables_is_refused() -> None:
    base = keras.optimizers.SGD(0.1)
    base.build([keras.Variable(np.ones(2))])
    with pytest.raises(ValueError, match="built on other variables"):
        Extrapolation(base).build(variables())


# ---------------------------------------------------------------- serialization, checkpoints


def _configs() -> list[Extrapolation]:
    schedule = keras.optimizers.schedules.InverseTimeDecay(0.2, decay_steps=4, decay_rate=0.5)
    return [
        Extrapolation(AliG(max_lr=0.8, momentum=0.9, adjusted_momentum=True, max_norm=2.0)),
        Extrapolation(keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True), "past", lr_x=0.1),
        Extrapolation(AliG(max_lr=0.5), "noise", sigma=0.01, seed=5, linearized=False),
        Extrapolation(keras.optimizers.Adam(1e-3), lr_x=schedule, name="extra"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_get_config_round_trips(index: int) -> None:
    opt = _configs()[index]
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, Extrapolation)
    assert type(restored.base_optimizer) is type(opt.base_optimizer)
    assert restored.get_config() == opt.get_config()


def test_variables_of_another_mode_or_correction_are_refused(tmp_path: Path) -> None:
    case = find_case("gradient-alig_standard_projected-alternating")
    model = HARNESS.build_model(case)
    HARNESS.fit(model, 1, rows=56)
    model.save_weights(tmp_path / "model.weights.h5")
    for config, match in (
        (
            ExtrapolationConfig(mode="past"),
            "mode='gradient', linearized=True, and this one has mode='past', linearized=True",
        ),
        (
            ExtrapolationConfig(linearized=False),
            "linearized=True, and this one has mode='gradient', linearized=False",
        ),
    ):
        other = HARNESS.build_model(case, config)
        with pytest.raises(ValueError, match=match):
            other.load_weights(tmp_path / "model.weights.h5")
    same = HARNESS.build_model(case)
    same.load_weights(tmp_path / "model.weights.h5")
    assert same.optimizer.is_extrapolated
    assert same.optimizer.iteration == model.optimizer.iteration


# ---------------------------------------------------------------- the base


def test_a_base_that_already_stepped_carries_on_from_its_state() -> None:
    """SGD stepped 3 times on its own, then wrapped: the oracle continuing from its weights
    and buffers (Keras' m = -lr * b), the wrapper starting at the anchor, iteration 0."""
    vs = variables()
    base = keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True)
    problem = Problem(events=False)
    for batch in range(3):
        loss, grads = problem.evaluate(values(vs), batch)
        base.apply(tensors(grads), vs)
    mu = float(np.float32(0.9)) if BACKEND == "tensorflow" else 0.9
    config = ExtrapolationConfig(mode="gradient", lr_x=0.1)
    oracle = ExtrapolationOracle(values(vs), config, SGDNesterov(lr=0.05, momentum=mu))
    oracle.sgd_buffers = [-HARNESS.numpy(m) / 0.05 for m in base.momentums]
    opt = Extrapolation(base, lr_x=0.1)
    for batch in range(3, 23):
        record = oracle.call(problem.evaluate, batch)
        loss, grads = Problem(events=False).evaluate(values(vs), batch)
        opt.apply(tensors(grads), vs, loss=loss)
        assert max_relative_deviation(values(vs), record.params) <= 1e-10
    assert opt.iteration == 10
    assert int(HARNESS.numpy(base.iterations)) == 13


def test_the_learning_rate_is_the_bases_and_drives_the_default_lr_x() -> None:
    vs = variables()
    base = keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True)
    opt = Extrapolation(base)
    assert opt.learning_rate is base.learning_rate
    opt.learning_rate = 0.01  # as LearningRateScheduler does
    assert float(HARNESS.numpy(base.learning_rate)) == pytest.approx(0.01)
    before = values(vs)
    loss, grads = Problem(events=False).evaluate(before, 0)
    opt.apply(tensors(grads), vs, loss=loss)  # at the anchor: w~ = w - lr * g
    moved = [(b - a) for a, b in zip(before, values(vs), strict=True)]
    expected = [-0.01 * g for g in grads]
    assert max_relative_deviation(moved, expected) <= 1e-6


def test_variables_left_out_of_a_call_count_as_without_a_gradient() -> None:
    vs = variables()
    opt = Extrapolation(keras.optimizers.SGD(0.05), lr_x=0.1)
    opt.build(vs)
    before = values(vs)
    loss, grads = Problem(events=False).evaluate(before, 0)
    opt.apply([keras.ops.convert_to_tensor(grads[0])], [vs[0]], loss=loss)
    after = values(vs)
    assert np.allclose(after[0], before[0] - 0.1 * grads[0], rtol=1e-12, atol=0)
    assert [a.tobytes() for a in after[1:]] == [b.tobytes() for b in before[1:]]


def test_an_embedding_model_trains(floatx) -> None:
    """An Embedding model trains (on TensorFlow its gradient arrives as IndexedSlices)."""
    floatx("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(10, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(
        optimizer=Extrapolation(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)),
        loss="mse",
    )
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, (32, 3)).astype("int32")
    y = (x.sum(axis=1, keepdims=True) - 13.5) / 5.0  # a sum of per-token values: learnable
    start = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=8, epochs=20, verbose=0)
    with model.optimizer.at_anchor():
        assert model.evaluate(x, y, verbose=0) < 0.8 * start


@pytest.mark.skipif(BACKEND != "tensorflow", reason="IndexedSlices are TensorFlow's")
def test_a_sparse_gradient_steps_as_its_dense_equal() -> None:
    import tensorflow as tf

    runs = []
    for sparse in (True, False):
        vs = variables()
        opt = Extrapolation(keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True), "past")
        problem = Problem(events=False)
        for batch in range(4):
            loss, grads = problem.evaluate(values(vs), batch)
            rows = np.array([0, 3])
            kernel = tf.IndexedSlices(
                tf.constant(grads[0][rows]), tf.constant(rows), tf.constant(grads[0].shape)
            )
            dense = np.zeros_like(grads[0])
            dense[rows] = grads[0][rows]
            first = kernel if sparse else tf.constant(dense)
            opt.apply([first, *tensors(grads[1:])], vs, loss=loss)
        runs.append([v.tobytes() for v in values(vs)])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- the noise


def test_the_noise_is_standard_normal_and_a_function_of_the_seed_and_the_iteration() -> None:
    big = [keras.Variable(np.zeros((100, 101))), keras.Variable(np.zeros(7))]
    opts = []
    for seed in (3, 3, 4):
        opt = Extrapolation(keras.optimizers.SGD(0.1), "noise", sigma=1.0, seed=seed)
        opt.build(big)
        opts.append(opt)
    xi = np.concatenate([HARNESS.numpy(x).ravel() for x in opts[0].noise(5)])
    assert xi.dtype == np.float64
    assert xi.size == 10107
    assert abs(xi.mean()) < 0.05
    assert abs(xi.std() - 1) < 0.05
    assert abs(np.mean(xi**4) - 3) < 0.3  # normal, not uniform
    same = np.concatenate([HARNESS.numpy(x).ravel() for x in opts[1].noise(5)])
    assert same.tobytes() == xi.tobytes()
    for other in (opts[0].noise(6), opts[2].noise(5)):
        flat = np.concatenate([HARNESS.numpy(x).ravel() for x in other])
        assert abs(np.corrcoef(flat, xi)[0, 1]) < 0.05


# ---------------------------------------------------------------- the base's step size, the norm


def test_anchor_weights_is_a_deprecated_alias_of_anchor_params() -> None:
    vs = variables()
    opt = Extrapolation(keras.optimizers.SGD(0.05), lr_x=0.1)
    loss, grads = Problem(events=False).evaluate(values(vs), 0)
    opt.apply(tensors(grads), vs, loss=loss)  # the weights now hold w~, the anchor is stored
    assert opt.is_extrapolated
    with pytest.warns(DeprecationWarning, match=r"anchor_weights\(\) is deprecated.*anchor_params"):
        old = [HARNESS.numpy(a).tobytes() for a in opt.anchor_weights()]
    new = [HARNESS.numpy(a) for a in opt.anchor_params()]
    assert old == [a.tobytes() for a in new]
    assert [a.tobytes() for a in new] == [p.tobytes() for p in initial_params()]


@pytest.mark.parametrize(
    ("loss", "sq_grad_norm"), [(2.0, 40.0), (3.0, 0.5), (0.0, 1.0), (-1.0, 2.0), (np.nan, 1.0)]
)
def test_alig_step_size_at_is_its_gamma_and_moves_nothing(loss: float, sq_grad_norm: float) -> None:
    """AliG.step_size_at: alig_core.step_size's gamma with its own cap, eps and f_star."""
    import alig_core

    opt = AliG(max_lr=0.8, momentum=0.9, eps=1e-3, f_star=0.25)
    vs = variables()
    opt.build(vs)
    before = [HARNESS.numpy(v).tobytes() for v in [*opt.variables, *vs]]
    gamma = opt.step_size_at(loss, keras.ops.convert_to_tensor(sq_grad_norm))
    expected = alig_core.step_size(
        np, np.float64(loss), np.float64(sq_grad_norm), max_lr=0.8, eps=1e-3, f_star=0.25
    ).gamma
    assert keras.backend.standardize_dtype(gamma.dtype) == "float64"
    assert float(HARNESS.numpy(gamma)) == float(expected)
    assert [HARNESS.numpy(v).tobytes() for v in [*opt.variables, *vs]] == before


def test_alig_step_size_at_follows_a_max_lr_schedule_at_steps_taken() -> None:
    schedule = keras.optimizers.schedules.InverseTimeDecay(0.5, decay_steps=1, decay_rate=1.0)
    opt = AliG(max_lr=schedule)
    vs = variables()
    problem = Problem(events=False)
    for batch in range(3):
        loss, grads = problem.evaluate(values(vs), batch)
        opt.apply(tensors(grads), vs, loss=loss)
    steps = int(HARNESS.numpy(opt.steps_taken))
    assert steps == 3
    cap = float(HARNESS.numpy(opt.step_size_at(1e6, 1.0)))  # the cap binds
    assert cap == pytest.approx(0.5 / (1 + steps), rel=1e-6)


def test_the_default_lr_x_at_the_anchor_is_alig_step_size_at_with_a_scheduled_cap() -> None:
    """ "gradient" mode, lr_x=None: w~ = w - gamma * g with the cap of this call's step count
    (before the base's step, which the call at the anchor discards, moves it)."""
    schedule = keras.optimizers.schedules.InverseTimeDecay(0.5, decay_steps=1, decay_rate=1.0)
    base = AliG(max_lr=schedule)
    opt = Extrapolation(base)
    vs = variables()
    problem = Problem(events=False)
    for batch in range(4):  # two iterations: the base has taken 2 steps, the cap is 0.5 / 3
        loss, grads = problem.evaluate(values(vs), batch)
        opt.apply(tensors(grads), vs, loss=loss)
    assert (opt.iteration, opt.is_extrapolated) == (2, False)
    before = values(vs)
    loss, grads = problem.evaluate(before, 4)
    loss = loss + 1e3  # the cap binds
    expected_gamma = float(
        HARNESS.numpy(
            base.step_size_at(loss, sum(float(np.sum(g * g)) for g in grads if g is not None))
        )
    )
    assert expected_gamma == pytest.approx(0.5 / 3, rel=1e-6)
    opt.apply(tensors(grads), vs, loss=loss)
    assert opt.is_extrapolated
    moved = [b - a for a, b in zip(before, values(vs), strict=True)]
    assert max_relative_deviation(moved, [-expected_gamma * g for g in grads]) <= 1e-12
    assert int(HARNESS.numpy(base.steps_taken)) == 2  # the call at the anchor moved nothing


@pytest.mark.parametrize("mode", ["gradient", "past", "noise"])
@pytest.mark.parametrize("base_name", ["alig", "sgd"])
def test_one_squared_gradient_norm_per_call(
    mode: str, base_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wrapper computes S once per call and hands it to AliG, which does not compute it
    again (the sum of squares is the one function every norm of alig_tf goes through)."""
    from alig_tf import _backend

    calls = []
    sum_of_squares = _backend.sum_of_squares

    def counted(tensors: list[Any], dtype: str) -> Any:
        calls.append(len(tensors))
        return sum_of_squares(tensors, dtype)

    monkeypatch.setattr(_backend, "sum_of_squares", counted)
    base = AliG(max_lr=0.5, momentum=0.9) if base_name == "alig" else keras.optimizers.SGD(0.1)
    options: dict[str, Any] = {"sigma": 0.01} if mode == "noise" else {}
    opt = Extrapolation(base, mode, **options)
    vs = variables()
    problem = Problem(events=False)
    for batch in range(4):  # eagerly: every call runs the Python of the step
        loss, grads = problem.evaluate(values(vs), batch)
        calls.clear()
        opt.apply(tensors(grads), vs, loss=loss)
        assert calls == [sum(g is not None for g in grads)], (batch, calls)
    assert opt.iteration == (2 if mode == "gradient" else 4)


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("base_name", ["sgd", "alig"])
def test_mixed_float16_trains_around_sgd_and_says_what_to_do_around_alig(
    base_name: str, floatx
) -> None:
    """Keras wraps the wrapper in its LossScaleOptimizer, which unscales the gradients (SGD
    trains) and passes no loss on (AliG needs one: the error names mixed_bfloat16)."""
    floatx("float32")
    policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        base = keras.optimizers.SGD(0.01, momentum=0.9) if base_name == "sgd" else AliG(0.1)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")]
        )
        model.compile(optimizer=Extrapolation(base, "past"), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        x, y = np.full((16, 4), 0.5), np.full((16, 1), 0.5)
        if base_name == "alig":
            with pytest.raises(ValueError, match=r"mixed_float16.*mixed_bfloat16"):
                model.fit(x, y, batch_size=8, verbose=0)
            return
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
        opt = model.optimizer.inner_optimizer
        assert (opt.iteration, opt.iterations_skipped) == (6, 0)
        assert history.history["loss"][-1] < history.history["loss"][0]
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
