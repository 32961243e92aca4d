"""The extrapolation math of alig_core, driven by NumPy, against the oracle and the SPEC.

``NumpyExtrapolation`` is a minimal adapter of :func:`alig_core._extrapolation.extrapolation_step`
around two functional NumPy bases (ALI-G from alig_core's step functions; SGD with Nesterov
momentum in torch's convention, standing in for a framework's own SGD). Its alternating
form gives the phase as an array, so the core computes both phases and selects (as a
compiled optax or Keras update does); its same-batch form gives the phase as a Python int
and the skip flag on the host, so the core branches (as torch's eager ``step(closure)``
does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from alig_cases import max_relative_deviation
from alig_core import AliGConfig, ExtrapolationConfig, step_size
from alig_core._extrapolation import (
    ArrayLists,
    ExtrapolationCall,
    ExtrapolationState,
    current_anchor,
    extrapolation_step,
    initial_extrapolation_state,
)
from alig_core._math import (
    keep_if_skipped,
    momentum_coefficients,
    momentum_update,
    projection_scale,
    sgd_update,
)
from alig_core.oracle_extrapolation import (
    OracleCallRecord,
    SGDNesterov,
    run_extrapolation_oracle,
)
from extrapolation_cases import (
    CASES,
    ITERATIONS,
    ExtrapolationCase,
    Problem,
    every_mode_base_and_form,
    initial_params,
    make_noise,
    run_case_oracle,
    zero_displacement,
)
from worker_scripts import modules_loaded_by

TOL = 1e-10
Params = tuple[np.ndarray, ...]
Evaluate = Callable[[Sequence[np.ndarray], int], tuple[float, list[np.ndarray | None]]]


# ---------------------------------------------------------------- the NumPy bases


class AliGBase:
    """ALI-G as a functional base, from alig_core's step functions; state (buffers, gamma)."""

    takes_loss = True

    def __init__(self, config: AliGConfig) -> None:
        self.c = config

    def init(self, params: Params) -> Any:
        return (tuple(np.zeros_like(p) for p in params), np.float64(0.0))

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        c = self.c
        return step_size(np, loss, sq_grad_norm, max_lr=c.max_lr, eps=c.eps, f_star=c.f_star).gamma

    def step_size_taken(self, state: Any) -> Any:
        return state[1]  # the gamma of the update just taken

    def step(
        self, params: Params, grads: Sequence[Any], loss: Any, state: Any, sq: Any = None
    ) -> Any:
        c, (buffers, old_gamma) = self.c, state
        present = [i for i, g in enumerate(grads) if g is not None]
        if sq is None:  # a bare ALI-G computes S; the wrapper hands it over
            sq = sum((np.sum(np.square(grads[i])) for i in present), np.float64(0.0))
        size = step_size(np, loss, sq, max_lr=c.max_lr, eps=c.eps, f_star=c.f_star)
        coefficients = momentum_coefficients(
            size.gamma, momentum=c.momentum, adjusted_momentum=c.adjusted_momentum
        )
        new_params, new_buffers = list(params), list(buffers)
        for i in present:
            if c.momentum == 0:
                new = sgd_update(params[i], grads[i], size.gamma)
            else:
                new, buffer = momentum_update(params[i], grads[i], buffers[i], coefficients)
                new_buffers[i] = keep_if_skipped(np, size.skipped, buffers[i], buffer)
            new_params[i] = keep_if_skipped(np, size.skipped, params[i], new)
        if c.max_norm is not None:
            scale = projection_scale(np, sum(np.sum(p * p) for p in new_params), c.max_norm)
            new_params = [keep_if_skipped(np, size.skipped, p, p * scale) for p in new_params]
        gamma = keep_if_skipped(np, size.skipped, old_gamma, size.gamma)
        return tuple(new_params), (tuple(new_buffers), gamma)

    def buffers(self, state: Any) -> Params:
        return state[0]


class SGDNesterovBase:
    """torch.optim.SGD(nesterov=True) in NumPy: b <- mu*b + g; p <- p - lr*(g + mu*b)."""

    takes_loss = False

    def __init__(self, config: SGDNesterov) -> None:
        self.lr, self.mu = config.lr, config.momentum

    def init(self, params: Params) -> Any:
        return (tuple(np.zeros_like(p) for p in params),)

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        return self.lr

    def step_size_taken(self, state: Any) -> Any:
        return self.lr

    def step(
        self, params: Params, grads: Sequence[Any], loss: Any, state: Any, sq: Any = None
    ) -> Any:
        new_params, new_buffers = list(params), list(state[0])
        for i, g in enumerate(grads):
            if g is None:
                continue
            new_buffers[i] = self.mu * state[0][i] + g
            new_params[i] = params[i] - self.lr * (g + self.mu * new_buffers[i])
        return tuple(new_params), (tuple(new_buffers),)

    def buffers(self, state: Any) -> Params:
        return state[0]


