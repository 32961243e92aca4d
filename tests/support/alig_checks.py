"""The checks every adapter runs, written once: the oracle table, SPEC's equalities, the
bad-input tables.

The idea of torch's ``OptimizerInfo`` (one declaration per optimizer, generic invariants run
over all), turned around: one declaration per *adapter*, a :class:`bad_inputs.Driver`
(``tests/support/<framework>_driver.py``: NumPy in, NumPy out) and a :class:`NesterovSGD`
for the framework's own SGD, and the invariants here. A framework's test file subclasses
the suites below with its drivers, so a check added here runs in torch, Keras (three
backends), optax and the NumPy generic core alike:

- :class:`OracleChecks`: :func:`check_oracle_table` (every case of ``CASES`` against
  :func:`alig_cases.run_oracle` step by step, SPEC's float64 100 steps 1e-10 and float32
  20 steps 1e-5: the parameters and their dtype, the momentum buffers to the same
  tolerance, a buffer the oracle holds must exist and none may exist without momentum,
  and the records gamma, gamma_hat, capped and the two counters) on every driver, and
  :func:`check_conventions_differ` (the two conventions differ as soon as gamma moves).
- :class:`NesterovSGDChecks`: :func:`check_pinned_equals_nesterov_sgd` (gamma pinned at
  ``max_lr``: both conventions are the framework's Nesterov SGD with lr = ``max_lr``) and
  :func:`check_sgd_with_lr_gamma_is_its_convention` (its Nesterov SGD driven with
  lr_t = gamma_t is one convention, the one it follows, and not the other).
- :class:`BadInputChecks`: every row of ``bad_inputs``' three tables.

The deviation metric is :func:`alig_cases.max_relative_deviation`, everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

import numpy as np
import pytest

from alig_cases import (
    CASES,
    Case,
    initial_params,
    make_sequence,
    max_relative_deviation,
    run_oracle,
)
from alig_cases import tolerance as spec_tolerance
from alig_core import AliGConfig
from bad_inputs import (
    HYPERPARAMETER_ROWS,
    PARAM_ROWS,
    STEP_ROWS,
    Driver,
    ParamRow,
    Row,
    check_hyperparameter_row,
    check_param_row,
    check_step_row,
    rows_for,
)

__all__ = [
    "PINNED_SGD",
    "AdapterSuite",
    "BadInputChecks",
    "NesterovSGD",
    "NesterovSGDChecks",
    "OracleChecks",
    "check_conventions_differ",
    "check_oracle_table",
    "check_pinned_equals_nesterov_sgd",
    "check_sgd_with_lr_gamma_is_its_convention",
]

PINNED_SGD: tuple[tuple[float, float], ...] = ((1e-3, 0.9), (2.0**-10, 0.875))
"""(lr, momentum) at which gamma stays pinned on the pinned sequence: the values of the
``pinned_at_cap`` cases, and values exact in float32."""


class NesterovSGD(Protocol):
    """The framework's own Nesterov SGD, seen from the checks: NumPy in, NumPy out."""

    lr_convention: str
    """The ALI-G momentum convention this SGD follows when its learning rate changes from
    step to step: ``"standard"`` (lr inside the buffer) or ``"adjusted"`` (outside)."""
    missing_gradients: bool
    """Whether it takes a step where a parameter has no gradient (``None``), leaving that
    parameter and its buffer as they are (as ALI-G does)."""

    def hyperparameters(self, lr: float, momentum: float) -> tuple[float, float]:
        """``(lr, momentum)`` as this SGD, built with them, computes with them."""

    def build(self, params: Sequence[np.ndarray], *, lr: float, momentum: float) -> None:
        """Creates the parameters and ``SGD(lr, momentum, nesterov=True)``."""

    def step(self, grads: Sequence[np.ndarray | None], *, lr: float | None = None) -> None:
        """One step; ``lr``: the learning rate of this step (``None``: as it is)."""

    def params(self) -> list[np.ndarray]:
        """The current parameters."""

    def buffers(self) -> list[np.ndarray | None]:
        """Its momentum buffers, in the sign of ALI-G's buffers of ``lr_convention`` (torch
        and optax keep ``+(mu * b + g)``: negated), ``None`` where it holds none."""


