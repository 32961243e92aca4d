"""``AliG(gradient_accumulation_steps=k)``: k micro-batches then one step equal one step on
their union (docs/specification.md, "The loss and the gradient belong together"), on every backend.

Keras averages the k micro-batches' gradients inside the optimizer; AliG averages their
losses in step (an optimizer variable, ``accumulated_loss``). Before, the k-th
micro-batch's loss alone went with the mean gradient: 0.55 relative off the union's step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras import ops

from alig_cases import initial_params, max_relative_deviation
from alig_core import AliGConfig
from alig_core.oracle import OracleState, oracle_step
from alig_tf import AliG, AliGTrainStep
from keras_float64 import Linear, mean_squared_error, soft_sign

BACKEND = keras.backend.backend()
UPDATES = 3
"""Steps of each run: enough for gamma to move."""
BATCH = 16
"""Samples per step: the union of the k micro-batches."""


@keras.saving.register_keras_serializable(package="alig_accumulation_tests")
class Net(AliGTrainStep, keras.Sequential):
    """A Sequential model that hands the loss to AliG on every backend."""


def _data() -> tuple[np.ndarray, np.ndarray]:
    """float64 values exact in float32 (the data adapters of some backends pass through it)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((UPDATES * BATCH, 5)).astype(np.float32).astype(np.float64)
    y = rng.standard_normal((UPDATES * BATCH, 2)).astype(np.float32).astype(np.float64)
    return x, y


def _model(accumulation: int | None) -> Net:
    keras.utils.set_random_seed(0)
    model = Net([keras.Input((5,)), Linear(8), keras.layers.Activation(soft_sign), Linear(2)])
    model.compile(
        optimizer=AliG(
            max_lr=1.5, momentum=0.9, max_norm=4.0, gradient_accumulation_steps=accumulation
        ),
        loss=mean_squared_error,
    )
    return model


def _numpy(value: Any) -> np.ndarray:
    """A variable's (or a tensor's) value as NumPy."""
    return np.array(
        ops.convert_to_numpy(value.value if isinstance(value, keras.Variable) else value)
    )


def _fit_step_by_step(model: Net, micro_batch: int) -> tuple[list[float], list[bool]]:
    """One ``fit`` per step of BATCH samples (variables sync when fit returns, on JAX)."""
    x, y = _data()
    gammas, capped = [], []
    for t in range(UPDATES):
        rows = slice(t * BATCH, (t + 1) * BATCH)
        model.fit(x[rows], y[rows], batch_size=micro_batch, epochs=1, shuffle=False, verbose=0)
        gammas.append(float(_numpy(model.optimizer.gamma)))
        capped.append(bool(_numpy(model.optimizer.capped)))
    return gammas, capped


@pytest.mark.parametrize("k", [2, 4])
def test_fit_with_accumulation_equals_one_step_on_the_union(k: int, floatx) -> None:
    floatx("float64")
    union = _model(None)
    union_gammas, union_capped = _fit_step_by_step(union, BATCH)
    accumulated = _model(k)
    gammas, capped = _fit_step_by_step(accumulated, BATCH // k)

    assert len(set(union_gammas)) == UPDATES
    assert not all(union_capped)
    deviation = max_relative_deviation(
        [_numpy(v) for v in accumulated.trainable_variables],
        [_numpy(v) for v in union.trainable_variables],
    )
    assert deviation <= 1e-10
    np.testing.assert_allclose(gammas, union_gammas, rtol=1e-10)
    assert capped == union_capped
    assert int(_numpy(accumulated.optimizer.steps_taken)) == UPDATES
    assert int(_numpy(accumulated.optimizer.iterations)) == UPDATES  # Keras: calls // k
    assert float(_numpy(accumulated.optimizer.accumulated_loss)) == 0.0


def test_fit_with_accumulation_resumes_exactly_from_a_keras_file(tmp_path: Path, floatx) -> None:
    """Saved in the middle of an accumulation (k = 4, 6 micro-batches in: 2 are pending)."""
    floatx("float64")
    x, y = _data()
    micro = BATCH // 4
    uninterrupted = _model(4)
    uninterrupted.fit(x, y, batch_size=micro, epochs=1, shuffle=False, verbose=0)

    first = _model(4)
    split = 6 * micro
    first.fit(x[:split], y[:split], batch_size=micro, epochs=1, shuffle=False, verbose=0)
    assert int(_numpy(first.optimizer.steps_taken)) == 1
    pending = float(_numpy(first.optimizer.accumulated_loss))
    assert pending > 0.0  # the loss of two micro-batches waits for the step
    first.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert restored.optimizer.gradient_accumulation_steps == 4
    assert float(_numpy(restored.optimizer.accumulated_loss)) == pending
    restored.fit(x[split:], y[split:], batch_size=micro, epochs=1, shuffle=False, verbose=0)
    assert int(_numpy(restored.optimizer.steps_taken)) == UPDATES
    for a, b in zip(uninterrupted.trainable_variables, restored.trainable_variables, strict=True):
        assert _numpy(a).tobytes() == _numpy(b).tobytes()


# ---------------------------------------------------------------- custom loops


def _micro_batches(k: int, seed: int = 3) -> list[list[tuple[float, list[np.ndarray]]]]:
    """UPDATES groups of k micro-batch (loss, gradients), each loss and gradient a mean
    over its micro-batch (as a loop computes them)."""
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(UPDATES):
        scale = float(10.0 ** rng.uniform(-0.2, 0.6))
        groups.append(
            [
                (
                    float(rng.uniform(0.2, 2.0)),
                    [scale * rng.standard_normal(p.shape) for p in initial_params()],
                )
                for _ in range(k)
            ]
        )
    return groups


def _union_oracle(
    config: AliGConfig, groups: list[list[tuple[float, list[np.ndarray]]]]
) -> tuple[list[np.ndarray], list[float]]:
    """The oracle stepping once per group on the union: the mean loss and mean gradient."""
    params, state, gammas = initial_params(), OracleState.zeros(len(initial_params())), []
    for group in groups:
        loss = float(np.mean([loss for loss, _ in group]))
        grads = [np.mean([g[i] for _, g in group], axis=0) for i in range(len(params))]
        params, state = oracle_step(params, grads, loss, state, config)
        gammas.append(state.gamma)
    return params, gammas


def _custom_loop(opt: AliG, variables: list[keras.Variable], mode: str) -> Callable[..., None]:
    """``opt.apply(grads, variables, loss=loss)``: eagerly, in a tf.function, under XLA, or
    (JAX) ``stateless_apply`` under ``jax.jit``."""
    if mode == "eager":
        return lambda grads, loss: opt.apply(grads, variables, loss=loss)
    if mode == "stateless":
        import jax

        @jax.jit
        def step(opt_values: list[Any], values: list[Any], grads: list[Any], loss: Any) -> Any:
            return opt.stateless_apply(opt_values, grads, values, loss=loss)

        def stateless(grads: list[Any], loss: float) -> None:
            values, opt_values = step(
                [v.value for v in opt.variables],
                [v.value for v in variables],
                grads,
                ops.convert_to_tensor(loss, dtype="float64"),
            )
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)
            for variable, value in zip(opt.variables, opt_values, strict=True):
                variable.assign(value)

        return stateless
    import tensorflow as tf

    @tf.function(jit_compile=mode == "xla")
    def compiled(grads: list[Any], loss: Any) -> None:
        opt.apply(grads, variables, loss=loss)

    return lambda grads, loss: compiled(grads, tf.constant(loss, dtype="float64"))


