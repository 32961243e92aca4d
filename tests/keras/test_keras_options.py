"""The arguments of ``keras.optimizers.Optimizer`` under AliG: each refused with what to use
instead, or supported and shown not to change ALI-G's step; integer and exact caps."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras import ops

from alig_cases import CASES, initial_params, make_sequence, max_relative_deviation
from alig_core import AliGConfig
from alig_core.oracle import OracleState, oracle_step
from alig_tf import AliG, AliGTrainStep
from keras_float64 import Linear, mean_squared_error, soft_sign

SUPPORTED = {
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",  # tests/keras/test_keras_accumulation.py
}
"""The Keras arguments AliG passes on (each tested below to leave ALI-G's step exact)."""

REFUSED = {
    "weight_decay": 1e-2,
    "clipnorm": 0.1,
    "global_clipnorm": 0.1,
    "clipvalue": 0.1,
}
"""The Keras arguments AliG refuses, with a value that would change its step."""


@keras.saving.register_keras_serializable(package="alig_options_tests")
class Net(AliGTrainStep, keras.Sequential):
    """A Sequential model that hands the loss to AliG on every backend."""


def _numpy(value: Any) -> np.ndarray:
    """A variable's (or a tensor's) value as NumPy."""
    return np.array(
        ops.convert_to_numpy(value.value if isinstance(value, keras.Variable) else value)
    )


def _tensors(grads: tuple[np.ndarray | None, ...]) -> list[Any]:
    return [None if g is None else ops.convert_to_tensor(g) for g in grads]


# ---------------------------------------------------------------- the whitelist


def test_every_argument_of_keras_optimizers_is_decided() -> None:
    """A new argument of Keras' base optimizer fails here until it is supported (and tested)
    or refused; until then AliG refuses it as unknown (next test)."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    parameters = set(inspect.signature(BaseOptimizer.__init__).parameters)
    assert parameters - {"self", "learning_rate", "name", "kwargs"} == SUPPORTED | set(REFUSED)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"decay": 0.1}, ("decay=0.1", "ema_momentum", "gradient_accumulation_steps")),
        ({"nesterov": True}, ("nesterov=True", "max_norm", "remove")),
        ({"amsgrad": True, "beta_1": 0.9}, ("amsgrad=True", "beta_1=0.9")),
    ],
    ids=["decay", "nesterov", "two_unknown"],
)
def test_an_unknown_argument_is_refused(kwargs: dict[str, Any], words: tuple[str, ...]) -> None:
    """Keras itself only warns about ``decay``; any argument not on the whitelist raises."""
    with pytest.raises(ValueError, match="does not support") as info:
        AliG(max_lr=0.1, **kwargs)
    for word in words:
        assert word.lower() in str(info.value).lower()


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("weight_decay", ("max_norm", "project_onto_ball", "learning_rate * weight_decay")),
        ("clipnorm", ("raw gradient", "max_lr")),
        ("global_clipnorm", ("raw gradient", "max_lr")),
        ("clipvalue", ("raw gradient", "max_lr")),
    ],
)
@pytest.mark.parametrize("max_lr", [None, 0.5])
def test_weight_decay_and_clipping_are_refused(
    name: str, words: tuple[str, ...], max_lr: float | None
) -> None:
    """Keras decays by learning_rate * weight_decay (the cap, or inf: one step made every
    weight -inf) and clips before the step (gamma then came from the clipped gradient)."""
    value = REFUSED[name]
    with pytest.raises(ValueError, match=f"does not take {name}") as info:
        AliG(max_lr=max_lr, **{name: value})
    message = str(info.value)
    assert f"{name}={value!r}" in message
    for word in words:
        assert word in message


def test_weight_decay_zero_is_refused_too() -> None:
    """0.0 is not None for Keras: it would decay by 0 * inf = nan without a cap."""
    with pytest.raises(ValueError, match=r"weight_decay=0\.0"):
        AliG(weight_decay=0.0)


def test_the_refused_arguments_at_their_default_are_accepted() -> None:
    """As ``get_config`` writes them (and configs saved before the whitelist hold them)."""
    opt = AliG(max_lr=0.1, **dict.fromkeys(REFUSED))
    config = opt.get_config()
    assert all(config[name] is None for name in REFUSED)
    assert AliG.from_config(config).get_config() == config


# ---------------------------------------------------------------- EMA


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
@pytest.mark.parametrize("overwrite_every", [None, 4])
def test_ema_of_the_weights_leaves_the_step_exact(overwrite_every: int | None, floatx) -> None:
    """``use_ema``: Keras averages the weights after each step (the first average is the
    weights themselves) and, every ``ema_overwrite_frequency`` steps, writes the average
    into them; ALI-G's steps are those of the oracle from wherever the weights are."""
    floatx("float64")
    case = next(c for c in CASES if c.name == "standard_projected")
    sequence = make_sequence(20)
    ema = 0.75

    variables = [keras.Variable(p, dtype="float64") for p in initial_params()]
    opt = AliG(
        **case.kwargs, use_ema=True, ema_momentum=ema, ema_overwrite_frequency=overwrite_every
    )
    plain = [keras.Variable(p, dtype="float64") for p in initial_params()]
    plain_opt = AliG(**case.kwargs)
    for step in sequence:
        opt.apply(_tensors(step.grads), variables, loss=step.loss)
        plain_opt.apply(_tensors(step.grads), plain, loss=step.loss)

    params, state, average = initial_params(), OracleState.zeros(len(initial_params())), None
    gammas = []
    for t, step in enumerate(sequence):
        params, state = oracle_step(params, step.grads, step.loss, state, case.config)
        gammas.append(state.gamma)
        average = (
            [p.copy() for p in params]
            if average is None
            else [ema * a + (1 - ema) * p for a, p in zip(average, params, strict=True)]
        )
        if overwrite_every and (t + 1) % overwrite_every == 0:
            params = [a.copy() for a in average]
    assert len(set(gammas)) > 5  # gamma moves

    weights = [_numpy(v) for v in variables]
    assert max_relative_deviation(weights, params) <= 1e-10
    if overwrite_every is None:  # the weights are the run without EMA, bit for bit
        assert [w.tobytes() for w in weights] == [_numpy(v).tobytes() for v in plain]
    else:  # the average was written into them: they left the run without EMA
        assert max_relative_deviation(weights, [_numpy(v) for v in plain]) > 1e-3
    opt.finalize_variable_values(variables)  # what fit does at its end: weights <- average
    assert max_relative_deviation([_numpy(v) for v in variables], average) <= 1e-10


# ---------------------------------------------------------------- loss_scale_factor


def _regression_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 4)), rng.standard_normal((32, 3))
    return x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)


