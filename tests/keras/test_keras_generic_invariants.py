"""What Keras promises of every optimizer, checked for alig_tf.AliG on this backend.

Keras' optimizers share habits a user relies on when swapping one in: ``model.fit`` on any
model (sparse ``Embedding`` gradients, nothing trainable, ``mixed_float16`` loss scaling,
``use_ema``), a ``.keras`` file that resumes in lockstep, a config that round-trips,
unique default names, ``iterations``, ``stateless_apply``, a callable learning rate, and
Keras' own message when no gradient arrives. One table of models drives the ``fit`` and
save checks; the step-level checks compare with the NumPy oracle. Where AliG departs on
purpose (it needs the loss; weight decay and clipping are refused; momentum coasts while
the cap is 0), a test below pins it (docs/framework-contracts.md, "Keras 3").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras import ops

from alig_core import AliGConfig
from alig_core.oracle import OracleState, oracle_step
from alig_tf import AliG, AliGTrainStep, LossScaleOptimizer

BACKEND = keras.backend.backend()


@keras.saving.register_keras_serializable(package="alig_generic_tests")
class Net(AliGTrainStep, keras.Sequential):
    """A Sequential model that hands the loss to AliG on every backend."""


@keras.saving.register_keras_serializable(package="alig_generic_tests")
def half_a_tenth() -> float:
    """A zero-argument learning rate, as Keras takes one (registered: it round-trips)."""
    return 0.05


def _numpy(value: Any) -> np.ndarray:
    return np.array(
        ops.convert_to_numpy(value.value if isinstance(value, keras.Variable) else value)
    )


# ---------------------------------------------------------------- the table of models


@dataclass(frozen=True)
class FitRow:
    """A model Keras' own optimizers train with ``fit``, and the AliG it is compiled with."""

    name: str
    layers: Callable[[], list[Any]]
    inputs: Callable[[np.random.Generator], np.ndarray]
    optimizer: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None
    trainable: bool = True
    min_steps_taken: int = 8
    """Of the 8 batches (``mixed_float16``: the first scales may overflow and be skipped)."""


def _dense() -> list[Any]:
    return [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)]


def _embedding() -> list[Any]:
    return [
        keras.Input((3,), dtype="int32"),
        keras.layers.Embedding(10, 4),
        keras.layers.Flatten(),
        keras.layers.Dense(1),
    ]


def _frozen() -> list[Any]:
    return [keras.Input((4,)), keras.layers.Dense(1, trainable=False)]