def make_base(config: SGDNesterov | AliGConfig) -> AliGBase | SGDNesterovBase:
    return AliGBase(config) if isinstance(config, AliGConfig) else SGDNesterovBase(config)


def tree_where(condition: Any, if_true: Any, if_false: Any) -> Any:
    if isinstance(if_true, tuple):
        return tuple(tree_where(condition, a, b) for a, b in zip(if_true, if_false, strict=True))
    return np.where(condition, if_true, if_false)


class BaseCall:
    """One call's :class:`alig_core._extrapolation.ExtrapolationBase`: a functional base, the
    call's gradients and the base's state; it keeps the state the base's step made."""

    def __init__(self, base: AliGBase | SGDNesterovBase, grads: Sequence[Any], state: Any) -> None:
        self.base, self.grads, self.state = base, grads, state
        self.takes_loss = base.takes_loss
        self.stepped_state: Any = state
        self.runs: list[tuple[Any, Any]] = []  # (loss, S) of every run
        self.step_size_queries: list[tuple[Any, Any]] = []

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        self.step_size_queries.append((loss, sq_grad_norm))
        return self.base.step_size_at(loss, sq_grad_norm)

    def run(self, anchor: Params, loss: Any, sq_grad_norm: Any, skipped: Any) -> Any:
        self.runs.append((loss, sq_grad_norm))
        with np.errstate(all="ignore"):
            params, self.stepped_state = self.base.step(
                anchor, self.grads, loss, self.state, sq_grad_norm
            )
        return params, self.base.step_size_taken(self.stepped_state)


class HostLists(ArrayLists):
    """An eager adapter's list operations: the skip flag decided on the host (torch's way)."""

    def decide(self, flag: Any, loss: Any) -> Any:
        return bool(flag)


# ---------------------------------------------------------------- the NumPy adapter


class NumpyExtrapolation:
    """The extrapolation wrapper around a functional NumPy base, one extrapolation_step a call."""

    def __init__(
        self,
        params: Sequence[np.ndarray],
        config: ExtrapolationConfig,
        base: AliGBase | SGDNesterovBase,
        call_form: str,
        noise: Callable[[int], list[np.ndarray]] | None = None,
    ) -> None:
        self.params: Params = tuple(np.array(p, dtype=np.float64) for p in params)
        self.config, self.base, self.call_form, self.noise = config, base, call_form, noise
        # the same-batch form is eager (Python counters, host branches); the alternating one
        # is compiled (array counters, selected with where)
        zero: Any = 0 if call_form == "same_batch" else np.zeros((), np.int32)
        self.state = initial_extrapolation_state([p.copy() for p in self.params], zero)
        self.base_state = base.init(self.params)
        self.kinds: list[str] = []  # "anchor" / "update", one per evaluation made

    def call(self, evaluate: Evaluate, batch: int) -> None:
        with np.errstate(all="ignore"):  # NaN/inf on skipped iterations
            if self.config.mode == "gradient" and self.call_form == "same_batch":
                self._same_batch(evaluate, batch)
            else:
                self._one(evaluate, batch)

    @property
    def anchor(self) -> Params:
        return tuple(
            current_anchor(np, self.state.phase, a, p)
            for a, p in zip(self.state.anchor, self.params, strict=True)
        )

    def _eval(self, evaluate: Evaluate, batch: int) -> tuple[Any, tuple[Any, ...], Any]:
        loss, grads = evaluate(list(self.params), batch)
        grads = tuple(None if g is None else np.asarray(g, dtype=np.float64) for g in grads)
        sq = sum((np.sum(np.square(g)) for g in grads if g is not None), np.float64(0.0))
        return np.float64(loss), grads, sq

    def _step(self, loss: Any, grads: Any, sq: Any) -> ExtrapolationCall:
        updates = self.config.mode != "gradient" or bool(self.state.phase)
        self.kinds.append("update" if updates else "anchor")
        base = BaseCall(self.base, grads, self.base_state)
        eager = self.call_form == "same_batch"
        call = extrapolation_step(
            np,
            self.config,
            self.state,
            self.params,
            grads,
            loss=loss,
            sq_grad_norm=sq,
            base=base,
            noise=self.noise,
            lists=HostLists(np) if eager else None,
        )
        if eager:  # the base ran only where the call updates and does not skip
            assert len(base.runs) == int(updates and not bool(call.skipped))
        else:  # compiled: both phases computed, the base ran once, selected after
            assert len(base.runs) == 1
        self.params, self.state = call.params, call.state
        self.base_state = tree_where(call.base_stepped, base.stepped_state, self.base_state)
        return call

    def _one(self, evaluate: Evaluate, batch: int) -> None:
        self._step(*self._eval(evaluate, batch))

    def _same_batch(self, evaluate: Evaluate, batch: int) -> None:
        """The closure form: at the anchor, then (unless skipped) at w~ on the same batch."""
        call = self._step(*self._eval(evaluate, batch))
        if bool(call.skipped):
            return
        self._step(*self._eval(evaluate, batch))