def _number(value: Any) -> float:
    """A recorded scalar (0-d, or a 1-element array) as a Python number."""
    return np.asarray(value).reshape(()).item()


def _check_buffers(
    ours: Sequence[np.ndarray | None],
    theirs: Sequence[np.ndarray | None],
    momentum: float,
    tol: float,
    where: str,
) -> None:
    """The buffers equal the oracle's; none is missing, none is there without momentum."""
    assert len(ours) == len(theirs), f"{where}: {len(ours)} buffers for {len(theirs)} parameters"
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if momentum == 0:
            assert a is None, f"{where}: parameter {i} has a buffer, and momentum is 0"
        elif b is None:  # never had a gradient: no buffer, or an untouched (zero) one
            assert a is None or not np.any(a), f"{where}: parameter {i}'s buffer moved"
        else:
            assert a is not None, f"{where}: parameter {i} has no buffer; the oracle has one"
            deviation = max_relative_deviation([a], [b])  # at the buffer's own scale
            assert deviation <= tol, f"{where}: buffer {i} {deviation:.3g} off"


def check_oracle_table(make_driver: Callable[[], Driver], case: Case, dtype: Any) -> None:
    """``case`` in ``dtype``: after every step, the adapter equals the oracle (SPEC's
    number of steps and tolerance for the dtype, :func:`alig_cases.tolerance`)."""
    dtype = np.dtype(dtype)
    steps, tol = spec_tolerance(dtype)
    sequence = make_sequence(steps, dtype, pinned=case.pinned_at_cap)
    history = run_oracle(case.config, initial_params(dtype), sequence)
    gammas = {state.gamma for _, state in history}
    assert case.pinned_at_cap or len(gammas) > 1, "gamma never moves: the check would be weak"
    driver = make_driver()
    driver.build(initial_params(dtype), **case.kwargs)
    for t, (step, (expected, state)) in enumerate(zip(sequence, history, strict=True)):
        driver.step(step.loss, step.grads)
        where = f"{case.name}, {dtype}, step {t} ({step.event})"
        actual = driver.params()
        assert [p.dtype for p in actual] == [dtype] * len(actual), f"{where}: dtypes changed"
        deviation = max_relative_deviation(actual, expected)
        assert deviation <= tol, f"{where}: parameters {deviation:.3g} from the oracle"
        _check_buffers(driver.buffers(), state.buffers, case.config.momentum, tol, where)
        records = driver.state()
        for name in ("gamma", "gamma_hat"):
            assert _number(records[name]) == pytest.approx(
                getattr(state, name), rel=tol, abs=tol
            ), f"{where}: {name}"
        assert bool(_number(records["capped"])) == state.capped, f"{where}: capped"
        assert int(_number(records["steps_taken"])) == state.steps_taken, f"{where}"
        assert int(_number(records["steps_skipped"])) == state.steps_skipped, f"{where}"


def check_pinned_equals_nesterov_sgd(
    make_driver: Callable[[], Driver],
    make_sgd: Callable[[], NesterovSGD],
    *,
    adjusted: bool,
    lr: float,
    momentum: float,
) -> None:
    """On the pinned sequence gamma = ``lr`` on every step, and ALI-G in either convention
    is the framework's Nesterov SGD with that lr, to 1e-12 after 100 steps (float64).

    ALI-G gets the hyperparameters the SGD computes with (``NesterovSGD.hyperparameters``:
    Keras' SGD casts its Python-float momentum through float32 on TensorFlow, 0.9 ->
    0.8999999762, which alone moves it 2.5e-9 from ALI-G with 0.9)."""
    sequence = make_sequence(100, pinned=True)
    ours, sgd = make_driver(), make_sgd()
    sgd.build(initial_params(), lr=lr, momentum=momentum)
    lr, momentum = sgd.hyperparameters(lr, momentum)
    ours.build(initial_params(), max_lr=lr, momentum=momentum, adjusted_momentum=adjusted)
    for t, step in enumerate(sequence):
        ours.step(step.loss, step.grads)
        sgd.step(step.grads)
        assert bool(_number(ours.state()["capped"])), f"step {t}: gamma left the cap"
    deviation = max_relative_deviation(ours.params(), sgd.params())
    assert deviation <= 1e-12, f"{deviation:.3g} from Nesterov SGD"


