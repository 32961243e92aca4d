"""alig_jax.extrapolation: d = 0 is the base, skips, jit, projection, noise, lr_x, value=."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import alig_core
from alig_jax import (
    AliGState,
    alig,
    anchor_params,
    extrapolation,
    extrapolation_anchor,
    multi_steps,
    project_onto_ball,
)
from extrapolation_cases import BASES, ITERATIONS, ExtrapolationCase, Problem, initial_params
from worker_scripts import import_script

worker = import_script(Path(__file__).with_name("extrapolation_worker.py"))

MODES = ("gradient", "past", "noise")


def bits(tree: Any) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def apply_leafwise(params: list[jax.Array], updates: list[Any]) -> list[jax.Array]:
    """optax.apply_updates leaf by leaf (a bare base returns ``None`` for no gradient)."""
    return [
        p if u is None else optax.apply_updates(p, u) for p, u in zip(params, updates, strict=True)
    ]


def zero_displacement(mode: str) -> dict[str, Any]:
    return {"sigma": 0.0} if mode == "noise" else {"lr_x": 0.0}


# ---------------------------------------------------------------- d = 0 is the base


def without_alig_skip_count(base_state: Any) -> tuple[Any, int]:
    """The base's state with ALI-G's ``steps_skipped`` set aside: (the rest, that count)."""
    found = worker.alig_state(type("S", (), {"base_state": base_state})())
    if found is None:
        return base_state, 0
    rest = jax.tree.map(
        lambda s: s._replace(steps_skipped=0) if isinstance(s, AliGState) else s,
        base_state,
        is_leaf=lambda x: isinstance(x, AliGState),
    )
    return rest, int(found.steps_skipped)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("mode", MODES)
def test_zero_displacement_equals_the_base_bit_for_bit(mode: str, base: str) -> None:
    """lr_x = 0 or sigma = 0: params and base state are the bare base's, after every call.

    The bare base steps on the wrapper's update evaluations (every call in "past"/"noise"
    mode, every second in "gradient" mode). Both run eagerly, op by op: under ``jit`` XLA
    may contract a multiply and an add into one FMA in one program and not in the other,
    a rounding apart. SGD runs without events (it has no skip rule of its own, and
    optax.sgd drops the momentum buffer of a ``None`` gradient where the wrapper, like the
    oracle's SGD, keeps it); ALI-G runs with them, and its own ``steps_skipped`` stays 0
    inside the wrapper (the wrapper keeps the base's state bit for bit where it skips, and
    counts the skip in its own ``skipped``): every other leaf of its state is the bare
    ALI-G's.
    """
    case = ExtrapolationCase(mode, base, "alternating", sigma=0.05 if mode == "noise" else None)
    problem = Problem(events=case.is_alig)
    tx = worker.wrapper(case, **zero_displacement(mode))
    bare = worker.base_transformation(case)
    params = [jnp.asarray(p) for p in initial_params()]
    state, bare_params, bare_state = tx.init(params), params, bare.init(params)
    updates_made, skipped_at_the_anchor = 0, 0
    for k in range(case.calls):
        updating = mode != "gradient" or int(state.phase) == 1
        loss, grads = worker.evaluate(problem, params, k, np.float64)
        assert bits(params) == bits(bare_params)  # every evaluation is at w_t
        skipped = int(state.skipped)
        updates, state = tx.update(grads, state, params, value=loss)
        if not updating:  # the bare base never sees the evaluations at the anchor
            skipped_at_the_anchor += int(state.skipped) - skipped
        params = optax.apply_updates(params, updates)
        if updating:
            steps, bare_state = bare.update(grads, bare_state, bare_params, value=loss)
            bare_params = apply_leafwise(bare_params, steps)
            updates_made += 1
        assert bits(params) == bits(bare_params), f"call {k}"
        assert bits(anchor_params(state, params)) == bits(bare_params)
        ours, _ = without_alig_skip_count(state.base_state)
        theirs, bare_skipped = without_alig_skip_count(bare_state)
        assert bits(ours) == bits(theirs), f"call {k}"
        if case.is_alig:
            assert int(state.skipped) == bare_skipped + skipped_at_the_anchor
    assert updates_made >= ITERATIONS * 0.9
    assert int(state.iteration) >= 0.7 * ITERATIONS
    if case.is_alig:
        assert int(state.skipped) >= 5


# ---------------------------------------------------------------- skipped iterations


SKIP_CASES = [
    c
    for c in worker.jax_cases()
    if c.base in ("sgd_nesterov", "alig_adjusted_projected", "alig_standard") and not c.label
]


@pytest.mark.parametrize("case", SKIP_CASES, ids=lambda case: case.name)
def test_skipped_iterations_leave_everything_bit_for_bit(case: ExtrapolationCase) -> None:
    """SPEC 7: the stored anchor, the base's state, the counters and the key as they were.

    The params go back to the anchor: bit for bit where they held it (phase 0: the updates
    are signed zeros), and where they held w~ bit for bit wherever the displacement is no
    larger than the anchor (w~ - w exact), else within one rounding of w~.
    """
    tx, params, state = worker.build(case)
    update = jax.jit(tx.update)
    problem = Problem()
    skipped_in = {0: 0, 1: 0}
    exact_entries, inexact_entries = 0, 0
    for k in range(case.calls):
        before_params, before = params, state
        before_anchor = anchor_params(before, before_params)
        loss, grads = worker.evaluate(problem, params, k, np.float64)
        updates, state = update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
        if int(state.skipped) == int(before.skipped):
            continue
        assert int(state.skipped) == int(before.skipped) + 1
        phase = int(before.phase)
        skipped_in[phase] += 1
        assert int(state.phase) == 0
        assert int(state.iteration) == int(before.iteration)
        assert bits(state.base_state) == bits(before.base_state)
        assert bits(state.key) == bits(before.key)
        assert bits(anchor_params(state, params)) == bits(before_anchor)  # exact, always
        if phase == 1:  # the stored anchor was in use
            assert bits(state.anchor) == bits(before.anchor)
        if phase == 0:
            assert bits(params) == bits(before_params)
            assert all(not np.any(np.asarray(u)) for u in updates)
            continue
        for p, a, w in zip(params, before_anchor, before_params, strict=True):
            p, a, w = np.asarray(p), np.asarray(a), np.asarray(w)
            exact = np.abs(w - a) <= np.abs(a)
            assert p[exact].tobytes() == a[exact].tobytes()
            bound = 2 * np.finfo(np.float64).eps * np.maximum(np.abs(a), np.abs(w))
            assert np.all(np.abs(p - a) <= bound)
            exact_entries += int(exact.sum())
            inexact_entries += int((p != a).sum())
    assert skipped_in[1] >= 3
    if case.mode == "gradient":  # non-finite values at the anchor skip too
        assert skipped_in[0] >= 3
    assert exact_entries > 10 * inexact_entries


# ---------------------------------------------------------------- jit


@pytest.mark.parametrize("base", ["sgd_nesterov", "alig_adjusted_projected"])
@pytest.mark.parametrize("mode", MODES)
def test_one_compilation_for_every_phase_and_skip(mode: str, base: str) -> None:
    case = ExtrapolationCase(mode, base, "alternating", sigma=0.05 if mode == "noise" else None)
    tx, params, state = worker.build(case)
    traces = 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal traces
        traces += 1
        return tx.update(*args, **kwargs)

    update = jax.jit(counted)
    problem = Problem()
    phases = set()
    for k in range(80):
        loss, grads = worker.evaluate(problem, params, k, np.float64)
        grads = [jnp.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        phases.add(int(state.phase))
        updates, state = update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
    assert traces == 1
    assert update._cache_size() == 1
    assert int(state.skipped) >= 2
    assert int(state.iteration) >= 25
    assert phases == {0, 1}


# ---------------------------------------------------------------- projection


@pytest.mark.parametrize("mode", MODES)
def test_projection_applies_to_the_next_iterate_not_to_the_extrapolated_point(mode: str) -> None:
    case = ExtrapolationCase(
        mode, "alig_standard_projected", "alternating", sigma=0.5 if mode == "noise" else None
    )
    max_norm = BASES["alig_standard_projected"].max_norm
    tx = worker.wrapper(case)
    params = project_onto_ball([jnp.asarray(p) for p in initial_params()], max_norm)
    state = tx.init(params)
    update = jax.jit(tx.update)
    problem = Problem(events=False)
    outside = 0

    def norm(tree: Any) -> float:
        return float(np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(tree))))

    for k in range(60):
        loss, grads = worker.evaluate(problem, params, k, np.float64)
        updates, state = update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
        assert norm(anchor_params(state, params)) <= max_norm * (1 + 1e-12)
        if int(state.phase) == 1 and norm(params) > max_norm * (1 + 1e-6):
            outside += 1
    assert outside >= 10  # w~ was not projected


# ---------------------------------------------------------------- the displacements


def _quadratic_step(tx: Any, params: jax.Array, state: Any) -> tuple[jax.Array, Any, Any]:
    loss, grads = jax.value_and_grad(lambda w: 0.5 * jnp.sum(w**2) + 1.0)(params)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, (loss, grads)


def test_the_default_lr_x_of_alig_is_its_step_size_at_the_anchor_without_moving_it() -> None:
    tx = extrapolation(alig(max_lr=10.0, momentum=0.9, eps=1e-5))
    params = jnp.array([1.0, -2.0, 0.5])
    state = tx.init(params)
    moved, state, (loss, grads) = _quadratic_step(tx, params, state)
    gamma = float(loss) / (float(jnp.sum(grads**2)) + 1e-5)  # below the cap
    assert 0 < gamma < 10.0
    np.testing.assert_allclose(moved - params, -gamma * grads, rtol=1e-14)
    alig_state = state.base_state
    assert isinstance(alig_state, AliGState)
    assert (int(alig_state.steps_taken), float(alig_state.gamma)) == (0, 0.0)  # untouched
    assert bits(alig_state.momentum_buffer) == bits(jnp.zeros(3))


def test_alig_gets_the_linearised_loss_as_value() -> None:
    """SPEC 5: gamma_hat = (l(w~) - f* + <g(w~), w - w~>) / (||g(w~)||^2 + eps)."""
    eps, f_star = 1e-5, 0.25
    for linearized in (True, False):
        tx = extrapolation(
            alig(max_lr=10.0, eps=eps, f_star=f_star), lr_x=0.3, linearized=linearized
        )
        params = jnp.array([1.0, -2.0, 0.5])
        state = tx.init(params)
        tilde, state, _ = _quadratic_step(tx, params, state)
        after, state, (loss, grads) = _quadratic_step(tx, tilde, state)
        correction = float(jnp.sum(grads * (params - tilde))) if linearized else 0.0
        expected = (float(loss) - f_star + correction) / (float(jnp.sum(grads**2)) + eps)
        assert float(state.base_state.gamma_hat) == pytest.approx(expected, rel=1e-14)
        np.testing.assert_allclose(after, params - expected * grads, rtol=1e-14)


def test_sgd_takes_its_learning_rate_from_inject_hyperparams_and_ignores_linearized() -> None:
    def run(tx: Any) -> list[jax.Array]:
        params = jnp.array([1.0, -2.0, 0.5])
        state, out = tx.init(params), []
        for _ in range(6):
            params, state, _ = _quadratic_step(tx, params, state)
            out.append(params)
        return out

    injected = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9, nesterov=True)
    plain = optax.sgd(0.1, momentum=0.9, nesterov=True)
    reference = run(extrapolation(plain, lr_x=0.1))
    assert bits(run(extrapolation(injected))) == bits(reference)
    assert bits(run(extrapolation(plain, lr_x=0.1, linearized=False))) == bits(reference)
    assert bits(run(extrapolation(plain, lr_x=0.2))) != bits(reference)


def test_alig_is_found_under_inject_hyperparams_and_chain() -> None:
    """The linearised loss and the default lr_x reach ALI-G however it is wrapped."""

    def run(base: Any) -> list[bytes]:
        tx = extrapolation(base, mode="past")
        params = [jnp.asarray(p) for p in initial_params()]
        params, _ = worker.run(tx, params, tx.init(params), Problem(), 0, 40)
        return bits(params)

    kwargs = {"max_lr": 0.8, "momentum": 0.9}
    reference = run(alig(**kwargs))
    assert run(optax.inject_hyperparams(alig)(**kwargs)) == reference
    assert run(optax.chain(alig(**kwargs))) == reference
    # Guard: a base that is not detected as ALI-G gets the plain loss and differs.
    tx = extrapolation(alig(**kwargs), mode="past", linearized=False)
    params = [jnp.asarray(p) for p in initial_params()]
    assert bits(worker.run(tx, params, tx.init(params), Problem(), 0, 40)[0]) != reference


def test_noise_is_drawn_from_fold_in_of_the_key_and_the_iteration() -> None:
    sigma, seed = 0.5, 3
    tx = extrapolation(optax.sgd(0.1), mode="noise", sigma=sigma, seed=seed)
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    state = tx.init(params)
    for t in (1, 2, 3):
        loss, grads = jax.value_and_grad(lambda p: p["a"] @ p["a"] + p["b"] ** 2)(params)
        updates, state = tx.update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
        # xi_t for the displacement after iteration t: split(fold_in(key, t), leaves)[i].
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), t), 2)
        xi = [
            jax.random.normal(k, jnp.shape(x), x.dtype)
            for k, x in zip(keys, [grads["a"], grads["b"]], strict=True)
        ]
        anchor = anchor_params(state, params)
        np.testing.assert_allclose(params["a"] - anchor["a"], sigma * xi[0], rtol=1e-12)
        np.testing.assert_allclose(params["b"] - anchor["b"], sigma * xi[1], rtol=1e-12)
    assert int(state.iteration) == 3
    same = extrapolation(optax.sgd(0.1), mode="noise", sigma=sigma, seed=jax.random.key(seed))
    assert bits(same.init(params).key) == bits(state.key)


def test_extra_arguments_reach_the_base_and_unknown_ones_are_ignored() -> None:
    seen = []

    def init(params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        seen.append(sorted(extra))
        return jax.tree.map(lambda g: -0.1 * g, updates), state

    tx = extrapolation(optax.GradientTransformationExtraArgs(init, update), lr_x=0.1)
    params = jnp.array([1.0])
    state = tx.init(params)
    tx.update(params, state, params, value=1.0, batch_index=3)
    assert seen
    assert all(s == ["batch_index", "value"] for s in seen)
    tx.update(params, state, params)  # value is optional for a base that takes no loss


def _one_extrapolation_from_one() -> tuple[Any, jax.Array]:
    """EXTRAP-SGD on ``w^2 / 2`` from ``w = 1``, ``lr_x`` 0.5: the state and ``w~ = 0.5``."""
    tx = extrapolation(optax.sgd(0.1), lr_x=0.5)
    params = jnp.array([1.0])
    state = tx.init(params)
    updates, state = tx.update(params, state, params)  # the gradient of w^2 / 2 is w
    return state, optax.apply_updates(params, updates)


def test_the_anchor_for_evaluation_is_found_inside_a_larger_state() -> None:
    state, tilde = _one_extrapolation_from_one()
    assert anchor_params((optax.EmptyState(), state), tilde).tolist() == [1.0]
    assert tilde.tolist() == [0.5]
    with pytest.raises(ValueError, match="holds 0 ExtrapolationState"):
        anchor_params(optax.EmptyState(), tilde)


# ---------------------------------------------------------------- issue 22


def test_the_default_lr_x_follows_the_hyperparameters_alig_runs_with() -> None:
    """Under inject_hyperparams, a max_lr changed in the state is the cap of the default
    lr_x at the next call (ALI-G's own step size, not a copy of its settings)."""
    tx = extrapolation(optax.inject_hyperparams(alig)(max_lr=0.01))
    params = jnp.array([1.0, -2.0, 0.5])
    state = tx.init(params)
    tilde, state, (_, grads) = _quadratic_step(tx, params, state)
    np.testing.assert_allclose(tilde - params, -0.01 * grads, rtol=1e-14)  # capped
    params, state, _ = _quadratic_step(tx, tilde, state)  # the update
    state.base_state.hyperparams["max_lr"] = jnp.asarray(0.002)
    tilde, state, (_, grads) = _quadratic_step(tx, params, state)
    np.testing.assert_allclose(tilde - params, -0.002 * grads, rtol=1e-14)


@pytest.mark.parametrize("mode", ["gradient", "past"])
@pytest.mark.parametrize(
    ("base", "lr_x"),
    [
        (lambda: alig(max_lr=0.5, momentum=0.9), None),
        (lambda: optax.inject_hyperparams(alig)(max_lr=0.5), None),
        (lambda: optax.chain(alig(max_lr=0.5, adjusted_momentum=True, momentum=0.9)), None),
        (lambda: optax.chain(optax.scale_by_polyak(), optax.scale(-1.0)), 0.1),  # no ALI-G
        (lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9), None),
    ],
    ids=["alig", "inject_alig", "chain_alig", "polyak", "inject_sgd"],
)
def test_one_squared_gradient_norm_per_update(
    monkeypatch: Any, mode: str, base: Any, lr_x: float | None
) -> None:
    """The wrapper computes S once and ALI-G steps with it: one sum of squares per traced
    update, where the old wrapper had ALI-G compute it again (and once more for the probe).

    Guard: where ALI-G does not take the given S (``GivenNorm.takes`` refused), it computes
    its own, and the count sees a second one.
    """
    from alig_jax import _extrapolation, _transform

    calls = []

    def counted(leaves: Any, dtype: Any) -> Any:
        calls.append(len(leaves))
        return _transform_sum_of_squares(leaves, dtype)

    _transform_sum_of_squares = _transform.sum_of_squares
    monkeypatch.setattr(_transform, "sum_of_squares", counted)
    monkeypatch.setattr(_extrapolation, "sum_of_squares", counted)
    tx = extrapolation(base(), mode=mode, lr_x=lr_x)
    params = {"a": jnp.ones(3), "b": jnp.array([[1.0, 2.0]])}
    state = tx.init(params)

    def trace() -> int:
        calls.clear()  # a new function each time: jit traces it anew
        jax.jit(lambda *args, **kwargs: tx.update(*args, **kwargs)).lower(
            params, state, params, value=1.0
        )
        return len(calls)

    assert trace() == 1
    is_alig = any(
        isinstance(s, AliGState)
        for s in jax.tree.leaves(state.base_state, is_leaf=lambda x: isinstance(x, AliGState))
    )
    if is_alig:
        monkeypatch.setattr(_transform.GivenNorm, "takes", lambda self, grads: False)
        assert trace() == 2


def test_a_base_behind_a_transformation_computes_its_own_norm() -> None:
    """ALI-G takes the wrapper's S only for the very gradients it was computed from: behind
    a clipping it steps with the norm of what it receives, as alone."""
    base = optax.chain(optax.clip_by_global_norm(0.5), alig(max_lr=10.0))
    tx = extrapolation(base, mode="past", lr_x=0.0)
    params = jnp.array([1.0, -2.0, 0.5])
    state, bare_state = tx.init(params), base.init(params)
    loss, grads = jax.value_and_grad(lambda w: 0.5 * jnp.sum(w**2))(params)
    updates, state = tx.update(grads, state, params, value=loss)
    bare_updates, bare_state = base.update(grads, bare_state, params, value=loss)
    assert bits(optax.apply_updates(params, updates)) == bits(
        optax.apply_updates(params, bare_updates)
    )
    assert bits(state.base_state) == bits(bare_state)


def test_step_size_at_is_alig_core_step_size_and_moves_nothing() -> None:
    schedule = optax.linear_schedule(0.5, 0.05, 4)
    for tx in (alig(max_lr=schedule, momentum=0.9, eps=1e-3, f_star=0.1), alig()):
        params = jnp.array([1.0, -2.0, 0.5])
        state = tx.init(params)
        for _ in range(3):
            before = bits(state)
            for loss, sq in ((1.0, 40.0), (1.0, 0.5), (jnp.nan, 1.0), (0.05, 1.0)):
                config = tx._config
                cap = config.max_lr(state.steps_taken) if callable(config.max_lr) else config.max_lr
                expected = alig_core.step_size(
                    np,
                    np.float64(loss),
                    np.float64(sq),
                    max_lr=cap,
                    eps=config.eps,
                    f_star=config.f_star,
                ).gamma
                got = tx.step_size_at(state, loss, sq)
                assert got.dtype == state.gamma.dtype
                assert float(got) == pytest.approx(float(expected), rel=1e-15, abs=0.0)
            assert bits(state) == before  # nothing moved
            loss, grads = jax.value_and_grad(lambda w: jnp.sum(w**2))(params)
            updates, state = tx.update(grads, state, params, value=loss)
            params = optax.apply_updates(params, updates)
            # The step it takes is the step size it told for its evaluation.
        sq = float(jnp.sum(jax.grad(lambda w: jnp.sum(w**2))(params) ** 2))
        told = tx.step_size_at(state, float(jnp.sum(params**2)), sq)
        loss, grads = jax.value_and_grad(lambda w: jnp.sum(w**2))(params)
        _, state = tx.update(grads, state, params, value=loss)
        assert float(state.gamma) == pytest.approx(float(told), rel=1e-14)
    injected = optax.inject_hyperparams(alig)(max_lr=0.3, eps=1e-2)
    state = injected.init(jnp.ones(2))
    inner = alig(**state.hyperparams).step_size_at(state.inner_state, 1.0, 0.5)
    assert float(inner) == pytest.approx(1.0 / (0.5 + 1e-2), rel=1e-6) or float(inner) == 0.3
    with pytest.raises(ValueError, match="needs this transformation's AliGState, got"):
        alig().step_size_at(state, 1.0, 0.5)


def test_the_deprecated_names_warn_and_still_work() -> None:
    state, tilde = _one_extrapolation_from_one()
    params = jnp.array([1.0])  # the anchor
    with pytest.warns(DeprecationWarning, match="anchor_params"):
        old = extrapolation_anchor(state, tilde)
    assert bits(old) == bits(anchor_params(state, tilde)) == bits(params)
    with pytest.warns(DeprecationWarning, match="seed="):
        by_key = extrapolation(optax.sgd(0.1), mode="noise", sigma=0.5, key=5)
    by_seed = extrapolation(optax.sgd(0.1), mode="noise", sigma=0.5, seed=5)
    assert bits(by_key.init(params)) == bits(by_seed.init(params))
    # seed=None in "noise" mode is seed 0, as in torch and Keras.
    none = extrapolation(optax.sgd(0.1), mode="noise", sigma=0.5)
    zero = extrapolation(optax.sgd(0.1), mode="noise", sigma=0.5, seed=0)
    assert bits(none.init(params)) == bits(zero.init(params))
    assert bits(none.init(params)) != bits(by_seed.init(params))


@pytest.mark.parametrize("mode", ["gradient", "past"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_after_a_skip_the_anchor_is_the_stored_one_bit_for_bit(mode: str, dtype: Any) -> None:
    """SPEC 7: the params return to the anchor; ``params + (a - p)`` can miss it by a
    rounding (a = 1e-8, p near 1), so the stored anchor is authoritative: anchor_params
    gives it bit for bit, and the next call steps from it bit for bit.

    SGD's learning rate is 0 for its first step (so that "past" mode's first update keeps
    the anchor at a and only the displacement, lr_x = 1, moves the params), then 1/8 (a
    power of two: the step from a is one rounding, however XLA fuses it).
    """
    a = jnp.array([1e-8, -3e-9], dtype)
    base = optax.sgd(lambda count: jnp.where(count >= 1, 0.125, 0.0))
    tx = extrapolation(base, mode=mode, lr_x=1.0)
    update = jax.jit(tx.update)
    state = tx.init(a)
    updates, state = update(jnp.array([-1.0, 1.0], dtype), state, a)  # w~ = a + (1, -1)
    params = optax.apply_updates(a, updates)
    assert int(state.phase) == 1
    assert bits(anchor_params(state, params)) == bits(a)
    assert np.all(np.abs(np.asarray(params)) > 0.5)
    updates, state = update(jnp.array([jnp.nan, 0.0], dtype), state, params)  # skipped
    params = optax.apply_updates(params, updates)
    done = 0 if mode == "gradient" else 1  # "past": the first call was an update
    assert (int(state.skipped), int(state.phase), int(state.iteration)) == (1, 0, done)
    assert bits(params) != bits(a)  # the case: p + (a - p) is not a
    assert bits(anchor_params(state, params)) == bits(a)
    # The next call steps from a exactly: it stores a as the anchor ("gradient": at the
    # anchor) or w_1 = a - g / 8 computed from a ("past": the update).
    g = jnp.array([0.25, -0.5], dtype)
    updates, state = update(g, state, params)
    assert int(state.phase) == 1
    if mode == "gradient":
        expected = np.asarray(a)
    else:
        expected = np.asarray(a) + np.asarray(g) * np.asarray(-0.125, np.asarray(a).dtype)
        assert int(state.iteration) == 2
    assert bits(state.anchor) == bits(expected)
    assert bits(anchor_params(state, optax.apply_updates(params, updates))) == bits(expected)


@pytest.mark.parametrize("mode", ["gradient", "past"])
def test_the_lowered_update_reduces_no_more_than_bare_alig(mode: str) -> None:
    """In the program jit compiles, the wrapper (without the linearised loss's inner
    products) makes as many reductions as ALI-G alone: S once (one per leaf), where the
    old wrapper made it twice ("past") or three times ("gradient", with its probe)."""
    params = {"a": jnp.ones(3), "b": jnp.array([[1.0, 2.0]])}

    def reductions(tx: Any) -> int:
        lowered = jax.jit(tx.update).lower(params, tx.init(params), params, value=1.0)
        return lowered.as_text().count("stablehlo.reduce")

    bare = reductions(alig(max_lr=0.5, momentum=0.9))
    assert bare == 2  # one per leaf
    wrapped = extrapolation(alig(max_lr=0.5, momentum=0.9), mode=mode, linearized=False)
    assert reductions(wrapped) == bare


def test_the_default_lr_x_of_alig_in_a_partition_is_its_step_size_on_its_part() -> None:
    """Under multi_transform (ALI-G on some leaves, the rest frozen) ALI-G computes the norm
    of its own part and says its step size with it: the default lr_x."""
    labels = {"a": "alig", "b": "frozen"}
    base = optax.multi_transform({"alig": alig(max_lr=10.0), "frozen": optax.set_to_zero()}, labels)
    tx = extrapolation(base)
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
    state = tx.init(params)
    loss, grads = jax.value_and_grad(lambda p: 0.5 * (p["a"] @ p["a"] + p["b"] @ p["b"]))(params)
    updates, state = jax.jit(tx.update)(grads, state, params, value=loss)
    gamma = float(loss) / (float(grads["a"] @ grads["a"]) + 1e-5)  # its part's S only
    np.testing.assert_allclose(updates["a"], -gamma * grads["a"], rtol=1e-12)
    np.testing.assert_allclose(updates["b"], -gamma * grads["b"], rtol=1e-12)  # lr_x moves all


def test_lr_x_none_is_refused_where_alig_steps_on_other_gradients_than_the_wrappers() -> None:
    """A clipping before ALI-G (unsafe anyway: optax guide) or an accumulation around it
    hides ALI-G's step size for the wrapper's evaluation: refused, saying to pass lr_x."""
    params = jnp.array([1.0, -2.0])
    for base in (
        optax.chain(optax.clip_by_global_norm(0.5), alig(max_lr=0.1)),
        multi_steps(alig(max_lr=0.1), 2),
    ):
        tx = extrapolation(base)
        state = tx.init(params)
        for update in (tx.update, jax.jit(tx.update)):
            with pytest.raises(ValueError, match=r"Invalid lr_x: got None.*Pass lr_x explicitly"):
                update(params, state, params, value=1.0)
        given = extrapolation(base, lr_x=0.1)
        given.update(params, given.init(params), params, value=1.0)  # an explicit lr_x works


@pytest.mark.parametrize(("mode", "lr_x"), [("past", 0.1), ("gradient", None)])
def test_inject_hyperparams_around_extrapolation_gives_the_same_numbers(
    mode: str, lr_x: float | None
) -> None:
    """optax.inject_hyperparams(extrapolation): lr_x becomes an array in the state, the
    wrapper is rebuilt on every update; the numbers are the plain wrapper's."""

    def run(tx: Any) -> list[bytes]:
        params = jnp.array([1.0, -2.0, 0.5])
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(6):
            loss, grads = jax.value_and_grad(lambda w: 0.5 * jnp.sum(w**2) + 1.0)(params)
            updates, state = update(grads, state, params, value=loss)
            params = optax.apply_updates(params, updates)
        return bits(params)

    kwargs = {"mode": mode} if lr_x is None else {"mode": mode, "lr_x": lr_x}
    plain = run(extrapolation(alig(max_lr=0.5, momentum=0.9), **kwargs))
    injected = optax.inject_hyperparams(extrapolation)(alig(max_lr=0.5, momentum=0.9), **kwargs)
    assert run(injected) == plain