def run_generic(
    case: ExtrapolationCase,
    problem: Problem,
    config: ExtrapolationConfig | None = None,
    calls: int | None = None,
) -> tuple[NumpyExtrapolation, list[dict[str, Any]]]:
    """Runs the NumPy adapter on ``case``; returns it and a snapshot after every call."""
    adapter = NumpyExtrapolation(
        initial_params(),
        config if config is not None else case.config,
        make_base(case.base_config),
        case.call_form,
        make_noise(),
    )
    snapshots = []
    for batch in range(calls if calls is not None else case.calls):
        adapter.call(problem.evaluate, batch)
        snapshots.append(snapshot(adapter))
    return adapter, snapshots


def snapshot(adapter: NumpyExtrapolation) -> dict[str, Any]:
    return {
        "params": [p.copy() for p in adapter.params],
        "anchor": [p.copy() for p in adapter.anchor],
        "stored_anchor": [p.copy() for p in adapter.state.anchor],
        "phase": int(adapter.state.phase),
        "iteration": int(adapter.state.iteration),
        "skipped": int(adapter.state.skipped),
        "base_state": adapter.base_state,
    }


def flat(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, tuple):
        return [leaf for item in tree for leaf in flat(item)]
    return [np.asarray(tree)]


def bits(arrays: Sequence[Any]) -> list[bytes]:
    return [np.asarray(a).tobytes() for a in arrays]


def oracle_buffers(record: OracleCallRecord) -> list[np.ndarray]:
    buffers = record.alig_state.buffers if record.alig_state is not None else record.sgd_buffers
    return [
        np.zeros_like(a) if b is None else b for b, a in zip(buffers, record.anchor, strict=True)
    ]


# ---------------------------------------------------------------- generic == oracle


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_generic_functions_equal_the_oracle_over_100_iterations(case: ExtrapolationCase) -> None:
    with np.errstate(all="ignore"):
        records = run_case_oracle(case)
    problem = Problem()
    adapter, snapshots = run_generic(case, problem)
    worst = 0.0
    for record, snap in zip(records, snapshots, strict=True):
        assert snap["phase"] == int(record.extrapolated)
        assert (snap["iteration"], snap["skipped"]) == (record.iterations, record.skipped)
        worst = max(
            worst,
            max_relative_deviation(snap["params"], record.params),
            max_relative_deviation(snap["anchor"], record.anchor),
            max_relative_deviation(
                adapter.base.buffers(snap["base_state"]), oracle_buffers(record)
            ),
        )
        if case.is_alig:
            assert float(snap["base_state"][1]) == pytest.approx(
                record.alig_state.gamma, rel=TOL, abs=TOL
            )
    assert problem.evaluations == records[-1].evaluations
    assert worst <= TOL, f"{case.name}: deviation {worst:.3g}"
    # The run is a real test: iterations taken and skipped, the extrapolation moved w~ off w,
    # and ALI-G's gamma moved (neither pinned at the cap nor at 0).
    last = records[-1]
    assert last.iterations >= 0.7 * ITERATIONS
    assert last.skipped >= 5
    assert any(  # the parameters held w~ away from w, or (same batch) a displacement was made
        (r.extrapolated and max_relative_deviation(r.params, r.anchor) > 1e-3)
        or (r.lr_x is not None and r.lr_x > 1e-2)
        for r in records
    )
    if case.is_alig:
        gammas = {r.alig_state.gamma for r in records}
        moving = [r for r in records if not r.alig_state.capped and r.alig_state.gamma > 0]
        assert len(gammas) > 10
        assert len(moving) > 10