def check_sgd_with_lr_gamma_is_its_convention(
    make_driver: Callable[[], Driver], make_sgd: Callable[[], NesterovSGD]
) -> None:
    """The framework's Nesterov SGD, its learning rate set before each step to the gamma
    ALI-G takes, is ALI-G in the convention ``lr_convention`` names and not in the other:
    where the learning rate sits (inside or outside the buffer) tells them apart.

    On the steps of the sequence SGD can take too (no skipped step; missing gradients, and
    the frozen parameter, where the SGD leaves such a parameter alone), with gamma capped
    on some steps and below the cap on others: gamma is the oracle's (1e-12) in both
    conventions, and the SGD's parameters and buffers are ALI-G's and the oracle's (1e-10,
    float64)."""
    sgd = make_sgd()
    sequence = [
        step
        for step in make_sequence(60)  # a frozen parameter from FROZEN_FROM = 50 on
        if step.event in (None, "zero_grads", "loss_below_f_star", "missing_grad")
        and (sgd.missing_gradients or all(g is not None for g in step.grads))
    ]
    max_lr, (_, momentum) = 0.05, sgd.hyperparameters(0.0, 0.9)
    sgd.build(initial_params(), lr=0.0, momentum=0.9)
    ours = sgd.lr_convention
    assert ours in ("standard", "adjusted"), ours
    config = AliGConfig(max_lr=max_lr, momentum=momentum, adjusted_momentum=ours == "adjusted")
    history = run_oracle(config, initial_params(), sequence)
    gammas = [state.gamma for _, state in history]
    assert len(set(gammas)) > 20, "gamma must move"
    assert max_lr in gammas, "gamma must be capped on some steps"
    assert min(gammas) < max_lr, "and below the cap on others"

    runs: dict[str, Driver] = {}
    for convention in ("standard", "adjusted"):
        driver = runs[convention] = make_driver()
        driver.build(
            initial_params(),
            max_lr=max_lr,
            momentum=momentum,
            adjusted_momentum=convention == "adjusted",
        )
        for t, step in enumerate(sequence):
            driver.step(step.loss, step.grads)
            gamma = _number(driver.state()["gamma"])
            assert gamma == pytest.approx(gammas[t], rel=1e-12), f"{convention}, step {t}"
            if convention == ours:
                sgd.step(step.grads, lr=gammas[t])
    other = "adjusted" if ours == "standard" else "standard"
    assert max_relative_deviation(sgd.params(), runs[ours].params()) <= 1e-10
    assert max_relative_deviation(sgd.params(), history[-1][0]) <= 1e-10
    assert max_relative_deviation(sgd.params(), runs[other].params()) > 1e-3
    for i, (a, b) in enumerate(zip(runs[ours].buffers(), sgd.buffers(), strict=True)):
        assert (a is None) == (b is None), f"buffer {i}: {a!r} against SGD's {b!r}"
        if a is not None:
            assert max_relative_deviation([b], [a]) <= 1e-10, f"buffer {i}"


def check_conventions_differ(make_driver: Callable[[], Driver]) -> None:
    """Both conventions over 30 steps of the sequence (gamma moves, skipped steps, missing
    gradients): the parameters differ, so an adapter that ignored ``adjusted_momentum``
    would fail the oracle table."""
    runs, gammas = [], []
    for adjusted in (False, True):
        driver = make_driver()
        driver.build(initial_params(), max_lr=0.05, momentum=0.9, adjusted_momentum=adjusted)
        for step in make_sequence(30):
            driver.step(step.loss, step.grads)
            gammas.append(_number(driver.state()["gamma"]))
        runs.append(driver.params())
    assert len(set(gammas)) > 1, "gamma never moved"
    assert max_relative_deviation(runs[0], runs[1]) > 1e-3


# ---------------------------------------------------------------- the suites


