"""What optax promises of every transformation, held by alig_jax's: one table of
transformations (alig's configurations, under inject_hyperparams, scale_by_alig in a chain)
through optax's generic behaviours: jit without recompiling, empty and nested trees,
``optax.tree.map_params``, ``partition``/``multi_transform``, dtypes kept (float64, float32,
half precision, mixed), sharded parameters, ``MultiSteps``; then alig's own answers where
optax's habits meet ALI-G (docs/framework-contracts.md, "optax"): the ``momentum``
hyperparameter and the buffer, keywords of optax's aliases, a cap that goes below 0."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alig_jax import AliGState, alig, scale_by_alig


@dataclass(frozen=True)
class Transform:
    """A row: a name, how to build the transformation, and whether it keeps buffers."""

    name: str
    build: Callable[[], optax.GradientTransformationExtraArgs]
    buffers: bool


def _descent_chain() -> optax.GradientTransformationExtraArgs:
    return optax.chain(
        scale_by_alig(max_lr=0.3), optax.trace(decay=0.9, nesterov=True), optax.scale(-1.0)
    )


TRANSFORMS: tuple[Transform, ...] = (
    Transform("sgd_capped", lambda: alig(max_lr=0.3), buffers=False),
    Transform(
        "adjusted_projected",
        lambda: alig(max_lr=0.3, momentum=0.9, adjusted_momentum=True, max_norm=10.0),
        buffers=True,
    ),
    Transform(
        "scheduled_cap",
        lambda: alig(max_lr=optax.linear_schedule(0.3, 0.01, 20), momentum=0.5),
        buffers=True,
    ),
    Transform(
        "injected_default",
        lambda: optax.inject_hyperparams(alig)(max_lr=0.3),
        buffers=False,
    ),
    Transform(
        "injected_momentum",
        lambda: optax.inject_hyperparams(alig)(max_lr=0.3, momentum=0.9, max_norm=10.0),
        buffers=True,
    ),
    Transform("scale_by_alig_chain", _descent_chain, buffers=True),
)
ROWS = [pytest.param(t, id=t.name) for t in TRANSFORMS]


def _nested_params(dtype: Any = jnp.float64) -> dict[str, Any]:
    return {
        "dense": {
            "kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]], dtype),
            "bias": jnp.zeros(2, dtype),
        },
        "stack": [jnp.array([0.25, -1.5, 2.0], dtype), (jnp.array(0.75, dtype),)],
    }


def _loss(params: Any) -> jax.Array:
    leaves = [x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in jax.tree.leaves(params)]
    return sum(jnp.sum((x - 0.1 * i) ** 2) for i, x in enumerate(leaves))


def _run(tx: optax.GradientTransformation, params: Any, steps: int, update: Any = None) -> Any:
    state = tx.init(params)
    update = update or jax.jit(tx.update)
    for _ in range(steps):
        loss, grads = jax.value_and_grad(_loss)(params)
        updates, state = update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
    return params, state


def _alig_state(state: Any) -> AliGState:
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, AliGState))
        if isinstance(s, AliGState)
    ]
    assert len(found) == 1
    return found[0]


def _same_bits(a: Any, b: Any) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(
        x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in pairs
    )


# ---------------------------------------------------------------- jit, trees, map_params


@pytest.mark.parametrize("row", ROWS)
def test_jit_traces_the_update_once_for_a_run(row: Transform) -> None:
    """New losses, gradients, states and schedule values: one trace, one compilation."""
    tx = row.build()
    traces = []

    def update(grads: Any, state: Any, params: Any, value: Any) -> Any:
        traces.append(1)
        return tx.update(grads, state, params, value=value)

    _, state = _run(tx, _nested_params(), 4, update=jax.jit(update))
    assert len(traces) == 1
    assert int(_alig_state(state).steps_taken) == 4


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("empty", [{}, {"a": {}, "b": ()}], ids=["dict", "nested"])
def test_an_empty_tree_has_a_state_and_steps_move_nothing(row: Transform, empty: Any) -> None:
    """As optax.sgd: init of a tree without arrays is a state, and update (jitted) gives
    the empty tree back."""
    tx = row.build()
    state = tx.init(empty)
    updates, new_state = jax.jit(tx.update)(empty, state, empty, value=1.0)
    assert jax.tree.structure(updates) == jax.tree.structure(empty)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.parametrize("row", ROWS)
def test_a_nested_tree_steps_as_its_flat_list_of_leaves(row: Transform) -> None:
    nested = _nested_params()
    flat, treedef = jax.tree.flatten(nested)
    stepped_nested, _ = _run(row.build(), nested, 5)
    stepped_flat, _ = _run(row.build(), flat, 5)
    assert _same_bits(jax.tree.leaves(stepped_nested), stepped_flat)
    assert jax.tree.structure(stepped_nested) == treedef


@pytest.mark.parametrize("row", ROWS)
def test_map_params_reaches_every_params_shaped_leaf(row: Transform) -> None:
    """optax.tree.map_params (it calls init on a placeholder without arrays)."""
    tx = row.build()
    params = _nested_params()
    _, state = _run(tx, params, 2)
    halved = optax.tree.map_params(tx, lambda x: x.astype(jnp.float16), state)
    buffers = _alig_state(halved).momentum_buffer
    traces = [
        s.trace
        for s in jax.tree.leaves(halved, is_leaf=lambda x: isinstance(x, optax.TraceState))
        if isinstance(s, optax.TraceState)
    ]  # scale_by_alig's chain keeps its buffers in optax.trace's state
    mapped = buffers if buffers is not None else next(iter(traces), None)
    if row.buffers:
        assert jax.tree.structure(mapped) == jax.tree.structure(params)
        assert {x.dtype for x in jax.tree.leaves(mapped)} == {jnp.dtype(jnp.float16)}
    else:
        assert mapped is None
    records = _alig_state(halved)
    assert records.gamma.dtype == jnp.float64  # a scalar record is not params-shaped
    assert int(records.steps_taken) == 2


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("combinator", ["partition", "multi_transform"])
def test_a_partition_whose_alig_label_has_no_parameters(row: Transform, combinator: str) -> None:
    """Every parameter labelled for optax.sgd: alig's label gets an empty tree, and the
    run is optax.sgd's on all of them, bit for bit."""
    params = _nested_params()
    labels = jax.tree.map(lambda _: "sgd", params)
    make = optax.partition if combinator == "partition" else optax.multi_transform
    tx = make({"alig": row.build(), "sgd": optax.sgd(0.05)}, labels)
    stepped, _ = _run(tx, params, 3)
    alone, _ = _run(optax.with_extra_args_support(optax.sgd(0.05)), params, 3)
    assert _same_bits(stepped, alone)