@pytest.mark.parametrize(
    ("case", "other"),
    [
        (0, {"linearized": False}),  # the correction is visible
        (0, {"lr_x": 0.05}),  # so is lr_x
    ],
)
def test_a_perturbed_configuration_is_detected(case: int, other: dict[str, Any]) -> None:
    """Guard: the comparison above can fail."""
    alig = [c for c in CASES if c.is_alig and c.mode == "gradient" and not c.label][case]
    with np.errstate(all="ignore"):
        expected = run_case_oracle(alig)[-1].anchor
    options = {"mode": alig.mode, "lr_x": alig.lr_x, "linearized": alig.linearized} | other
    adapter, _ = run_generic(alig, Problem(), config=ExtrapolationConfig(**options))
    assert max_relative_deviation(adapter.anchor, expected) > 1e-3


def test_the_alternating_and_same_batch_forms_differ_in_gradient_mode_only() -> None:
    def final(mode: str, form: str) -> list[np.ndarray]:
        case = ExtrapolationCase(
            mode, "alig_standard", form, sigma=0.05 if mode == "noise" else None
        )
        with np.errstate(all="ignore"):
            return run_case_oracle(case)[ITERATIONS - 1].anchor

    assert (
        max_relative_deviation(final("gradient", "alternating"), final("gradient", "same_batch"))
        > 1e-3
    )
    for mode in ("past", "noise"):
        a, b = final(mode, "alternating"), final(mode, "same_batch")
        assert bits(a) == bits(b)


# ---------------------------------------------------------------- d = 0 is the base


class Recorder:
    """Wraps ``Problem.evaluate``: logs (call, point, loss, grads) of every evaluation."""

    def __init__(self, problem: Problem) -> None:
        self.problem, self.call, self.log = problem, -1, []

    def evaluate(self, point: Sequence[Any], batch: int) -> tuple[float, list[Any]]:
        loss, grads = self.problem.evaluate(point, batch)
        self.log.append((self.call, [np.array(p) for p in point], loss, grads))
        return loss, grads


@every_mode_base_and_form
def test_zero_displacement_equals_the_base_bit_for_bit(
    mode: str, base: str, call_form: str
) -> None:
    """lr_x = 0 or sigma = 0: the wrapper is its base, stepped on its update evaluations.

    SGD has no skip rule of its own, so it runs without non-finite events; ALI-G runs with
    them (the wrapper skips where ALI-G itself would, and leaves ALI-G untouched).
    """
    case = ExtrapolationCase(mode, base, call_form)
    recorder = Recorder(Problem(finite=not case.is_alig))
    adapter = NumpyExtrapolation(
        initial_params(),
        zero_displacement(mode),
        make_base(case.base_config),
        call_form,
        make_noise(),
    )
    bare = make_base(case.base_config)
    params = tuple(np.array(p, dtype=np.float64) for p in initial_params())
    state = bare.init(params)
    for call in range(case.calls):
        recorder.call = call
        adapter.call(recorder.evaluate, call)
        for (made_in, point, loss, grads), kind in zip(recorder.log, adapter.kinds, strict=True):
            if made_in != call or kind != "update":
                continue
            assert bits(point) == bits(params)  # with d = 0 every evaluation is at w_t
            with np.errstate(all="ignore"):
                params, state = bare.step(params, grads, np.float64(loss), state)
        assert bits(adapter.params) == bits(params)
        assert bits(adapter.anchor) == bits(params)
        assert bits(flat(adapter.base_state)) == bits(flat(state))
    assert int(adapter.state.iteration) >= 0.7 * ITERATIONS
    assert adapter.kinds.count("update") >= 0.7 * ITERATIONS
    if case.is_alig:
        assert int(adapter.state.skipped) >= 5


# ---------------------------------------------------------------- skipped iterations


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_skipped_iterations_leave_everything_bit_for_bit(case: ExtrapolationCase) -> None:
    """SPEC 7: anchor, buffers, base state and counters as they were; parameters at the anchor."""
    problem = Problem()
    adapter = NumpyExtrapolation(
        initial_params(), case.config, make_base(case.base_config), case.call_form, make_noise()
    )
    skipped_at = {"anchor": 0, "update": 0}
    for batch in range(case.calls):
        before = snapshot(adapter)
        made = len(adapter.kinds)
        adapter.call(problem.evaluate, batch)
        after = snapshot(adapter)
        if after["skipped"] == before["skipped"]:
            continue
        assert after["skipped"] == before["skipped"] + 1
        assert bits(after["params"]) == bits(before["anchor"])  # back at the anchor
        assert bits(after["anchor"]) == bits(before["anchor"])
        if before["phase"] == 1:  # the stored anchor was in use: kept bit for bit
            assert bits(after["stored_anchor"]) == bits(before["stored_anchor"])
        assert bits(flat(after["base_state"])) == bits(flat(before["base_state"]))
        assert after["iteration"] == before["iteration"]
        assert after["phase"] == 0
        skipped_at[adapter.kinds[-1] if len(adapter.kinds) > made else "?"] += 1
    assert skipped_at["update"] >= 3
    if case.mode == "gradient":  # non-finite values at the anchor skip too
        assert skipped_at["anchor"] >= 3