def _fit_gammas(factor: float | None) -> tuple[list[np.ndarray], list[float], list[bool]]:
    x, y = _regression_data()
    keras.utils.set_random_seed(0)
    model = Net([keras.Input((4,)), Linear(8), keras.layers.Activation(soft_sign), Linear(3)])
    model.compile(
        optimizer=AliG(max_lr=2.0, momentum=0.9, loss_scale_factor=factor),
        loss=mean_squared_error,  # float64 on every backend (keras_float64)
    )
    gammas, capped = [], []
    for t in range(4):  # one step per fit: variables sync when fit returns (JAX)
        rows = slice(8 * t, 8 * (t + 1))
        model.fit(x[rows], y[rows], batch_size=8, epochs=1, shuffle=False, verbose=0)
        gammas.append(float(_numpy(model.optimizer.gamma)))
        capped.append(bool(_numpy(model.optimizer.capped)))
    return [_numpy(v) for v in model.trainable_variables], gammas, capped


@pytest.mark.parametrize("factor", [1024.0, 1000.0])
def test_fit_with_loss_scale_factor_equals_fit_without(factor: float, floatx) -> None:
    """Keras multiplies the loss in ``scale_loss`` and divides the gradients in ``apply``;
    AliG keeps the loss as it was before scaling. (A power of 2 scales exactly.)"""
    floatx("float64")
    weights, gammas, capped = _fit_gammas(factor)
    plain_weights, plain_gammas, plain_capped = _fit_gammas(None)
    assert len(set(plain_gammas)) == len(plain_gammas)
    assert not all(plain_capped)  # gamma moves
    np.testing.assert_allclose(gammas, plain_gammas, rtol=1e-10)
    assert capped == plain_capped
    assert max_relative_deviation(weights, plain_weights) <= 1e-10