def _floats(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((32, 4)).astype("float32")


def _tokens(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 10, (32, 3)).astype("int32")  # repeated tokens: repeated indices


FIT_ROWS = (
    FitRow("dense", _dense, _floats, {"max_lr": 0.1, "momentum": 0.9}),
    # On TensorFlow an Embedding's gradient is tf.IndexedSlices, with repeated indices.
    FitRow("embedding_std", _embedding, _tokens, {"max_lr": 0.1, "momentum": 0.9}),
    FitRow(
        "embedding_adjusted",
        _embedding,
        _tokens,
        {"max_lr": 0.1, "momentum": 0.9, "adjusted_momentum": True},
    ),
    FitRow("embedding_no_momentum", _embedding, _tokens, {"max_lr": 0.1}),
    FitRow("nothing_trainable", _frozen, _floats, {"max_lr": 0.1}, trainable=False),
    FitRow("use_ema", _dense, _floats, {"max_lr": 0.1, "momentum": 0.9, "use_ema": True}),
    FitRow(
        "mixed_float16",
        _dense,
        _floats,
        {"max_lr": 0.1, "momentum": 0.9},
        policy="mixed_float16",
        min_steps_taken=4,
    ),
    FitRow("callable_max_lr", _dense, _floats, {"max_lr": half_a_tenth, "momentum": 0.9}),
    FitRow(
        "schedule_max_lr",
        _dense,
        _floats,
        {"max_lr": keras.optimizers.schedules.ExponentialDecay(0.1, 4, 0.5)},
    ),
)


def _compiled(row: FitRow) -> Net:
    model = Net(row.layers())
    model.compile(optimizer=AliG(**row.optimizer), loss="mse")
    return model


def _alig(model: keras.Model) -> AliG:
    optimizer = model.optimizer
    return optimizer.inner_optimizer if isinstance(optimizer, LossScaleOptimizer) else optimizer


@pytest.mark.parametrize("row", [pytest.param(r, id=r.name) for r in FIT_ROWS])
def test_fit_trains_then_a_keras_file_resumes_in_lockstep(
    row: FitRow, tmp_path: Path, dtype_policy
) -> None:
    """``fit`` trains as with Keras' own optimizers; the ``.keras`` file holds the compiled
    AliG (its config and every variable), and the loaded model steps as the original."""
    if row.policy is not None:
        dtype_policy(row.policy)
    rng = np.random.default_rng(0)
    x = row.inputs(rng)
    # A target the model can fit: a linear function of the inputs (of the token ids).
    y = (x.astype("float32") @ np.linspace(-0.3, 0.3, x.shape[1], dtype="float32"))[:, None]
    keras.utils.set_random_seed(0)
    model = _compiled(row)
    before = [_numpy(w) for w in model.weights]
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    alig = _alig(model)
    # (TensorFlow's trainer does not call the optimizer with nothing to train)
    taken, skipped = (
        (int(_numpy(alig.steps_taken)), int(_numpy(alig.steps_skipped))) if alig.built else (0, 0)
    )
    if row.trainable:
        assert taken >= row.min_steps_taken
        assert all(math.isfinite(v) for v in history.history["loss"])
        assert history.history["loss"][-1] < history.history["loss"][0]
    else:  # Keras' optimizers accept a model with nothing to train, and step nothing
        assert (taken, skipped) == (0, 0)
        for old, new in zip(before, model.weights, strict=True):
            np.testing.assert_array_equal(_numpy(new), old)
    if row.policy is not None:
        assert type(model.optimizer) is LossScaleOptimizer

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    if model.optimizer.built:
        saved_variables = model.optimizer.variables
        for saved, restored in zip(saved_variables, loaded.optimizer.variables, strict=True):
            np.testing.assert_array_equal(_numpy(restored), _numpy(saved))
    if BACKEND == "jax" and row.optimizer.get("use_ema"):
        # Keras 3.15 on JAX: a second fit of a model with use_ema raises in Keras itself
        # (TypeError from an EMA variable's initializer), with keras.optimizers.SGD too.
        return
    for m in (model, loaded):
        m.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(_numpy(b), _numpy(a))


# ---------------------------------------------------------------- config and names

CONFIG_ROWS = {
    "number": {"max_lr": 0.1},
    "no_cap": {"max_lr": None},
    "int_cap": {"max_lr": 2},
    "schedule": {"max_lr": keras.optimizers.schedules.CosineDecay(0.1, 100)},
    "callable": {"max_lr": half_a_tenth},
    "everything": {
        "max_lr": 0.3,
        "momentum": 0.9,
        "adjusted_momentum": True,
        "eps": 1e-7,
        "f_star": -0.5,
        "max_norm": 4.0,
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 3,
        "loss_scale_factor": 8.0,
        "gradient_accumulation_steps": 2,
        "name": "mine",
    },
}


@pytest.mark.parametrize("kwargs", CONFIG_ROWS.values(), ids=CONFIG_ROWS.keys())
def test_the_config_round_trips(kwargs: dict[str, Any]) -> None:
    config = AliG(**kwargs).get_config()
    rebuilt = AliG.from_config(config)
    assert rebuilt.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(rebuilt))
    assert type(restored) is AliG
    assert restored.get_config() == config


def test_the_loss_scale_wrapper_config_round_trips() -> None:
    wrapper = LossScaleOptimizer(AliG(max_lr=0.1, momentum=0.9), initial_scale=64.0)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(wrapper))
    assert type(restored) is LossScaleOptimizer
    assert type(restored.inner_optimizer) is AliG
    assert restored.get_config() == wrapper.get_config()


def test_default_names_are_unique_as_keras_gives_them() -> None:
    """``SGD()`` is named "sgd", then "sgd_1"...; AliG "alig", then "alig_1"..."""
    names = [AliG().name for _ in range(3)]
    assert len(set(names)) == 3
    assert all(n == "alig" or n.startswith("alig_") for n in names)
    assert AliG(name="mine").name == "mine"


# ---------------------------------------------------------------- one step against the oracle