# ---------------------------------------------------------------- the linearised step


class LossRecorder:
    """A base that records the loss and ``S`` it is run with, and does not move."""

    takes_loss = True

    def __init__(self) -> None:
        self.runs: list[tuple[Any, Any]] = []

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        return 0.0

    def run(self, anchor: Params, loss: Any, sq_grad_norm: Any, skipped: Any) -> Any:
        self.runs.append((loss, sq_grad_norm))
        return anchor, 0.0


def one_call(
    config: ExtrapolationConfig,
    state: ExtrapolationState,
    params: Params,
    base: Any,
    *,
    loss: float = 1.0,
    lists: ArrayLists | None = None,
) -> ExtrapolationCall:
    """One call with the gradient 1 per entry, ``S`` 1 and zero noise."""
    return extrapolation_step(
        np,
        config,
        state,
        params,
        tuple(np.ones_like(p) for p in params),
        loss=np.float64(loss),
        sq_grad_norm=np.float64(1.0),
        base=base,
        noise=lambda t: [np.zeros_like(p) for p in params],
        lists=lists,
    )


def loss_handed_to_the_base(
    anchor: Sequence[np.ndarray],
    point: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    loss: Any,
    *,
    linearized: bool = True,
    phase: int = 1,
) -> tuple[Any, ExtrapolationCall]:
    """The loss an update call hands its base, from ``point`` with the stored ``anchor``."""
    state = initial_extrapolation_state(tuple(anchor), np.full((), phase, np.int32))
    base = LossRecorder()
    sq = sum(np.sum(np.square(g)) for g in grads)
    call = extrapolation_step(
        np,
        ExtrapolationConfig(linearized=linearized),
        state,
        tuple(point),
        tuple(grads),
        loss=np.float64(loss),
        sq_grad_norm=np.float64(sq),
        base=base,
    )
    assert len(base.runs) == 1
    assert base.runs[0][1] == sq  # the base gets the S the wrapper computed
    return base.runs[0][0], call


def alig_step_size(loss: Any, sq: Any, **kwargs: Any) -> Any:
    return step_size(np, np.float64(loss), np.float64(sq), **kwargs)


def test_the_correction_on_a_quadratic_is_the_anchor_loss_minus_half_the_squared_displacement() -> (
    None
):
    """l = ||w||^2/2: l(w~) + <g(w~), w - w~> = l(w) - ||d||^2/2, exactly in the reals."""
    rng = np.random.default_rng(0)
    w, d = rng.standard_normal(7), 0.3 * rng.standard_normal(7)
    tilde = w + d
    corrected, _ = loss_handed_to_the_base([w], [tilde], [tilde], 0.5 * tilde @ tilde)
    assert corrected == pytest.approx(0.5 * w @ w - 0.5 * d @ d, rel=1e-13)
    size = alig_step_size(corrected, tilde @ tilde, max_lr=None, eps=0.0, f_star=0.0)
    assert float(size.gamma_hat) == pytest.approx((0.5 * w @ w - 0.5 * d @ d) / (tilde @ tilde))


def test_on_a_linear_loss_the_linearised_step_is_alig_at_the_anchor() -> None:
    """l(w) = <a, w> + c is its own linear model: the corrected loss at w~ is l(w)."""
    rng = np.random.default_rng(1)
    a, w, d, c = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal(5), 9.0
    tilde = w + d
    kwargs = {"max_lr": None, "eps": 1e-5, "f_star": 0.0}
    linear, _ = loss_handed_to_the_base([w], [tilde], [a], a @ tilde + c)
    plain_loss, _ = loss_handed_to_the_base([w], [tilde], [a], a @ tilde + c, linearized=False)
    at_tilde = alig_step_size(linear, a @ a, **kwargs)
    plain = alig_step_size(plain_loss, a @ a, **kwargs)
    at_anchor = step_size(np, a @ w + c, a @ a, **kwargs)
    assert float(at_tilde.gamma) == pytest.approx(float(at_anchor.gamma), rel=1e-12)
    assert float(plain.gamma) == pytest.approx(
        float(step_size(np, a @ tilde + c, a @ a, **kwargs).gamma)
    )
    assert abs(float(plain.gamma) - float(at_anchor.gamma)) > 1e-3  # the correction mattered


