"""alig_tf.AliG in Keras: model.fit on every backend, errors, serialization, state."""

from __future__ import annotations

import math
import pickle

import keras
import numpy as np
import pytest

from alig_cases import initial_params, make_sequence, max_relative_deviation
from alig_core import AliGConfig
from alig_core.oracle import OracleState, oracle_step
from alig_tf import AliG, AliGTrainStep, LossScaleOptimizer, project_onto_ball

BACKEND = keras.backend.backend()


class Regressor(AliGTrainStep, keras.Sequential):
    """A Sequential model that hands the loss to AliG on every backend."""


def _regression_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float64 arrays whose values are exact in float32: some backends' data adapters pass
    the batches through float32, which must not be what a parity test measures."""
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((32, 4)), rng.standard_normal((32, 3))
    return x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)


def _linear_model(kernel: np.ndarray, bias: np.ndarray) -> Regressor:
    model = Regressor([keras.Input((4,)), keras.layers.Dense(3)])
    model.layers[0].kernel.assign(kernel)
    model.layers[0].bias.assign(bias)
    return model


def _mse_grads(kernel, bias, x, y):
    residual = x @ kernel + bias - y
    n = residual.size
    return float(np.mean(residual**2)), [2 * x.T @ residual / n, 2 * residual.sum(0) / n]


@pytest.mark.parametrize("adjusted", [False, True])
def test_model_fit_hands_the_loss_to_the_optimizer(adjusted: bool, floatx) -> None:
    floatx("float64")
    x, y = _regression_data()
    rng = np.random.default_rng(1)
    kernel, bias = rng.standard_normal((4, 3)), np.zeros(3)
    kwargs = {"max_lr": 5.0, "momentum": 0.9, "adjusted_momentum": adjusted, "max_norm": 3.0}
    model = _linear_model(kernel, bias)
    model.compile(optimizer=AliG(**kwargs), loss="mse")
    gammas: list[float] = []
    for _ in range(8):  # one step per fit: variables are synced when fit returns (JAX)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        gammas.append(float(keras.ops.convert_to_numpy(model.optimizer.gamma.value)))

    params, state = [kernel, bias], OracleState.zeros(2)
    expected_gammas = []
    for _ in range(8):
        loss, grads = _mse_grads(*params, x, y)
        params, state = oracle_step(params, grads, loss, state, AliGConfig(**kwargs))
        expected_gammas.append(state.gamma)
    assert len(set(expected_gammas)) > 1  # gamma moves in this run
    # On the JAX and torch backends this float64 Dense forward pass differs from NumPy's
    # by ~1e-7 (seen in keras 3.15, before the optimizer is involved): the exact parity of
    # the optimizer itself is test_keras_oracle's; here a missing or stale loss would be off
    # by orders of magnitude.
    tol = 1e-10 if BACKEND == "tensorflow" else 1e-5
    np.testing.assert_allclose(gammas, expected_gammas, rtol=tol)
    weights = [keras.ops.convert_to_numpy(w.value) for w in model.trainable_variables]
    assert max_relative_deviation(weights, params) <= tol


@pytest.mark.skipif(BACKEND != "tensorflow", reason="jit_compile is a TensorFlow option")
@pytest.mark.parametrize("jit_compile", [True, False])
def test_model_fit_compiled_on_tensorflow(jit_compile: bool) -> None:
    x, y = _regression_data()
    runs = []
    for compile_flag in (jit_compile, "eager"):
        keras.utils.set_random_seed(0)
        model = _linear_model(np.full((4, 3), 0.1), np.zeros(3))
        model.compile(
            optimizer=AliG(max_lr=0.3, momentum=0.9),
            loss="mse",
            jit_compile=compile_flag if compile_flag != "eager" else False,
            run_eagerly=compile_flag == "eager",
        )
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        runs.append([keras.ops.convert_to_numpy(w.value) for w in model.trainable_variables])
        assert int(model.optimizer.steps_taken.numpy()) == 12
    assert max_relative_deviation(runs[0], runs[1]) <= 1e-5


# ---------------------------------------------------------------- missing loss


def test_apply_without_loss_is_a_clear_error() -> None:
    v = keras.Variable([1.0, 2.0])
    opt = AliG(max_lr=0.1)
    with pytest.raises(ValueError, match="none reached it") as info:
        opt.apply([keras.ops.ones((2,))], [v])
    assert "loss=loss" in str(info.value)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(v.value), [1.0, 2.0])


def test_a_loss_serves_one_step_only() -> None:
    v = keras.Variable([1.0, 2.0])
    opt = AliG(max_lr=0.1)
    opt.apply([keras.ops.ones((2,))], [v], loss=1.0)
    with pytest.raises(ValueError, match="none reached it"):
        opt.apply([keras.ops.ones((2,))], [v])


@pytest.mark.skipif(BACKEND != "jax", reason="only the JAX trainer drops scale_loss's writes")
def test_jax_fit_without_the_mixin_is_a_clear_error() -> None:
    x, y = _regression_data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=AliG(max_lr=0.1), loss="mse")
    with pytest.raises(ValueError, match="AliGTrainStep"):
        model.fit(x, y, epochs=1, verbose=0)


def test_mixed_float16_compile_wraps_alig_in_the_loss_passing_wrapper(dtype_policy) -> None:
    """Where Keras wraps the optimizer in its LossScaleOptimizer (which keeps the loss to
    itself), the mixin's compile wraps AliG in alig_tf's, and the model trains."""
    dtype_policy("mixed_float16")
    x, y = _regression_data()
    model = Regressor([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=AliG(max_lr=0.1), loss="mse")
    assert type(model.optimizer) is LossScaleOptimizer
    model.fit(x.astype("float32"), y.astype("float32"), epochs=2, batch_size=8, verbose=0)
    inner = model.optimizer.inner_optimizer
    assert int(inner.steps_taken.numpy()) >= 6  # 8 batches, the first ones may overflow


def test_mixed_bfloat16_trains(dtype_policy) -> None:
    dtype_policy("mixed_bfloat16")
    x, y = _regression_data()
    model = Regressor([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=AliG(max_lr=0.1, momentum=0.9), loss="mse")
    history = model.fit(x, y, epochs=5, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert int(model.optimizer.steps_taken.numpy()) == 20


@pytest.mark.parametrize(
    ("loss", "message"), [(np.ones(3), "scalar"), ("1.0", "scalar tensor or number")]
)
def test_bad_loss_is_a_clear_error(loss, message) -> None:
    opt = AliG(max_lr=0.1)
    with pytest.raises(ValueError, match=message):
        opt.apply([keras.ops.ones((2,))], [keras.Variable([1.0, 2.0])], loss=loss)


# ---------------------------------------------------------------- skipped steps


@pytest.mark.parametrize("bad", ["nan_loss", "inf_loss", "nan_grad", "inf_grad"])
def test_skipped_step_leaves_everything_untouched(bad: str, floatx) -> None:
    floatx("float64")
    variables = [keras.Variable(p, dtype="float64") for p in initial_params()]
    opt = AliG(max_lr=0.05, momentum=0.9, max_norm=3.0)
    sequence = make_sequence(4, pinned=True)
    for step in sequence[:3]:
        opt.apply([keras.ops.convert_to_tensor(g) for g in step.grads], variables, loss=step.loss)
    before = [keras.ops.convert_to_numpy(v.value).tobytes() for v in opt.variables]
    before_params = [keras.ops.convert_to_numpy(v.value).tobytes() for v in variables]
    grads = [np.array(g) for g in sequence[3].grads]
    loss = sequence[3].loss
    if bad == "nan_loss":
        loss = float("nan")
    elif bad == "inf_loss":
        loss = float("inf")
    elif bad == "nan_grad":
        grads[0][0, 0] = np.nan
    else:
        grads[1][0] = -np.inf
    opt.apply([keras.ops.convert_to_tensor(g) for g in grads], variables, loss=loss)
    after = [keras.ops.convert_to_numpy(v.value).tobytes() for v in opt.variables]
    assert [keras.ops.convert_to_numpy(v.value).tobytes() for v in variables] == before_params
    changed = [v.name for v, a, b in zip(opt.variables, before, after, strict=True) if a != b]
    assert sorted(changed) == ["iteration", "skipped"]


# ---------------------------------------------------------------- configuration, state


@pytest.mark.parametrize(
    "kwargs", [{"max_lr": -1.0}, {"momentum": 1.0}, {"eps": float("nan")}, {"max_norm": 0.0}]
)
def test_invalid_arguments_raise_the_core_errors(kwargs) -> None:
    with pytest.raises(ValueError, match=f"Invalid {next(iter(kwargs))}"):
        AliG(**kwargs)


def test_learning_rate_keyword_is_refused() -> None:
    with pytest.raises(ValueError, match="max_lr="):
        AliG(learning_rate=0.1)


def test_config_round_trip_with_and_without_schedule() -> None:
    for max_lr in (None, 0.25, keras.optimizers.schedules.ExponentialDecay(0.5, 10, 0.9)):
        opt = AliG(max_lr=max_lr, momentum=0.9, adjusted_momentum=True, eps=1e-4, max_norm=7.0)
        clone = AliG.from_config(opt.get_config())
        assert clone.get_config() == opt.get_config()
        assert (clone.momentum, clone.adjusted_momentum, clone.max_norm) == (0.9, True, 7.0)
    assert AliG.from_config(AliG().get_config()).max_lr is None


def test_pickling_keeps_the_configuration() -> None:
    opt = AliG(max_lr=0.2, momentum=0.5, f_star=0.1)
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.get_config() == opt.get_config()


def test_save_load_and_continue_equals_uninterrupted(tmp_path, floatx) -> None:
    floatx("float64")
    x, y = _regression_data()
    kernel = np.random.default_rng(2).standard_normal((4, 3))

    def new_model():
        model = _linear_model(kernel, np.zeros(3))
        model.compile(optimizer=AliG(max_lr=0.3, momentum=0.9, max_norm=5.0), loss="mse")
        return model

    uninterrupted = new_model()
    uninterrupted.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)

    first = new_model()
    first.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    first.save(path)
    restored = keras.models.load_model(path, custom_objects={"AliG": AliG, "Regressor": Regressor})
    assert int(restored.optimizer.steps_taken.numpy()) == 8
    restored.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(uninterrupted.trainable_variables, restored.trainable_variables, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a.value), keras.ops.convert_to_numpy(b.value)
        )


def test_variables_after_build() -> None:
    variables = [keras.Variable(np.ones(3)), keras.Variable(np.ones((2, 2)))]
    with_momentum, without = AliG(max_lr=0.1, momentum=0.9), AliG(max_lr=0.1)
    with_momentum.build(variables)
    without.build(variables)
    # iteration, learning_rate, 2 buffers, gamma, gamma_hat, capped, taken, skipped
    assert len(with_momentum.variables) == len(without.variables) + 2


def test_projection_helper() -> None:
    v = [keras.Variable([3.0, 0.0]), keras.Variable([[4.0]])]
    project_onto_ball(v, 2.5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(v[0].value), [1.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(v[1].value), [[2.0]], rtol=1e-6)


def test_a_skipped_step_does_not_advance_the_max_lr_schedule() -> None:
    """The schedule runs on steps_taken (as in alig_jax), not on Keras' iterations."""
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0, 1], [1.0, 0.5, 0.25])
    opt = AliG(max_lr=schedule, momentum=0.9)
    v = keras.Variable(np.ones(3))
    grad = [keras.ops.ones((3,), dtype=v.dtype)]
    opt.apply(grad, [v], loss=1.0)
    opt.apply(grad, [v], loss=float("nan"))  # skipped
    assert int(opt.iterations.numpy()) == 2
    assert int(opt.steps_taken.numpy()) == 1
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == 0.5  # schedule(1), not (2)