# ---------------------------------------------------------------- dtypes


DTYPE_MIXES = {
    "float64": ("float64", "float64"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "float32_and_float16": ("float32", "float16"),
    "float32_and_float64": ("float32", "float64"),
}


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("dtypes", list(DTYPE_MIXES.values()), ids=list(DTYPE_MIXES))
def test_dtypes_are_kept(row: Transform, dtypes: tuple[str, str]) -> None:
    """Updates and buffers in each parameter's dtype; the records in the accumulation dtype
    (float64 when any parameter is float64, float32 otherwise)."""
    params = {
        "a": jnp.array([1.0, -2.0, 0.5], dtypes[0]),
        "b": jnp.array([[0.25, 3.0]], dtypes[1]),
    }
    tx = row.build()
    state = tx.init(params)
    loss, grads = jax.value_and_grad(_loss)(params)
    updates, state = jax.jit(tx.update)(grads, state, params, value=loss)
    assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
    records = _alig_state(state)
    expected = jnp.float64 if "float64" in dtypes else jnp.float32
    assert records.gamma.dtype == expected
    assert records.gamma_hat.dtype == expected
    if records.momentum_buffer is not None:
        kept = jax.tree.map(lambda b: b.dtype, records.momentum_buffer)
        assert kept == jax.tree.map(lambda p: p.dtype, params)
    assert bool(jnp.isfinite(records.gamma))
    assert float(records.gamma) > 0


# ---------------------------------------------------------------- sharding, MultiSteps


@pytest.mark.parametrize("row", ROWS)
def test_sharded_parameters_keep_their_sharding_and_the_numbers(row: Transform) -> None:
    """A parameter split over two devices: its updates and buffers keep that sharding, and
    the run is the single-device run's (up to the order of the sums)."""
    assert jax.device_count() >= 2, "XLA_FLAGS must give 2 host devices (tests/jax/conftest.py)"
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    split = NamedSharding(mesh, P("model"))
    params = {"w": jnp.linspace(-1.0, 1.0, 8), "b": jnp.array([0.5, -0.25])}
    sharded = {"w": jax.device_put(params["w"], split), "b": params["b"]}
    tx = row.build()
    stepped, state = _run(tx, sharded, 4)
    reference, _ = _run(tx, params, 4)
    assert stepped["w"].sharding.is_equivalent_to(split, 1)
    buffers = _alig_state(state).momentum_buffer
    if buffers is not None:
        assert buffers["w"].sharding.is_equivalent_to(split, 1)
    for name in params:
        np.testing.assert_allclose(stepped[name], reference[name], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("row", ROWS)
def test_optax_multi_steps_wraps_it_under_jit(row: Transform) -> None:
    """optax.MultiSteps (the state, the forwarding of value=, jit); the loss it hands over
    is the last micro-batch's (alig_jax.multi_steps is the one that averages it:
    test_jax_accumulation_and_wrappers.py). With one micro-batch, the plain run bit for bit."""
    params = _nested_params()
    wrapped, _ = _run(optax.MultiSteps(row.build(), every_k_schedule=1), params, 2)
    plain, _ = _run(row.build(), params, 2)
    assert _same_bits(wrapped, plain)
    _, state = _run(optax.MultiSteps(row.build(), every_k_schedule=2), params, 4)
    assert int(_alig_state(state).steps_taken) == 2


# ---------------------------------------------------------------- inject_hyperparams


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_inject_hyperparams_has_the_plain_state_and_numbers(momentum: float | None) -> None:
    """Same state structure (no buffers without momentum) and the same bits."""
    kwargs = {"max_lr": 0.3, "max_norm": 10.0} | (
        {} if momentum is None else {"momentum": momentum}
    )
    params = _nested_params()
    plain_params, plain_state = _run(alig(**kwargs), params, 6)
    injected_params, injected_state = _run(optax.inject_hyperparams(alig)(**kwargs), params, 6)
    assert jax.tree.structure(injected_state.inner_state) == jax.tree.structure(plain_state)
    assert _same_bits(injected_params, plain_params)
    assert _same_bits(injected_state.inner_state, plain_state)


def test_tree_get_and_set_reach_the_hyperparameters_only() -> None:
    """optax.tree.get(state, "momentum") is the hyperparameter (the buffer is
    ``momentum_buffer``); set changes the steps that follow, under jit."""
    params = _nested_params()
    tx = optax.inject_hyperparams(alig)(max_lr=0.3, momentum=0.9)
    state = tx.init(params)
    assert float(optax.tree.get(state, "momentum")) == 0.9
    assert float(optax.tree.get(state, "max_lr")) == 0.3
    state = optax.tree.set(state, momentum=0.5, max_lr=0.05)
    update = jax.jit(tx.update)
    for _ in range(4):
        loss, grads = jax.value_and_grad(_loss)(params)
        updates, state = update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
    expected, _ = _run(alig(max_lr=0.05, momentum=0.5), _nested_params(), 4)
    assert _same_bits(params, expected)
    assert float(optax.tree.get(state, "momentum")) == 0.5


def test_without_momentum_the_injected_state_has_no_momentum_to_set() -> None:
    """No buffers, so nothing to change: setting it is optax's KeyError, not a silent no-op."""
    state = optax.inject_hyperparams(alig)(max_lr=0.3).init(_nested_params())
    assert optax.tree.get(state, "momentum", "absent") == "absent"
    with pytest.raises(KeyError, match="momentum"):
        optax.tree.set(state, momentum=0.9)


def test_an_injected_zero_momentum_keeps_buffers_to_change_later() -> None:
    """A momentum given to inject_hyperparams may change, so it keeps buffers even at 0
    (as optax.sgd's); its numbers are those without momentum."""
    params = _nested_params()
    injected_params, state = _run(
        optax.inject_hyperparams(alig)(max_lr=0.3, momentum=0.0), params, 5
    )
    assert state.inner_state.momentum_buffer is not None
    plain_params, plain_state = _run(alig(max_lr=0.3, momentum=0.0), params, 5)
    assert plain_state.momentum_buffer is None
    for a, b in zip(jax.tree.leaves(injected_params), jax.tree.leaves(plain_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("momentum", [None, 0, 0.0])
def test_momentum_none_is_no_momentum(momentum: float | None) -> None:
    """``None`` (the default, as optax.sgd's) and a Python 0: no buffers, the same bits."""
    params = _nested_params()
    stepped, state = _run(alig(max_lr=0.3, momentum=momentum), params, 5)
    default, default_state = _run(alig(max_lr=0.3), params, 5)
    assert state.momentum_buffer is None
    assert _same_bits(stepped, default)
    assert _same_bits(state, default_state)


# ---------------------------------------------------------------- optax's keywords


@pytest.mark.parametrize(
    ("factory", "kwargs", "words"),
    [
        (alig, {"learning_rate": 0.1}, ("learning_rate=0.1", "max_lr=", "alig(max_lr=0.1)")),
        (alig, {"lr": 0.1}, ("lr=0.1", "max_lr=")),
        (alig, {"nesterov": True}, ("nesterov=True", "Nesterov's already", "adjusted_momentum")),
        (alig, {"weight_decay": 1e-4}, ("weight_decay=0.0001", "max_norm", "project_onto_ball")),
        (alig, {"max_lr": 0.1, "mxa_norm": 1.0}, ("mxa_norm=1.0", "It takes max_lr, momentum")),
        (scale_by_alig, {"learning_rate": 0.1}, ("learning_rate=0.1", "max_lr=")),
        (scale_by_alig, {"momentum": 0.9}, ("momentum=0.9", "optax.trace(decay=momentum")),
        (scale_by_alig, {"max_norm": 1.0}, ("max_norm=1.0", "alig(max_lr, max_norm")),
        (scale_by_alig, {"adjusted_momentum": True}, ("adjusted_momentum=True", "alig(")),
    ],
    ids=lambda x: x.__name__ if callable(x) else "-".join(x) if isinstance(x, dict) else "message",
)
def test_keywords_of_optax_aliases_are_a_value_error_that_names_the_fix(
    factory: Callable[..., Any], kwargs: dict[str, Any], words: tuple[str, ...]
) -> None:
    """Never Python's bare TypeError: what was given and what to pass instead, when built
    directly and when built by inject_hyperparams (at init, when it builds alig)."""
    with pytest.raises(ValueError, match=words[0]) as direct:
        factory(**kwargs)
    with pytest.raises(ValueError, match=words[0]) as injected:
        optax.inject_hyperparams(factory)(**kwargs).init(_nested_params())
    for error in (direct, injected):
        for word in words:
            assert word in str(error.value)


# ---------------------------------------------------------------- scale_by_alig


def test_scale_by_alig_keeps_the_sign_and_scales_by_gamma() -> None:
    """optax's scale_by_* habit (as scale_by_polyak): gamma * u, to be negated later."""
    params = jnp.array([1.0, -2.0])
    grads = jnp.array([2.0, -4.0])  # squared norm 20; loss 1: gamma_hat = 1 / (20 + eps)
    tx = scale_by_alig(max_lr=None, eps=0.0)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params, value=1.0)
    assert float(state.gamma) == 1.0 / 20.0
    np.testing.assert_array_equal(updates, state.gamma * grads)


def test_scale_by_alig_chained_with_trace_is_alig_with_momentum() -> None:
    """chain(scale_by_alig, trace(mu, nesterov=True), scale(-1)) is alig(momentum=mu) in
    its default convention, up to rounding."""
    params = _nested_params()
    chained, state = _run(_descent_chain(), params, 8)
    plain, plain_state = _run(alig(max_lr=0.3, momentum=0.9), params, 8)
    for a, b in zip(jax.tree.leaves(chained), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
    assert float(state[0].gamma) == float(plain_state.gamma)


def test_a_skipped_scale_by_alig_step_gives_zero_updates() -> None:
    params = jnp.array([1.0, -2.0])
    tx = scale_by_alig(max_lr=0.3)
    state = tx.init(params)
    updates, new_state = tx.update(jnp.array([1.0, 1.0]), state, params, value=jnp.nan)
    assert _same_bits(optax.apply_updates(params, updates), params)
    assert int(new_state.steps_skipped) == 1
    assert int(new_state.steps_taken) == 0


# ---------------------------------------------------------------- a cap below 0


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("row", ["sgd", "projected"])
def test_a_cap_schedule_below_zero_never_steps_uphill(jit: bool, row: str) -> None:
    """A schedule that reaches -0.1: no ascent step (gamma is 0 and the parameters stay, bit
    for bit); the record says the cap was hit. An adapter under jit cannot raise on a
    traced value, so this is the whole contract in optax."""
    extra = {"max_norm": 100.0} if row == "projected" else {}
    params = _nested_params()
    for cap in (optax.constant_schedule(-0.1), optax.linear_schedule(-0.1, -0.2, 5)):
        tx = alig(max_lr=cap, **extra)
        stepped, state = _run(tx, params, 3, update=jax.jit(tx.update) if jit else tx.update)
        assert _same_bits(stepped, params)
        assert float(state.gamma) == 0.0
        assert bool(state.capped)
        assert int(state.steps_taken) == 3


def test_a_cap_schedule_that_crosses_zero_stops_the_descent_there() -> None:
    """From 0.05 down to -0.05 over 10 steps: the loss goes down while the cap is positive,
    and from the step where the cap is <= 0 the parameters do not move."""
    tx = alig(max_lr=optax.linear_schedule(0.05, -0.05, 10))
    params = _nested_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    losses = []
    for t in range(14):
        loss, grads = jax.value_and_grad(_loss)(params)
        losses.append(float(loss))
        updates, state = update(grads, state, params, value=loss)
        moved = optax.apply_updates(params, updates)
        if t >= 5:  # cap 0.05 - 0.01 t <= 0
            assert _same_bits(moved, params), t
            assert float(state.gamma) == 0.0
        params = moved
    assert losses[5] < losses[0]
    assert all(a >= b for a, b in itertools.pairwise(losses))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_the_capped_record_at_a_cap_of_zero_and_at_gamma_hat_equal_to_the_cap(jit: bool) -> None:
    """loss 1 and squared norm 4 (eps 0): gamma_hat is 0.25. A cap of exactly 0 (only a
    schedule can give it: max_lr=0 is refused) is hit, gamma 0; a cap of exactly 0.25 is
    hit, gamma 0.25; a cap above it is not hit."""
    params = jnp.array([1.0])
    grads = jnp.array([2.0])
    for cap, gamma, capped in (
        (optax.constant_schedule(0.0), 0.0, True),
        (0.25, 0.25, True),
        (optax.constant_schedule(0.25), 0.25, True),
        (0.5, 0.25, False),
    ):
        tx = alig(max_lr=cap, eps=0.0)
        update = jax.jit(tx.update) if jit else tx.update
        updates, state = update(grads, tx.init(params), params, value=1.0)
        assert float(state.gamma_hat) == 0.25
        assert float(state.gamma) == gamma
        assert bool(state.capped) is capped
        assert float(optax.apply_updates(params, updates)[0]) == 1.0 - 2.0 * gamma


def test_with_momentum_a_cap_below_zero_leaves_only_the_coast() -> None:
    """The paper's momentum keeps coasting when the cap goes below 0 (a departure listed in
    docs/framework-contracts.md): gamma is 0, so the buffer only decays (b <- mu b) and the
    update is mu * b, no gradient term."""
    mu = 0.5
    cap = lambda count: jnp.where(count < 2, 0.1, -0.1)  # noqa: E731 (a schedule)
    tx = alig(max_lr=cap, momentum=mu)
    params, state = _run(tx, _nested_params(), 2)  # two steps under the cap 0.1
    assert float(state.gamma) > 0.0
    loss, grads = jax.value_and_grad(_loss)(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params, value=loss)
    assert float(new_state.gamma) == 0.0
    coasted = jax.tree.map(lambda b: mu * b, state.momentum_buffer)
    assert _same_bits(new_state.momentum_buffer, coasted)
    assert _same_bits(updates, jax.tree.map(lambda b: mu * b, coasted))