def test_the_linearised_step_clamps_at_zero_and_caps() -> None:
    """The corrected loss goes through ALI-G's own step size: its clamp at 0 and its cap."""
    anchor = np.array([1.0])
    # <g, w - w~> = -0.5 (below 0 after the correction) and 5.0 (above the cap)
    below_loss, _ = loss_handed_to_the_base([anchor], [anchor + 0.5], [np.array([1.0])], 0.1)
    above_loss, _ = loss_handed_to_the_base([anchor], [anchor - 5.0], [np.array([1.0])], 0.1)
    kwargs = {"eps": 0.0, "f_star": 0.0, "max_lr": 1.0}
    below, above = (
        alig_step_size(below_loss, 1.0, **kwargs),
        alig_step_size(above_loss, 1.0, **kwargs),
    )
    assert (float(below.gamma), float(below.gamma_hat)) == (0.0, pytest.approx(-0.4))
    assert (float(above.gamma), bool(above.capped)) == (1.0, True)


def test_the_update_corrects_the_loss_only_where_linearised() -> None:
    anchor, point, grad = np.array([1.0, -2.0]), np.array([0.5, -1.0]), np.array([0.5, -1.0])
    on, call = loss_handed_to_the_base([anchor], [point], [grad], 0.625)
    off, _ = loss_handed_to_the_base([anchor], [point], [grad], 0.625, linearized=False)
    assert float(on) - 0.625 == grad @ (anchor - point) == 1.25
    assert float(on) == 0.625 + 1.25
    assert float(off) == 0.625
    assert bits(call.params) == bits([anchor])  # the base stepped from the anchor (and stayed)
    # In phase 0 the parameters are the anchor: no displacement, no correction.
    at_anchor, call = loss_handed_to_the_base([anchor], [point], [grad], 0.625, phase=0)
    assert float(at_anchor) == 0.625
    assert bits(call.params) == bits([point])


def test_a_base_that_takes_no_loss_gets_no_correction() -> None:
    class NoLoss(LossRecorder):
        takes_loss = False

    base = NoLoss()
    state = initial_extrapolation_state((np.ones(1),), np.ones((), np.int32))
    one_call(ExtrapolationConfig(), state, (np.zeros(1),), base, loss=0.5)
    assert float(base.runs[0][0]) == 0.5


def test_a_non_finite_correction_skips_the_update() -> None:
    big = np.array([1e300])
    with np.errstate(over="ignore", invalid="ignore"):
        _, call = loss_handed_to_the_base([-big], [big], [big], 1.0)
    assert bool(call.skipped)
    assert not bool(call.base_stepped)
    assert bits(call.params) == bits([-big])  # back at the anchor


# ---------------------------------------------------------------- the oracle by hand


def _quadratic(point: Sequence[np.ndarray], batch: int) -> tuple[float, list[np.ndarray]]:
    return 0.5 * float(point[0] @ point[0]), [point[0].copy()]


@pytest.mark.parametrize(
    ("config", "base", "expected"),
    [
        # EXTRAP-SGD: w~ = 1 - 0.5*1 = 0.5, w1 = 1 - 0.1*0.5 = 0.95, w~ = 0.475, w2 = 0.9025.
        (ExtrapolationConfig(lr_x=0.5), SGDNesterov(lr=0.1), [0.95, 0.9025]),
        # past: w1 = 1 - 0.1*1 = 0.9 (d0 = 0), w~1 = 0.9 - 0.5*1 = 0.4, w2 = 0.9 - 0.04 = 0.86.
        (ExtrapolationConfig(mode="past", lr_x=0.5), SGDNesterov(lr=0.1), [0.9, 0.86]),
        # ALI-G, lr_x by default = gamma at the anchor = 0.5/1: w~ = 0.5; linearised loss
        # 0.125 + 0.5*(1 - 0.5) = 0.375, gamma = 0.375/0.25 = 1.5: w1 = 1 - 1.5*0.5 = 0.25.
        (ExtrapolationConfig(), AliGConfig(eps=0.0), [0.25, 0.0625]),
        # plain: gamma = 0.125/0.25 = 0.5: w1 = 1 - 0.5*0.5 = 0.75.
        (ExtrapolationConfig(linearized=False), AliGConfig(eps=0.0), [0.75, 0.5625]),
        # ALI-G past, lr_x = the previous gamma: w1 = 1 - 0.5*1 = 0.5 (gamma 0.5), w~1 = 0.5 -
        # 0.5*1 = 0: l = 0, g = 0, gamma_hat = 0 (zero denominator): w2 = 0.5.
        (ExtrapolationConfig(mode="past"), AliGConfig(eps=0.0), [0.5, 0.5]),
        # noise, sigma 0.5 with xi_t = t: w1 = 1 - 0.1*1, w~1 = 0.9 + 0.5*1, w2 = 0.9 - 0.14.
        (ExtrapolationConfig(mode="noise", sigma=0.5), SGDNesterov(lr=0.1), [0.9, 0.76]),
        # Nesterov SGD, mu 0.5: b = 0.5, w1 = 1 - 0.1*(0.5 + 0.25) = 0.925 after w~ = 0.5.
        (ExtrapolationConfig(lr_x=0.5), SGDNesterov(lr=0.1, momentum=0.5), [0.925]),
    ],
)
def test_the_oracle_matches_hand_computed_values(
    config: ExtrapolationConfig, base: Any, expected: list[float]
) -> None:
    calls = len(expected) * config.evaluations_per_iteration
    records = run_extrapolation_oracle(
        [np.array([1.0])], _quadratic, calls, config, base, noise=lambda t: [np.array([float(t)])]
    )
    anchors = [
        r.anchor[0].item() for r in records if not r.extrapolated or config.mode != "gradient"
    ]
    assert anchors == pytest.approx(expected, rel=1e-15)