@pytest.mark.parametrize("compiled", [False, True] if BACKEND == "tensorflow" else [False])
def test_the_norm_of_a_large_float32_gradient_is_accurate(compiled: bool) -> None:
    """float32 gradients of ResNet-18 size and more: the squared norm within SPEC's float32
    1e-5 (a dot-product norm, 2% low under XLA, once passed every small-model test)."""
    rng = np.random.default_rng(0)
    # Under XLA, TensorFlow folds the large ones (8388669 entries: twice, both with entries
    # left over) and joins the small ones; eagerly it takes tf.nn.l2_loss (see
    # alig_tf._tensorflow.sum_of_squares): every path.
    shapes = ((512, 512, 3, 3), (1000, 512), (8_388_669,), (3001, 7), (64,), (1000,))
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    exact = sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads)
    variables = [keras.Variable(np.zeros_like(g)) for g in grads]
    opt = AliG(max_lr=None, eps=0.0)
    opt.build(variables)

    def step(*tensors):
        opt.apply(list(tensors), variables, loss=1.0)

    if compiled:  # TensorFlow's XLA, as model.compile(jit_compile=True)
        import tensorflow as tf

        step = tf.function(step, jit_compile=True)
    step(*[keras.ops.convert_to_tensor(g) for g in grads])
    gamma = float(keras.ops.convert_to_numpy(opt.gamma.value))
    assert abs(gamma * exact - 1.0) <= 1e-5  # gamma = loss / S with eps = 0