class AdapterSuite:
    """What a framework's test class declares (subclass a suite as ``class Test...``).

    Attributes:
      framework: the name the tables use (``"torch"``, ``"keras"``, ``"jax"``, ``"numpy"``).
      drivers: a name -> a factory of the adapter's :class:`bad_inputs.Driver` (a class or
        ``functools.partial``: stored on the class, a plain function would become a
        method). Tests that take ``make_driver`` run on each, under its name; the others
        run on the first.
    """

    framework: ClassVar[str]
    drivers: ClassVar[dict[str, Callable[[], Driver]]]

    def dtype_scope(self, dtype: str) -> AbstractContextManager[object]:
        """Where a check in ``dtype`` runs (Keras: its ``floatx``); by default, anywhere."""
        return contextlib.nullcontext()

    def first_driver(self) -> Callable[[], Driver]:
        """The driver of the checks that run once (the first of :attr:`drivers`)."""
        return next(iter(self.drivers.values()))

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrizes ``make_driver`` by :attr:`drivers`, and the table rows that apply to
        :attr:`framework` (``step_row``, ``param_row``)."""
        if "make_driver" in metafunc.fixturenames:
            metafunc.parametrize("make_driver", list(self.drivers.values()), ids=list(self.drivers))
        if "step_row" in metafunc.fixturenames:
            metafunc.parametrize("step_row", rows_for(self.framework, STEP_ROWS))
        if "param_row" in metafunc.fixturenames:
            metafunc.parametrize("param_row", rows_for(self.framework, PARAM_ROWS))


class OracleChecks(AdapterSuite):
    """The oracle table on every driver; the conventions differ."""

    @pytest.mark.parametrize("dtype", ["float64", "float32"])
    @pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
    def test_matches_oracle_step_by_step(
        self, case: Case, dtype: str, make_driver: Callable[[], Driver]
    ) -> None:
        with self.dtype_scope(dtype):
            check_oracle_table(make_driver, case, dtype)

    def test_the_two_conventions_differ_when_gamma_moves(self) -> None:
        with self.dtype_scope("float64"):
            check_conventions_differ(self.first_driver())


class NesterovSGDChecks(AdapterSuite):
    """ALI-G against the framework's own Nesterov SGD (:attr:`make_sgd`)."""

    make_sgd: ClassVar[Callable[[], NesterovSGD]]

    @pytest.mark.parametrize(("lr", "momentum"), PINNED_SGD)
    @pytest.mark.parametrize("adjusted", [False, True])
    def test_pinned_at_the_cap_both_conventions_equal_nesterov_sgd(
        self, adjusted: bool, lr: float, momentum: float
    ) -> None:
        with self.dtype_scope("float64"):
            check_pinned_equals_nesterov_sgd(
                self.first_driver(), self.make_sgd, adjusted=adjusted, lr=lr, momentum=momentum
            )

    def test_nesterov_sgd_with_lr_gamma_is_one_convention(self) -> None:
        with self.dtype_scope("float64"):
            check_sgd_with_lr_gamma_is_its_convention(self.first_driver(), self.make_sgd)


class BadInputChecks(AdapterSuite):
    """``bad_inputs``' tables: the step and parameter rows on every driver, the invalid
    hyperparameters on the first (float64: the oracle checks of the rows are)."""

    accepted_hyperparameters: ClassVar[dict[tuple[str, Any], str]] = {}
    """Rows of ``HYPERPARAMETER_ROWS`` this framework takes, each with the test that pins
    what it does instead (optax: ``momentum=None``, its default, as ``optax.sgd``'s)."""

    def test_bad_loss_or_gradient(self, make_driver: Callable[[], Driver], step_row: Row) -> None:
        with self.dtype_scope("float64"):
            check_step_row(make_driver, step_row)

    def test_bad_parameters(self, make_driver: Callable[[], Driver], param_row: ParamRow) -> None:
        with self.dtype_scope("float64"):
            check_param_row(make_driver, param_row)

    @pytest.mark.parametrize(("name", "value"), HYPERPARAMETER_ROWS)
    def test_invalid_hyperparameter(self, name: str, value: Any) -> None:
        if (name, value) in self.accepted_hyperparameters:
            pinned_by = self.accepted_hyperparameters[(name, value)]
            pytest.skip(f"{self.framework} takes {name}={value!r} (pinned by {pinned_by})")
        check_hyperparameter_row(self.first_driver(), name, value)