def test_the_oracle_same_batch_form_evaluates_twice_per_call_on_one_batch() -> None:
    batches: list[int] = []

    def evaluate(point: Sequence[np.ndarray], batch: int) -> tuple[float, list[np.ndarray]]:
        batches.append(batch)
        return _quadratic(point, batch)

    config, base = ExtrapolationConfig(lr_x=0.5), SGDNesterov(lr=0.1)
    records = run_extrapolation_oracle(
        [np.array([1.0])], evaluate, 2, config, base, call_form="same_batch"
    )
    assert batches == [0, 0, 1, 1]
    assert [r.anchor[0].item() for r in records] == pytest.approx([0.95, 0.9025])
    assert not any(r.extrapolated for r in records)


def test_the_oracle_refuses_an_unknown_call_form() -> None:
    with pytest.raises(ValueError, match="Invalid call_form"):
        run_extrapolation_oracle(
            [np.ones(1)],
            _quadratic,
            1,
            ExtrapolationConfig(),
            SGDNesterov(lr=0.1),
            call_form="closure",
        )


# ---------------------------------------------------------------- no branch on array values


class Traced(np.ndarray):
    """A NumPy array that, like a tracer under jit, refuses to become a Python value."""

    def _refuse(self, *args: Any) -> Any:
        raise TypeError("a Python branch or conversion on an array value")

    __bool__ = __float__ = __int__ = __index__ = _refuse

    def __array_wrap__(self, array: Any, context: Any = None, return_scalar: bool = False) -> Any:
        return np.asarray(array).view(Traced)  # 0-d results stay arrays, as tracers do


def _traced(x: Any) -> Any:
    return np.asarray(x).view(Traced)


class TracedNumpy:
    """The array namespace members alig_core may use, returning Traced arrays."""

    @staticmethod
    def where(c: Any, a: Any, b: Any) -> Any:
        return _traced(np.where(np.asarray(c), np.asarray(a), np.asarray(b)))

    isfinite = staticmethod(lambda x: _traced(np.isfinite(np.asarray(x))))
    logical_and = staticmethod(lambda a, b: _traced(np.logical_and(np.asarray(a), np.asarray(b))))
    logical_or = staticmethod(lambda a, b: _traced(np.logical_or(np.asarray(a), np.asarray(b))))
    logical_not = staticmethod(lambda a: _traced(np.logical_not(np.asarray(a))))
    sqrt = staticmethod(lambda x: _traced(np.sqrt(np.asarray(x))))
    sum = staticmethod(lambda x: _traced(np.sum(np.asarray(x))))


class TracedAliG:
    """ALI-G's step size and a plain step in the traced namespace: a compiled adapter's base."""

    takes_loss = True

    def __init__(self, grads: Sequence[Any]) -> None:
        self.grads = grads

    def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
        return step_size(
            TracedNumpy, loss, sq_grad_norm, max_lr=_traced(0.5), eps=1e-5, f_star=0.0
        ).gamma

    def run(self, anchor: Params, loss: Any, sq_grad_norm: Any, skipped: Any) -> Any:
        gamma = self.step_size_at(loss, sq_grad_norm)
        return tuple(a - gamma * g for a, g in zip(anchor, self.grads, strict=True)), gamma