@pytest.mark.parametrize("compiled", [False, True] if BACKEND == "tensorflow" else [False])
@pytest.mark.parametrize(
    "shapes",
    [
        [(9,)],
        [(8192,)],
        [(3001, 7), (64,), (1000,)],  # a fold's left-over entries joined with small tensors
        [(4099,), (4097,), (5,)],  # small tensors joined, then folded with 1 entry left over
        [(8_388_669,)],  # folded twice, entries left over both times
    ],
    ids=str,
)
def test_the_norm_counts_every_entry_once(shapes: list[tuple[int, ...]], compiled: bool) -> None:
    """All-ones gradients: float32 sums them exactly, so gamma_hat = N / S is exactly 1 only
    if the norm counted each of the N entries once (a dropped or doubled one shows)."""
    count = sum(math.prod(s) for s in shapes)
    variables = [keras.Variable(np.zeros(s, np.float32)) for s in shapes]
    opt = AliG(max_lr=None, eps=0.0)
    opt.build(variables)

    def step(*tensors: object) -> None:
        opt.apply(list(tensors), variables, loss=float(count))

    if compiled:
        import tensorflow as tf

        step = tf.function(step, jit_compile=True)
    step(*[keras.ops.ones(s, dtype="float32") for s in shapes])
    assert float(keras.ops.convert_to_numpy(opt.gamma_hat.value)) == 1.0