MODES = {"tensorflow": ["eager", "graph", "xla"], "jax": ["eager", "stateless"]}.get(
    BACKEND, ["eager"]
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("adjusted", [False, True])
def test_custom_loop_with_accumulation_equals_one_step_on_the_union(
    adjusted: bool, k: int, mode: str, floatx
) -> None:
    """Each micro-batch's own loss goes with its gradients: ``apply(grads, vars, loss=loss)``
    k times, and the k-th call steps once on the means."""
    floatx("float64")
    kwargs = {"max_lr": 0.3, "momentum": 0.9, "adjusted_momentum": adjusted, "max_norm": 4.0}
    groups = _micro_batches(k)
    expected, expected_gammas = _union_oracle(AliGConfig(**kwargs), groups)
    assert len(set(expected_gammas)) == UPDATES
    assert min(expected_gammas) < kwargs["max_lr"]

    variables = [keras.Variable(p, dtype="float64") for p in initial_params()]
    opt = AliG(**kwargs, gradient_accumulation_steps=k)
    opt.build(variables)
    step = _custom_loop(opt, variables, mode)
    gammas = []
    for t, group in enumerate(groups):
        before = [_numpy(v) for v in variables]
        for i, (loss, grads) in enumerate(group):
            step([ops.convert_to_tensor(g) for g in grads], loss)
            if i < k - 1:  # the micro-batches before the k-th move nothing but the sums
                assert [_numpy(v).tobytes() for v in variables] == [b.tobytes() for b in before]
                assert int(_numpy(opt.steps_taken)) == t
        gammas.append(float(_numpy(opt.gamma)))
    np.testing.assert_allclose(gammas, expected_gammas, rtol=1e-10)
    assert max_relative_deviation([_numpy(v) for v in variables], expected) <= 1e-10


def test_a_micro_batch_without_a_loss_is_a_clear_error(floatx) -> None:
    """Also before the k-th call, where Keras only adds the gradients up."""
    floatx("float64")
    variables = [keras.Variable(p, dtype="float64") for p in initial_params()]
    opt = AliG(max_lr=0.3, gradient_accumulation_steps=2)
    grads = [ops.convert_to_tensor(g) for g in _micro_batches(2)[0][0][1]]
    with pytest.raises(ValueError, match="none reached it"):
        opt.apply(grads, variables)
    assert float(_numpy(opt.accumulated_loss)) == 0.0


def test_a_non_finite_micro_batch_skips_the_accumulated_step(floatx) -> None:
    """A NaN loss in one micro-batch: the whole step is skipped (its gradient sums are
    dropped with it), and the next one is the oracle's, as if nothing had happened."""
    floatx("float64")
    kwargs = {"max_lr": 0.3, "momentum": 0.9, "max_norm": 4.0}
    groups = _micro_batches(2)
    groups[1][0] = (float("nan"), groups[1][0][1])
    expected, _ = _union_oracle(AliGConfig(**kwargs), groups)
    variables = [keras.Variable(p, dtype="float64") for p in initial_params()]
    opt = AliG(**kwargs, gradient_accumulation_steps=2)
    for t, group in enumerate(groups):
        for loss, grads in group:
            opt.apply([ops.convert_to_tensor(g) for g in grads], variables, loss=loss)
        assert float(_numpy(opt.accumulated_loss)) == 0.0
        assert int(_numpy(opt.steps_skipped)) == (0 if t == 0 else 1)
    assert int(_numpy(opt.steps_taken)) == UPDATES - 1
    assert max_relative_deviation([_numpy(v) for v in variables], expected) <= 1e-10