@pytest.mark.parametrize("mode", ["gradient", "past", "noise"])
def test_the_procedure_never_branches_on_an_array_value(mode: str) -> None:
    xp = TracedNumpy
    config = ExtrapolationConfig(
        mode=mode,
        lr_x=None if mode != "past" else (lambda t: 0.1 / (1 + t)),
        sigma=0.1 if mode == "noise" else None,
    )
    params = tuple(_traced(p) for p in initial_params())
    grads = tuple(_traced(0.5 * p) for p in params)
    loss, sq = _traced(1.0), _traced(sum(np.sum(np.asarray(g) ** 2) for g in grads))
    state = initial_extrapolation_state(params, _traced(np.zeros((), np.int32)))
    ones = [_traced(np.ones_like(p)) for p in params]
    for _ in range(3):  # in "gradient" mode: anchor, update, anchor (both computed each time)
        call = extrapolation_step(
            xp,
            config,
            state,
            params,
            grads,
            loss=loss,
            sq_grad_norm=sq,
            base=TracedAliG(grads),
            noise=lambda t: ones,
        )
        state, params = call.state, call.params
        assert all(isinstance(p, Traced) for p in call.params)
        assert all(isinstance(a, Traced) for a in call.state.anchor)
        assert isinstance(call.state.iteration, Traced)
        assert isinstance(call.state.phase, Traced)
    with pytest.raises(TypeError, match="Python branch"):  # guard: Traced does catch branches
        bool(call.skipped)


# ---------------------------------------------------------------- the default lr_x, and misuse


def test_the_default_lr_x_is_the_bases_step_size_and_is_asked_only_where_needed() -> None:
    """ "gradient" mode asks step_size_at(l(w_t), S(w_t)) once; "past" uses run's step size;
    a given lr_x asks nothing."""
    w, g = np.array([1.0]), np.array([2.0])

    class Base(LossRecorder):
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[tuple[Any, Any]] = []

        def step_size_at(self, loss: Any, sq_grad_norm: Any) -> Any:
            self.asked.append((loss, sq_grad_norm))
            return 0.25

        def run(self, anchor: Params, loss: Any, sq_grad_norm: Any, skipped: Any) -> Any:
            self.runs.append((loss, sq_grad_norm))
            return anchor, 0.125

    def one_call(config: ExtrapolationConfig) -> tuple[Base, ExtrapolationCall]:
        base = Base()
        state = initial_extrapolation_state((w,), 0)
        call = extrapolation_step(
            np,
            config,
            state,
            (w,),
            (g,),
            loss=np.float64(3.0),
            sq_grad_norm=np.float64(4.0),
            base=base,
            lists=HostLists(np),
        )
        return base, call

    base, call = one_call(ExtrapolationConfig())
    assert base.asked == [(3.0, 4.0)]
    assert base.runs == []
    assert call.params[0].tolist() == [1.0 - 0.25 * 2.0]
    base, call = one_call(ExtrapolationConfig(mode="past"))
    assert base.asked == []
    assert len(base.runs) == 1
    assert call.params[0].tolist() == [1.0 - 0.125 * 2.0]  # d_1 = -gamma_0 * g
    for config in (ExtrapolationConfig(lr_x=0.5), ExtrapolationConfig(mode="past", lr_x=0.5)):
        base, call = one_call(config)
        assert base.asked == []
        assert call.params[0].tolist() == [0.0]


def test_past_and_noise_modes_update_on_every_call() -> None:
    """There is no call at the anchor outside "gradient" mode, whatever the phase."""
    for config in (ExtrapolationConfig(mode="past"), ExtrapolationConfig(mode="noise", sigma=0.1)):
        base = LossRecorder()
        state = initial_extrapolation_state((np.ones(1),), 0)
        call = one_call(config, state, (np.ones(1),), base, lists=HostLists(np))
        assert len(base.runs) == 1
        assert (call.state.phase, call.state.iteration) == (1, 1)


def test_noise_mode_without_noise_and_a_loss_taking_base_without_loss_are_errors() -> None:
    state = initial_extrapolation_state([np.ones(1)], np.zeros((), np.int32))

    def step(config: ExtrapolationConfig, base: Any, loss: Any) -> Any:
        return extrapolation_step(
            np,
            config,
            state,
            [np.ones(1)],
            [np.ones(1)],
            loss=loss,
            sq_grad_norm=np.float64(1.0),
            base=base,
        )

    with pytest.raises(ValueError, match="no loss was given"):
        step(ExtrapolationConfig(), LossRecorder(), None)

    class NoLoss(LossRecorder):
        takes_loss = False

    step(ExtrapolationConfig(), NoLoss(), None)  # a base that takes none needs none
    with pytest.raises(ValueError, match="no noise was given"):
        step(ExtrapolationConfig(mode="noise", sigma=0.1), NoLoss(), None)


def test_the_extrapolation_oracle_imports_numpy_only_when_it_runs() -> None:
    assert "numpy" not in modules_loaded_by("import alig_core.oracle_extrapolation")