@pytest.mark.skipif(BACKEND != "tensorflow", reason="inspects TensorFlow's XLA program")
def test_the_compiled_momentum_step_copies_no_buffer() -> None:
    """Under XLA the parameter update reads the buffer as written: recomputing it from the
    old buffer made XLA copy every buffer first (2 more passes over memory, 1.8x SGD's
    step time instead of 1.2x on ResNet-18 shapes)."""
    import tensorflow as tf

    shapes = ((256, 256, 3, 3), (1000, 512))
    variables = [keras.Variable(np.zeros(s, np.float32)) for s in shapes]
    opt = AliG(max_lr=0.1, momentum=0.9)
    opt.build(variables)

    @tf.function(jit_compile=True)
    def step(*grads):
        opt.apply(list(grads), variables, loss=1.0)

    grads = [tf.ones(s) for s in shapes]
    program = step.experimental_get_compiler_ir(*grads)(stage="optimized_hlo")
    copies = [line for line in program.splitlines() if " copy(" in line]
    assert not copies, "\n".join(copies)
    step(*grads)  # and it runs: the buffers hold -gamma*g
    gamma = float(opt.gamma.numpy())
    np.testing.assert_allclose(opt.momentums[1].numpy(), -gamma, rtol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="inspects a TensorFlow graph")
def test_the_graph_step_keeps_or_replaces_whole_tensors() -> None:
    """Without XLA (a custom loop's plain tf.function), a skipped step's select forwards a
    whole tensor (v1 Select): SelectV2 broadcasts the condition and picks entry by entry on
    one thread, which made the momentum step 4.4x SGD's on ResNet-18 shapes."""
    import tensorflow as tf

    variables = [keras.Variable(np.ones((64, 32), np.float32)), keras.Variable(np.ones(32))]
    opt = AliG(max_lr=0.1, momentum=0.9)
    opt.build(variables)

    @tf.function
    def step(loss, *grads):
        opt.apply(list(grads), variables, loss=loss)

    grads = [tf.ones((64, 32)), tf.ones(32, dtype=variables[1].dtype)]
    graph = step.get_concrete_function(tf.constant(1.0), *grads).graph
    broadcast_selects = [
        op.name
        for op in graph.get_operations()
        if op.type == "SelectV2" and op.outputs[0].shape.rank != 0
    ]
    assert not broadcast_selects
    step(tf.constant(float("nan")), *grads)  # skipped: nothing moves
    assert np.all(variables[0].numpy() == 1.0)
    assert np.all(opt.momentums[0].numpy() == 0.0)
    step(tf.constant(1.0), *grads)  # taken
    assert np.all(variables[0].numpy() < 1.0)
    assert int(opt.steps_taken.numpy()) == 1