def test_custom_loop_with_loss_scale_factor_takes_the_unscaled_loss(floatx) -> None:
    """The gradients of the scaled loss, and the unscaled loss: the oracle's steps."""
    floatx("float64")
    factor = 1000.0
    case = next(c for c in CASES if c.name == "adjusted_projected")
    sequence = make_sequence(10, pinned=True)
    variables = [keras.Variable(p, dtype="float64") for p in initial_params()]
    opt = AliG(**{**case.kwargs, "max_lr": None}, loss_scale_factor=factor)
    params, state = initial_params(), OracleState.zeros(len(initial_params()))
    config = AliGConfig(**{**case.kwargs, "max_lr": None})
    for step in sequence:
        scaled = [factor * g for g in step.grads]
        opt.apply(_tensors(tuple(scaled)), variables, loss=step.loss)
        params, state = oracle_step(params, step.grads, step.loss, state, config)
        assert float(_numpy(opt.gamma)) == pytest.approx(state.gamma, rel=1e-10)
    assert max_relative_deviation([_numpy(v) for v in variables], params) <= 1e-10
    assert float(ops.convert_to_numpy(opt.scale_loss(ops.convert_to_tensor(2.0)))) == 2000.0


# ---------------------------------------------------------------- the cap


@pytest.mark.parametrize("cap", [1, np.int64(1), np.float32(1.0)], ids=["int", "np_int", "np_f32"])
def test_an_integer_or_numpy_cap_is_accepted(cap: Any, floatx) -> None:
    """Keras' own learning_rate takes a Python float only; AliG converts the cap."""
    floatx("float64")
    runs = []
    for max_lr in (cap, 1.0):
        variables = [keras.Variable(p, dtype="float64") for p in initial_params()]
        opt = AliG(max_lr=max_lr, momentum=0.9)
        for step in make_sequence(5, pinned=True):
            opt.apply(_tensors(step.grads), variables, loss=step.loss)
        assert bool(_numpy(opt.capped))  # the cap is what decides these steps
        runs.append([_numpy(v).tobytes() for v in variables])
        assert opt.get_config()["max_lr"] == 1.0
    assert runs[0] == runs[1]


def test_get_config_keeps_the_exact_cap() -> None:
    """The learning-rate variable is float32 (floatx) and holds 0.1 rounded; a float64
    model steps with 0.1 itself, and so must one rebuilt from the config."""
    opt = AliG(max_lr=0.1, momentum=0.9)
    assert keras.backend.standardize_dtype(opt._learning_rate.dtype) == "float32"
    config = opt.get_config()
    assert config["max_lr"] == 0.1
    assert AliG.from_config(config).get_config() == config
    opt.learning_rate = 0.25  # changed by the user (or a callback): that is saved
    assert opt.get_config()["max_lr"] == 0.25


def test_a_keras_file_keeps_the_exact_cap(tmp_path: Path) -> None:
    """float64 layers under the float32 floatx: save, load, continue; bitwise the
    uninterrupted run, on steps capped at 0.1 (0.1 in float32 is 1.5e-9 away)."""
    x, y = _regression_data()

    def new_model() -> Net:
        keras.utils.set_random_seed(0)
        model = Net(
            [
                keras.Input((4,), dtype="float64"),
                keras.layers.Dense(8, "tanh", dtype="float64"),
                keras.layers.Dense(3, dtype="float64"),
            ]
        )
        model.compile(optimizer=AliG(max_lr=0.1, momentum=0.9), loss="mse")
        return model

    def fit(model: Net, rows: slice) -> list[bool]:
        capped = []
        for t in range(rows.start, rows.stop):
            batch = slice(4 * t, 4 * (t + 1))
            model.fit(x[batch], y[batch], batch_size=4, epochs=1, shuffle=False, verbose=0)
            capped.append(bool(_numpy(model.optimizer.capped)))
        return capped

    uninterrupted = new_model()
    capped = fit(uninterrupted, slice(0, 8))
    assert any(capped[4:])  # the cap decides some of the steps after the split
    first = new_model()
    fit(first, slice(0, 4))
    first.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert restored.optimizer.max_lr == 0.1
    fit(restored, slice(4, 8))
    for a, b in zip(uninterrupted.trainable_variables, restored.trainable_variables, strict=True):
        assert _numpy(a).tobytes() == _numpy(b).tobytes()