def _sparse(values: np.ndarray, rows: np.ndarray, shape: tuple[int, int]) -> Any:
    """A sparse gradient of ``shape`` with ``values[i]`` in row ``rows[i]`` (rows repeat)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.IndexedSlices(tf.constant(values), tf.constant(rows), tf.constant(shape))
    coordinates = np.array([(r, c) for r in rows for c in range(shape[1])])
    if BACKEND == "jax":
        import jax.numpy as jnp
        from jax.experimental import sparse

        return sparse.BCOO((jnp.asarray(values.reshape(-1)), jnp.asarray(coordinates)), shape=shape)
    import torch

    return torch.sparse_coo_tensor(
        torch.tensor(coordinates.T), torch.tensor(values.reshape(-1)), shape
    )


def _dense_sum(values: np.ndarray, rows: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    dense = np.zeros(shape)
    np.add.at(dense, rows, values)  # repeated rows add up
    return dense


@pytest.mark.parametrize(
    "config",
    [{"momentum": 0.0}, {"momentum": 0.9}, {"momentum": 0.9, "adjusted_momentum": True}],
    ids=["no_momentum", "standard", "adjusted"],
)
def test_a_sparse_gradient_steps_as_the_sum_it_stands_for(config: dict[str, Any]) -> None:
    """Rows 0 and 2 hold gradients, row 0 twice: the norm and the update are those of the
    dense sum (Keras' SGD takes such gradients too), by the oracle, over three steps
    (the gamma changes: the two momentum conventions part)."""
    shape, rows = (4, 2), np.array([0, 2, 0])
    values = [np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]) * k for k in (1.0, 0.5, -0.25)]
    losses = [2.0, 1.0, 0.7]
    aconfig = AliGConfig(max_lr=10.0, eps=1e-5, **config)
    variable = keras.Variable(np.ones(shape), dtype="float32")
    opt = AliG(max_lr=10.0, **config)
    params, state = [np.ones(shape)], OracleState.zeros(1)
    for loss, vals in zip(losses, values, strict=True):
        opt.apply([_sparse(vals.astype("float32"), rows, shape)], [variable], loss=loss)
        params, state = oracle_step(params, [_dense_sum(vals, rows, shape)], loss, state, aconfig)
        np.testing.assert_allclose(float(_numpy(opt.gamma_hat)), state.gamma_hat, rtol=1e-6)
        np.testing.assert_allclose(_numpy(variable), params[0], rtol=1e-6, atol=1e-7)
    assert int(_numpy(opt.steps_taken)) == 3


def test_a_cap_below_zero_at_step_time_never_steps_uphill() -> None:
    """A schedule that crosses 0 (PolynomialDecay to -0.1): once the cap is <= 0, gamma is 0
    and nothing moves (no ascent: without the clamp, w would move along +g)."""
    cap = keras.optimizers.schedules.PolynomialDecay(0.1, decay_steps=2, end_learning_rate=-0.1)
    variable = keras.Variable([1.0, 2.0])
    opt = AliG(max_lr=cap)
    history = []
    for _ in range(4):  # caps 0.1, 0.0, -0.1, -0.1
        w = _numpy(variable)
        opt.apply([ops.convert_to_tensor(w)], [variable], loss=float(w @ w) / 2)
        history.append((float(_numpy(opt.gamma)), _numpy(variable)))
    assert history[0][0] == pytest.approx(0.1)
    for gamma, w in history[1:]:
        assert gamma == 0.0
        np.testing.assert_array_equal(w, history[0][1])  # not moved: never uphill


def test_a_callable_cap_is_called_at_every_step_and_may_go_below_zero() -> None:
    """As Keras calls a zero-argument learning rate at every step."""
    caps = iter([0.2, 0.05, -0.3])
    variable = keras.Variable([1.0, 2.0])
    opt = AliG(max_lr=lambda: next(caps))
    gammas = []
    for _ in range(3):
        opt.apply([ops.ones((2,))], [variable], loss=100.0)  # gamma_hat 50: capped
        gammas.append(float(_numpy(opt.gamma)))
    assert gammas == pytest.approx([0.2, 0.05, 0.0])
    np.testing.assert_allclose(_numpy(variable), [0.75, 1.75])


@pytest.mark.parametrize(
    ("cap", "loss", "expected"),
    [(0.0, 0.5, (0.0, 0.5, True)), (0.5, 0.5, (0.5, 0.5, True)), (0.75, 0.5, (0.5, 0.5, False))],
    ids=["cap_exactly_0", "gamma_hat_equal_to_the_cap", "below_the_cap"],
)
def test_the_capped_record_at_the_edges(cap: float, loss: float, expected: tuple) -> None:
    """``capped`` is ``gamma_hat >= cap`` after the clamp at 0 (alig_core.step_size): true at
    a cap of exactly 0 (a schedule reaching 0) and at ``gamma_hat == max_lr``."""
    schedule = keras.optimizers.schedules.PolynomialDecay(1.0, 1, end_learning_rate=cap)
    variable = keras.Variable([1.0, 2.0])
    opt = AliG(max_lr=schedule if cap == 0.0 else cap, eps=0.0)
    if cap == 0.0:  # step 0 at the cap 1.0, then the cap is 0
        opt.apply([ops.convert_to_tensor([1.0, 0.0])], [variable], loss=0.0)
    before = _numpy(variable)
    opt.apply([ops.convert_to_tensor([1.0, 0.0])], [variable], loss=loss)  # gamma_hat 0.5
    gamma, gamma_hat, capped = expected
    assert float(_numpy(opt.gamma)) == gamma
    assert float(_numpy(opt.gamma_hat)) == gamma_hat
    assert bool(_numpy(opt.capped)) is capped
    np.testing.assert_array_equal(_numpy(variable), before - [gamma, 0.0])


@pytest.mark.parametrize("adjusted", [False, True], ids=["standard", "adjusted"])
def test_momentum_coasts_while_the_cap_is_zero(adjusted: bool) -> None:
    """A schedule that drives the cap to 0 does not freeze the weights under the paper's
    standard momentum (b <- mu b - gamma g; w <- w - gamma g + mu b: as Keras' own
    SGD(nesterov=True) at a learning rate of 0, the weights coast on mu b); under
    ``adjusted_momentum`` (w <- w - gamma g + gamma mu b) they stop."""
    schedule = keras.optimizers.schedules.PolynomialDecay(0.5, 1, end_learning_rate=0.0)
    variable = keras.Variable([1.0, 2.0])
    opt = AliG(max_lr=schedule, momentum=0.5, adjusted_momentum=adjusted, eps=0.0)
    g = ops.convert_to_tensor([1.0, 0.0])
    opt.apply([g], [variable], loss=10.0)  # gamma 0.5; standard: b = [-0.5, 0], w = [0.25, 2]
    first = _numpy(variable)
    np.testing.assert_allclose(first, [0.25, 2.0])  # adjusted: b = [-1, 0], the same w
    opt.apply([g], [variable], loss=10.0)  # gamma 0
    assert float(_numpy(opt.gamma)) == 0.0
    if adjusted:
        np.testing.assert_array_equal(_numpy(variable), first)  # stopped
        return
    np.testing.assert_allclose(_numpy(variable), [0.125, 2.0])  # b = [-0.25, 0]: coasting
    sgd_variable = keras.Variable([1.0, 2.0])
    sgd = keras.optimizers.SGD(0.5, momentum=0.5, nesterov=True)
    for lr in (0.5, 0.0):  # Keras' own SGD, its learning rate set to 0 for the second step
        sgd.learning_rate = lr
        sgd.apply([g], [sgd_variable])
    np.testing.assert_allclose(_numpy(sgd_variable), _numpy(variable))


# ---------------------------------------------------------------- loss scaling


def _apply(opt: Any, grads: list[Any], variables: list[keras.Variable], **kwargs: Any) -> None:
    """``opt.apply``; on JAX, a loss-scale wrapper's ``stateless_apply``, its results written.

    (Keras' stateful ``LossScaleOptimizer.apply`` traces a ``cond`` whose branches write
    variables, which JAX refuses, with Keras' own SGD inside too; ``fit`` runs the stateless
    form.)
    """
    if BACKEND != "jax" or not isinstance(opt, keras.optimizers.LossScaleOptimizer):
        opt.apply(grads, variables, **kwargs)
        return
    if not opt.built:
        opt.build(variables)
    new_values, new_state = opt.stateless_apply(
        [v.value for v in opt.variables], grads, [v.value for v in variables], **kwargs
    )
    for variable, value in zip(
        [*variables, *opt.variables], [*new_values, *new_state], strict=True
    ):
        variable.assign(value)


def _mse(kernel: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray):
    residual = x @ kernel + bias - y
    n = residual.size
    return float(np.mean(residual**2)), [2 * x.T @ residual / n, 2 * residual.sum(0) / n]


def test_mixed_float16_steps_with_the_unscaled_loss_and_gradients(dtype_policy) -> None:
    """Each step ``fit`` takes under ``mixed_float16`` is the oracle's step of the unscaled
    loss and gradients (computed in float64 from the float32 weights), up to float16
    rounding of the forward pass (2**-11 relative per operation: 2e-2 on the step); a
    scaled loss or scaled gradients would be off by the loss scale (2**15). A step the
    wrapper skips (the scale overflowed) leaves AliG untouched."""
    dtype_policy("mixed_float16")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype("float32")
    y = rng.standard_normal((32, 3)).astype("float32")
    model = Net([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=AliG(max_lr=None), loss="mse")
    alig = _alig(model)
    taken = 0
    for _ in range(6):  # one step per fit: the variables are synced when fit returns
        kernel, bias = (_numpy(w).astype(np.float64) for w in model.layers[0].weights)
        steps_before = int(_numpy(alig.steps_taken)) if alig.built else 0
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        new_kernel, new_bias = (_numpy(w) for w in model.layers[0].weights)
        if int(_numpy(alig.steps_taken)) == steps_before:  # skipped by the wrapper
            np.testing.assert_array_equal(new_kernel, kernel.astype("float32"))
            continue
        taken += 1
        loss, grads = _mse(kernel, bias, x.astype(np.float64), y.astype(np.float64))
        (k, b), state = oracle_step([kernel, bias], grads, loss, OracleState.zeros(2), AliGConfig())
        np.testing.assert_allclose(float(_numpy(alig.gamma_hat)), state.gamma_hat, rtol=2e-2)
        np.testing.assert_allclose(new_kernel - kernel, k - kernel, rtol=2e-2, atol=1e-4)
        np.testing.assert_allclose(new_bias - bias, b - bias, rtol=2e-2, atol=1e-4)
    assert taken >= 4


def test_the_loss_scale_wrapper_skips_a_non_finite_step_as_keras_does() -> None:
    """Keras' wrapper skips the inner step on a non-finite gradient and halves its scale:
    AliG then changes nothing (not even ``iterations`` or ``steps_skipped``: it never saw the
    step), and the loss handed over does not wait for a later step."""
    variable = keras.Variable([1.0, 2.0])
    wrapper = LossScaleOptimizer(AliG(max_lr=0.1, momentum=0.9), initial_scale=4.0)
    _apply(wrapper, [ops.convert_to_tensor([1.0, 0.0])], [variable], loss=1.0)
    alig = wrapper.inner_optimizer
    state = [_numpy(v) for v in alig.variables]
    before = _numpy(variable)
    _apply(wrapper, [ops.convert_to_tensor([math.inf, 0.0])], [variable], loss=1.0)
    np.testing.assert_array_equal(_numpy(variable), before)
    for saved, now in zip(state, alig.variables, strict=True):
        np.testing.assert_array_equal(_numpy(now), saved)
    assert float(_numpy(wrapper.dynamic_scale)) == 2.0
    with pytest.raises(ValueError, match="none reached it"):
        _apply(wrapper, [ops.convert_to_tensor([1.0, 0.0])], [variable])


def test_the_wrapper_divides_the_gradients_and_passes_the_loss_unscaled() -> None:
    """The wrapper's step is AliG's step on the gradients divided by the scale."""
    grads = [np.array([3.0, 4.0])]
    wrapped_variable, plain_variable = keras.Variable([1.0, 2.0]), keras.Variable([1.0, 2.0])
    wrapper = LossScaleOptimizer(AliG(momentum=0.5), initial_scale=8.0)
    plain = AliG(momentum=0.5)
    _apply(wrapper, [ops.convert_to_tensor(grads[0] * 8.0)], [wrapped_variable], loss=1.5)
    plain.apply([ops.convert_to_tensor(grads[0])], [plain_variable], loss=1.5)
    np.testing.assert_array_equal(_numpy(wrapped_variable), _numpy(plain_variable))
    assert float(_numpy(wrapper.inner_optimizer.gamma_hat)) == float(_numpy(plain.gamma_hat))


def test_keras_own_loss_scale_wrapper_around_alig_is_a_clear_error() -> None:
    """keras.optimizers.LossScaleOptimizer keeps the loss to itself: AliG says what to use."""
    variable = keras.Variable([1.0, 2.0])
    wrapper = keras.optimizers.LossScaleOptimizer(AliG(max_lr=0.1))
    with pytest.raises(ValueError, match=r"alig_tf\.LossScaleOptimizer"):
        _apply(wrapper, [ops.convert_to_tensor([1.0, 0.0])], [variable])


def test_the_loss_scale_wrapper_takes_alig_only() -> None:
    with pytest.raises(ValueError, match="got SGD"):
        LossScaleOptimizer(keras.optimizers.SGD(0.1))


# ---------------------------------------------------------------- Keras' optimizer API


def test_iterations_count_every_apply_and_steps_taken_the_steps_taken() -> None:
    variable = keras.Variable([1.0, 2.0])
    opt = AliG(max_lr=0.1)
    g = ops.convert_to_tensor([1.0, 0.0])
    for loss in (1.0, math.nan, 1.0):
        opt.apply([g], [variable], loss=loss)
    assert int(_numpy(opt.iterations)) == 3
    assert (int(_numpy(opt.steps_taken)), int(_numpy(opt.steps_skipped))) == (2, 1)


def test_every_gradient_none_gets_keras_own_message() -> None:
    """The message Keras' optimizers give, unchanged."""
    messages = []
    for opt, kwargs in ((keras.optimizers.SGD(0.1), {}), (AliG(max_lr=0.1), {"loss": 1.0})):
        with pytest.raises(ValueError, match="No gradients") as info:
            opt.apply([None], [keras.Variable([1.0, 2.0])], **kwargs)
        messages.append(str(info.value))
    assert messages[1] == messages[0] == "No gradients provided for any variable."


def test_an_empty_variable_list_builds_and_steps_nothing_as_keras() -> None:
    opt, sgd = AliG(max_lr=0.1), keras.optimizers.SGD(0.1)
    for o in (opt, sgd):
        o.build([])
        o.apply([], [])
    assert int(_numpy(opt.iterations)) == int(_numpy(sgd.iterations)) == 0
    assert int(_numpy(opt.steps_taken)) == 0


@pytest.mark.parametrize("wrapped", [False, True], ids=["alig", "loss_scale_wrapper"])
def test_stateless_apply_equals_apply_and_writes_nothing(wrapped: bool) -> None:
    """Keras' stateless API (JAX and torch; TensorFlow's raises by design), with the loss."""

    def make() -> Any:
        alig = AliG(max_lr=0.5, momentum=0.9)
        return LossScaleOptimizer(alig, initial_scale=4.0) if wrapped else alig

    scale = 4.0 if wrapped else 1.0
    grads = [ops.convert_to_tensor([3.0 * scale, 4.0 * scale])]
    stateless, stateful = make(), make()
    v_stateless, v_stateful = keras.Variable([1.0, 2.0]), keras.Variable([1.0, 2.0])
    stateless.build([v_stateless])
    if BACKEND == "tensorflow":
        with pytest.raises(ValueError, match="stateless_apply"):
            stateless.stateless_apply(
                [v.value for v in stateless.variables], grads, [v_stateless.value], loss=2.0
            )
        return
    before = [_numpy(v) for v in stateless.variables]
    new_values, new_state = stateless.stateless_apply(
        [v.value for v in stateless.variables], grads, [v_stateless.value], loss=2.0
    )
    _apply(stateful, grads, [v_stateful], loss=2.0)
    np.testing.assert_array_equal(_numpy(v_stateless), [1.0, 2.0])  # nothing written
    for saved, now in zip(before, stateless.variables, strict=True):
        np.testing.assert_array_equal(_numpy(now), saved)
    np.testing.assert_array_equal(_numpy(new_values[0]), _numpy(v_stateful))
    for new, expected in zip(new_state, stateful.variables, strict=True):
        np.testing.assert_array_equal(_numpy(new), _numpy(expected))


# ---------------------------------------------------------------- departures


def test_without_a_loss_no_step_is_taken() -> None:
    """Keras' optimizers step from the gradients alone; ALI-G's step size needs the loss:
    ``apply`` without one is a clear error (model.fit hands it over by itself)."""
    variable = keras.Variable([1.0, 2.0])
    with pytest.raises(ValueError, match="none reached it"):
        AliG(max_lr=0.1).apply([ops.ones((2,))], [variable])
    np.testing.assert_array_equal(_numpy(variable), [1.0, 2.0])


@pytest.mark.parametrize("name", ["weight_decay", "clipnorm", "global_clipnorm", "clipvalue"])
def test_weight_decay_and_clipping_are_refused(name: str) -> None:
    """They change the gradient (or the weights by the learning rate, the cap here) before
    ALI-G's step: refused with what to use instead (test_keras_options.py has the words)."""
    with pytest.raises(ValueError, match=f"does not take {name}"):
        AliG(max_lr=0.1, **{name: 0.1})
