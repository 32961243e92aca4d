"""The extrapolation checks every adapter runs, written once: the oracle table, skipped
iterations bit for bit, d = 0 is the base.

As :mod:`alig_checks` does for ALI-G: one declaration per *adapter*, an
:class:`ExtrapolationRun` (``tests/<framework>/extrapolation_worker.py``: the wrapper on a
row of ``extrapolation_cases.CASES``, driven call by call with the evaluations of
``extrapolation_cases.Problem``, NumPy out), and the checks here. A framework's test file
subclasses :class:`ExtrapolationOracleChecks` with its run:

- :func:`check_against_oracle`: after every call the parameters, the anchor, the phase and
  the counters equal :func:`alig_core.oracle_extrapolation.run_extrapolation_oracle`'s
  (SPEC: float64 100 iterations 1e-10, float32 20 iterations 1e-5); on the oracle's own
  (loss, gradient) sequence also the base's buffers and ALI-G's records (gamma,
  steps_taken, no skip handed to the base); every skipped iteration bit for bit
  (:class:`SkipWatch`).
- :func:`check_a_real_run`: the run is a real test (iterations taken and skipped at both
  points, w~ away from w, ALI-G's gamma moving).
- :func:`check_zero_displacement`: lr_x = 0 (sigma = 0) is the bare base, bit for bit.

optax's wrapper runs :func:`check_a_real_run` and :func:`oracle_buffers` in a loop of its
own (its skips restore the anchor to within a rounding, not bit for bit, and it compares
each call with the oracle set to its state as well).

The deviation metric is :func:`alig_cases.max_relative_deviation`, everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

import numpy as np
import pytest

from alig_cases import max_relative_deviation, tolerance
from alig_core import AliGConfig, ExtrapolationConfig
from alig_core.oracle_extrapolation import OracleCallRecord, SGDNesterov
from alig_core.oracle_extrapolation import run_extrapolation_oracle as run_oracle
from extrapolation_cases import (
    CASES,
    ITERATIONS,
    ExtrapolationCase,
    Problem,
    find_case,
    initial_params,
    run_case_oracle,
    zero_displacement,
)

__all__ = [
    "PLAIN_CASES",
    "UNPROJECTED_ALIG",
    "BareBase",
    "ExtrapolationOracleChecks",
    "ExtrapolationRun",
    "MakeRun",
    "Recording",
    "Replay",
    "RunBase",
    "SkipWatch",
    "calls_for",
    "check_a_real_run",
    "check_against_oracle",
    "check_skipped_iterations",
    "check_zero_displacement",
    "oracle_buffers",
]

Evaluation = tuple[int, str, list[np.ndarray], float, list[Any]]
"""A logged evaluation: (call, kind, point, loss, grads); kind ``"anchor"`` (the
evaluation that places w~ in "gradient" mode) or ``"update"``."""

PLAIN_CASES = tuple(c for c in CASES if not c.label)
"""Every mode x base x call form with the default options (the table's plain rows)."""

UNPROJECTED_ALIG = frozenset({"alig_standard", "alig_adjusted"})
"""Bases held to the same-sequence comparison only: without projection, ALI-G's closed loop
amplifies the rounding differences between a framework and NumPy (the Polyak step of a
nearly cancelling linearised loss; measured up to 8e-9 after 100 iterations in torch, the
same in Keras and optax)."""


class ExtrapolationRun(Protocol):
    """One wrapper run on a row, seen from the checks: NumPy out (float64)."""

    case: ExtrapolationCase
    initial: list[np.ndarray]
    """The start, float64 (the values of the run's dtype)."""
    problem: Any
    """What ``call`` evaluates: ``evaluate(point, batch) -> (loss, grads)`` and a count
    ``evaluations`` (a :class:`extrapolation_cases.Problem`, or a :class:`Replay`)."""
    log: list[Evaluation]
    sgd_buffer_scale: float
    """What the oracle's SGD buffer ``b`` is multiplied by to be this framework's SGD
    buffer (torch: 1; Keras keeps ``m = -lr * b``)."""

    def call(self, batch: int) -> None:
        """One call of the oracle's loop on minibatch ``batch``."""

    def params(self) -> list[np.ndarray]:
        """The parameters."""

    def anchor(self) -> list[np.ndarray]:
        """The wrapper's anchor (the parameters where they hold it)."""

    def counters(self) -> tuple[bool, int, int]:
        """(whether the parameters hold w~, iterations taken, iterations skipped)."""

    def noise(self, t: int) -> list[np.ndarray]:
        """The wrapper's own xi_t (float64), for the oracle."""

    def buffers(self) -> list[np.ndarray]:
        """The base's momentum buffers, float64, in the parameters' shapes (zeros where none)."""

    def alig_records(self) -> dict[str, Any] | None:
        """An ALI-G base's ``gamma``, ``steps_taken`` and ``steps_skipped`` (``None`` where
        it has not stepped yet); ``None`` for another base."""

    def oracle_base(self) -> SGDNesterov | AliGConfig:
        """The oracle's description of the base as this run's optimizer computes it."""

    def snapshot(self) -> dict[str, list[bytes]]:
        """The bits of ``"anchor"`` (the anchor as the wrapper gives it), ``"stored"`` (the
        anchor as it keeps it) and ``"base"`` (every piece of the base's state)."""

    def watch(self, around: Callable[[Callable[..., None]], Callable[..., None]]) -> None:
        """Routes every step of the wrapper (the finest unit it can be watched at) through
        ``around``."""

    def base_state_bits(self) -> list[bytes]:
        """The bits of the base's state but its counters of calls (the wrapper does not
        call its base on a skipped iteration; a bare base counts the skip), with each
        piece's name, shape and dtype."""

    def bare_base(self) -> BareBase:
        """The run's base, built on its own copy of the start (float64), outside a wrapper."""


class BareBase(Protocol):
    """An optimizer of the kind a run's base is, stepped directly (NumPy in, NumPy out)."""

    def step(self, loss: float, grads: Sequence[np.ndarray | None]) -> None:
        """One step (ALI-G gets the loss; SGD does not take one)."""

    def params(self) -> list[np.ndarray]:
        """Its parameters."""

    def state_bits(self) -> list[bytes]:
        """As :meth:`ExtrapolationRun.base_state_bits`."""


class RunBase:
    """What every :class:`ExtrapolationRun` starts from: the row, the wrapper's options (the
    row's, or ``config``), the problem (a fresh one by default), the start in ``dtype``
    (``start``; ``initial``: the same values in float64) and an empty log. A subclass
    builds the parameters from ``start`` and defines ``call``."""

    def __init__(
        self,
        case: ExtrapolationCase,
        dtype: str = "float64",
        *,
        config: ExtrapolationConfig | None = None,
        problem: Problem | None = None,
    ) -> None:
        self.case = case
        self.config = config if config is not None else case.config
        self.problem: Any = problem if problem is not None else Problem()
        self.dtype = dtype
        self.start = [np.asarray(p, dtype=dtype) for p in initial_params()]
        self.initial = [p.astype(np.float64) for p in self.start]
        self.log: list[Evaluation] = []
        self.sgd_buffer_scale = 1.0

    def call(self, batch: int) -> None:
        """One call of the oracle's loop on minibatch ``batch``."""
        raise NotImplementedError

    def run(self, start: int, stop: int) -> None:
        """Calls ``start`` to ``stop`` (call k on minibatch k)."""
        for batch in range(start, stop):
            self.call(batch)

    def oracle_base(self) -> SGDNesterov | AliGConfig:
        """The row's base (a framework whose optimizer computes otherwise overrides it)."""
        return self.case.base_config


class MakeRun(Protocol):
    """An :class:`ExtrapolationRun`'s constructor."""

    def __call__(
        self,
        case: ExtrapolationCase,
        dtype: str = ...,
        *,
        config: ExtrapolationConfig | None = ...,
        problem: Problem | None = ...,
    ) -> ExtrapolationRun: ...


def calls_for(case: ExtrapolationCase, iterations: int) -> int:
    """The calls that make ``iterations`` iteration attempts of ``case``."""
    return case.calls * iterations // ITERATIONS


def oracle_buffers(record: OracleCallRecord, sgd_scale: float = 1.0) -> list[np.ndarray]:
    """The oracle's base buffers after a call (zeros where none; the SGD's times
    ``sgd_scale``)."""
    if record.alig_state is not None:
        buffers, scale = record.alig_state.buffers, 1.0
    else:
        buffers, scale = record.sgd_buffers, sgd_scale
    return [
        np.zeros_like(a) if b is None else scale * b
        for b, a in zip(buffers, record.anchor, strict=True)
    ]


class Recording:
    """``Problem.evaluate`` that keeps every evaluation (minibatch, loss, gradients)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.evaluations: list[tuple[int, float, list[Any]]] = []

    def evaluate(self, point: Any, batch: int) -> tuple[float, list[Any]]:
        loss, grads = self.problem.evaluate(point, batch)
        self.evaluations.append((batch, loss, grads))
        return loss, grads


class Replay:
    """Hands out a recorded sequence of evaluations, in order (the same sequence for both)."""

    def __init__(self, evaluations: list[tuple[int, float, list[Any]]]) -> None:
        self.recorded = evaluations
        self.evaluations = 0

    def evaluate(self, point: Any, batch: int) -> tuple[float, list[Any]]:
        expected_batch, loss, grads = self.recorded[self.evaluations]
        assert batch == expected_batch, "the wrapper evaluates where the oracle did not"
        self.evaluations += 1
        return loss, grads


class SkipWatch:
    """Checks SPEC 7 on every step of a run that skips: the parameters back at the anchor;
    the anchor, the base's state and the counters as they were; the stored anchor too
    where it was in use (the parameters held w~). Counts the skips by the point
    evaluated last (``skipped_at``)."""

    def __init__(self, run: ExtrapolationRun) -> None:
        self.run = run
        self.skipped_at = {"anchor": 0, "update": 0}
        run.watch(self.around)

    def around(self, step: Callable[..., None]) -> Callable[..., None]:
        """``step``, checked."""

        def watched(*args: Any, **kwargs: Any) -> None:
            run = self.run
            before = run.snapshot()
            phase, iteration, skipped = run.counters()
            step(*args, **kwargs)
            if run.counters()[2] == skipped:
                return
            after = run.snapshot()
            where = f"{run.case.name}, evaluation {len(run.log)}"
            assert run.counters() == (False, iteration, skipped + 1), where
            assert [p.tobytes() for p in run.params()] == before["anchor"], where
            assert after["anchor"] == before["anchor"], where
            if phase:  # the stored anchor was in use: kept bit for bit
                assert after["stored"] == before["stored"], where
            assert after["base"] == before["base"], f"{where}: the base's state moved"
            self.skipped_at[run.log[-1][1]] += 1

        return watched


def check_against_oracle(
    make_run: MakeRun,
    case: ExtrapolationCase,
    dtype: str,
    *,
    same_sequence: bool,
    config: ExtrapolationConfig | None = None,
) -> tuple[list[OracleCallRecord], SkipWatch]:
    """Runs the wrapper and the oracle call by call; asserts SPEC's targets after each call.

    ``same_sequence``: the wrapper is handed the oracle's evaluations (SPEC: step by step
    on the same (loss, gradients) sequence; the buffers and ALI-G's records are compared
    too); else it evaluates the problem at its own parameters (end to end). Every skipped
    iteration is checked bit for bit (:class:`SkipWatch`). ``config``: the wrapper's
    options instead of the row's (the oracle keeps the row's).
    """
    iterations, tol = tolerance(np.dtype(dtype))
    recording = Recording(Problem())
    run = make_run(case, dtype, config=config)
    watch = SkipWatch(run)
    with np.errstate(all="ignore"):
        records = run_oracle(
            run.initial,
            recording.evaluate,
            calls_for(case, iterations),
            case.config,
            run.oracle_base(),
            call_form=case.call_form,
            noise=run.noise,
        )
    run.problem = Replay(recording.evaluations) if same_sequence else Problem()
    worst = 0.0
    for call, record in enumerate(records):
        run.call(call)
        where = f"{case.name}, {dtype}, call {call}"
        assert run.counters() == (record.extrapolated, record.iterations, record.skipped), where
        params = run.params()
        assert [p.dtype for p in params] == [np.dtype(dtype)] * len(params), where
        worst = max(
            worst,
            max_relative_deviation(params, record.params),
            max_relative_deviation(run.anchor(), record.anchor),
        )
        assert worst <= tol, f"{where}: deviation {worst:.3g}"
        if not same_sequence:
            continue
        expected = oracle_buffers(record, run.sgd_buffer_scale)
        buffers = max_relative_deviation(run.buffers(), expected)
        assert buffers <= tol, f"{where}: buffers {buffers:.3g}"
        records_now = run.alig_records()
        assert (records_now is not None) == case.is_alig, where
        if records_now is not None:
            state = record.alig_state
            assert state.steps_taken == record.iterations, where
            if records_now["gamma"] is None:  # the base has not stepped yet
                assert state.steps_taken == 0, where
                continue
            assert records_now["gamma"] == pytest.approx(state.gamma, rel=tol, abs=tol), where
            assert records_now["steps_taken"] == record.iterations, where
            assert records_now["steps_skipped"] == 0, f"{where}: the base was handed a skip"
    assert run.problem.evaluations == records[-1].evaluations
    return records, watch


def check_a_real_run(
    case: ExtrapolationCase,
    records: Sequence[OracleCallRecord],
    iterations: int = ITERATIONS,
    skipped_at: dict[str, int] | None = None,
) -> None:
    """A run of ``iterations`` is a real test: iterations taken and skipped (with the
    counts of :attr:`SkipWatch.skipped_at`, at both points in "gradient" mode, over
    ``ITERATIONS``), w~ away from w (where a call can end holding it: the alternating form;
    in the same-batch form, a displacement of size lr_x > 1e-2 will do), ALI-G's gamma
    moving (off the cap, above 0)."""
    last, full = records[-1], iterations == ITERATIONS
    assert last.iterations >= 0.7 * iterations
    assert last.skipped >= (5 if full else 1)
    if skipped_at is not None and full:
        assert skipped_at["update"] >= 3
        if case.mode == "gradient":  # non-finite values at the anchor skip too
            assert skipped_at["anchor"] >= 3
    displaced = any(
        r.extrapolated and max_relative_deviation(r.params, r.anchor) > 1e-3 for r in records
    )
    if case.call_form == "alternating":
        assert displaced, "w~ never left w"
    else:
        assert displaced or any(r.lr_x is not None and r.lr_x > 1e-2 for r in records)
    if case.is_alig:
        moving = [r for r in records if not r.alig_state.capped and r.alig_state.gamma > 0]
        assert len({r.alig_state.gamma for r in records}) > iterations // 10
        assert len(moving) > iterations // 10


def check_skipped_iterations(make_run: MakeRun, case: ExtrapolationCase) -> None:
    """``case`` on its own evaluations (float64, ``case.calls`` calls): every skipped
    iteration bit for bit, skips at the update (and at the anchor in "gradient" mode)."""
    run = make_run(case, "float64")
    watch = SkipWatch(run)
    for call in range(case.calls):
        run.call(call)
    assert watch.skipped_at["update"] >= 3
    if case.mode == "gradient":
        assert watch.skipped_at["anchor"] >= 3


def _bits(arrays: Sequence[np.ndarray]) -> list[bytes]:
    return [np.ascontiguousarray(a).tobytes() for a in arrays]


def check_zero_displacement(make_run: MakeRun, case: ExtrapolationCase, iterations: int) -> None:
    """lr_x = 0 or sigma = 0: the wrapper is its base, stepped on its update evaluations,
    bit for bit (``iterations`` iteration attempts, float64).

    SGD has no skip rule, so it runs without non-finite events; ALI-G runs with them, and
    the bare ALI-G is handed every update evaluation: it skips where the wrapper does, and
    only the counters of calls differ (the wrapper does not call its base on a skip).
    After every call: every evaluation was at the bare base's parameters, the parameters
    and the anchor are its parameters, the base's state is its state.
    """
    run = make_run(
        case,
        "float64",
        config=zero_displacement(case.mode),
        problem=Problem(finite=not case.is_alig),
    )
    bare = run.bare_base()
    replayed = 0
    for call in range(calls_for(case, iterations)):
        seen = len(run.log)
        run.call(call)
        where = f"{case.name}, call {call}"
        for _, kind, point, loss, grads in run.log[seen:]:
            assert _bits(point) == _bits(bare.params()), f"{where}: evaluated off w_t"
            if kind == "update":
                bare.step(loss, grads)
                replayed += 1
        assert _bits(run.params()) == _bits(bare.params()), where
        assert _bits(run.anchor()) == _bits(bare.params()), where
        assert run.base_state_bits() == bare.state_bits(), f"{where}: the base's state"
    _, iteration, skipped = run.counters()
    assert iteration >= 0.7 * iterations
    assert replayed >= 0.7 * iterations
    records = run.alig_records()
    if records is not None:
        assert skipped >= max(3, iterations // 20)
        assert records["steps_taken"] == iteration


class ExtrapolationOracleChecks:
    """The oracle table on an adapter's run (subclass as ``class Test...``).

    Attributes:
      make_run: the :class:`ExtrapolationRun` class (stored on the class).
      cases: the rows it runs (by default every row).
      perturbed_case: the row of the guard (the comparison can fail).
      zero_run: the run of the d = 0 checks (by default ``make_run``).
      zero_cases, zero_iterations: their rows (by default :data:`PLAIN_CASES`) and length.
    """

    make_run: ClassVar[MakeRun]
    cases: ClassVar[tuple[ExtrapolationCase, ...]] = CASES
    perturbed_case: ClassVar[str] = "gradient-alig_standard_projected-same_batch"
    zero_run: ClassVar[MakeRun | None] = None
    zero_cases: ClassVar[tuple[ExtrapolationCase, ...]] = PLAIN_CASES
    zero_iterations: ClassVar[int] = ITERATIONS

    def dtype_scope(self, dtype: str) -> AbstractContextManager[object]:
        """Where a bare base of ``dtype`` is stepped (Keras: its ``floatx``); by default,
        anywhere."""
        return contextlib.nullcontext()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrizes ``case`` by :attr:`cases` and ``end_to_end_case`` by those of them
        with projection or without ALI-G (:data:`UNPROJECTED_ALIG`)."""
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", self.cases, ids=lambda case: case.name)
        if "zero_case" in metafunc.fixturenames:
            metafunc.parametrize("zero_case", self.zero_cases, ids=lambda case: case.name)
        if "end_to_end_case" in metafunc.fixturenames:
            cases = [c for c in self.cases if c.base not in UNPROJECTED_ALIG]
            metafunc.parametrize("end_to_end_case", cases, ids=lambda case: case.name)

    @pytest.mark.parametrize("dtype", ["float64", "float32"])
    def test_matches_the_oracle_on_the_same_sequence(
        self, case: ExtrapolationCase, dtype: str
    ) -> None:
        """float64: 100 iterations within 1e-10; float32: 20 iterations within 1e-5: the
        parameters, the anchor, the base's buffers, ALI-G's records, the phase and the
        counters after every call; every skipped iteration bit for bit; a real run."""
        records, watch = check_against_oracle(self.make_run, case, dtype, same_sequence=True)
        check_a_real_run(case, records, tolerance(np.dtype(dtype))[0], watch.skipped_at)

    def test_matches_the_oracle_end_to_end(self, end_to_end_case: ExtrapolationCase) -> None:
        """Each evaluation at the wrapper's own parameters (float64, 100 iterations, 1e-10)."""
        check_against_oracle(self.make_run, end_to_end_case, "float64", same_sequence=False)

    def test_a_perturbed_wrapper_is_detected(self) -> None:
        """Guard: the comparison above can fail (the linearisation, visible in 100
        iterations): it fails, and the end points are more than 1e-3 apart."""
        case, perturbed = find_case(self.perturbed_case), ExtrapolationConfig(linearized=False)
        with pytest.raises(AssertionError, match="deviation"):
            check_against_oracle(
                self.make_run, case, "float64", same_sequence=True, config=perturbed
            )
        run = self.make_run(case, "float64", config=perturbed)
        for call in range(case.calls):
            run.call(call)
        expected = run_case_oracle(case)[-1].anchor
        assert max_relative_deviation(run.anchor(), expected) > 1e-3

    def test_zero_displacement_equals_the_bare_base_bit_for_bit(
        self, zero_case: ExtrapolationCase
    ) -> None:
        """lr_x = 0 or sigma = 0: the wrapper is its base (:func:`check_zero_displacement`)."""
        with self.dtype_scope("float64"):
            check_zero_displacement(self.zero_run or self.make_run, zero_case, self.zero_iterations)
