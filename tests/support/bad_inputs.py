"""The one table of bad inputs, and the checks every adapter runs it through.

Each framework's ``test_*_bad_inputs.py`` implements a :class:`Driver` (how to build its
optimizer on NumPy parameters, hand it a loss and gradients, and read its parameters and
state back as NumPy) and runs every row of :data:`STEP_ROWS`, :data:`PARAM_ROWS` and
:data:`HYPERPARAMETER_ROWS` through :func:`check_step_row`, :func:`check_param_row` and
:func:`check_hyperparameter_row`. A row added here is checked in torch, Keras (three
backends) and optax.

The outcomes, per SPEC.md:

- ``"skipped"``: a non-finite loss or gradient norm. Parameters and every piece of
  optimizer state are bit-for-bit unchanged, the skip counter moved by one, and the next
  normal step gives bit-for-bit what it gives in a run that never saw the bad step.
- ``"taken"``: an unusual but valid input (a loss below ``f_star``, zero gradients with
  ``eps=0``, no gradient at all, mixed dtypes). The step equals the oracle's, and the
  recorded step size is the one SPEC.md prescribes.
- ``"error"``: a ``ValueError`` whose message names the input or argument, the value
  given, and what to do instead; parameters are left untouched.

Where a framework's own rules differ (Keras' base optimizer refuses a step where no
variable has a gradient, so AliG raises a clear error there), ``Row.outcome_by_framework``
says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pytest

from alig_cases import Step, max_relative_deviation, run_oracle
from alig_core import AliGConfig

__all__ = [
    "BASE_CONFIG",
    "HYPERPARAMETER_ROWS",
    "MISSING",
    "PARAM_ROWS",
    "SHAPES",
    "STEP_ROWS",
    "Driver",
    "ParamRow",
    "Row",
    "check_hyperparameter_row",
    "check_param_row",
    "check_step_row",
    "rows_for",
]


class _Missing:
    """The loss that was never handed over (no closure, no ``loss=``, no ``value=``)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

BASE_CONFIG: dict[str, Any] = {"max_lr": 0.1, "momentum": 0.9, "max_norm": 4.0}
"""The configuration of the step rows: momentum buffers to keep, a cap, a projection."""

SHAPES: tuple[tuple[int, ...], ...] = ((3, 2), (4,), ())
GOOD_LOSSES: tuple[float, float] = (0.8, 1.3)
"""The normal steps around the bad one."""


class Driver(Protocol):
    """One adapter, seen from the tables: NumPy in, NumPy out."""

    framework: str
    loss_help: str
    """A phrase of the adapter's "how to pass the loss" help (in every missing-loss error)."""
    advances_on_skip: frozenset[str]
    """State entries besides ``steps_skipped`` that count every call, skipped ones too
    (Keras' ``iterations``). Each must move by exactly one on a skipped step."""

    def build(self, params: Sequence[np.ndarray], **config: Any) -> None:
        """Creates the parameters (in their NumPy dtypes) and the optimizer."""

    def step(self, loss: Any, grads: Sequence[np.ndarray | None], *, sparse: bool = False) -> None:
        """One step: ``loss`` as given (float, array, str, None or MISSING); ``grads[i]`` is
        ``None`` for a parameter without a gradient."""

    def params(self) -> list[np.ndarray]:
        """The current parameters."""

    def state(self) -> dict[str, np.ndarray]:
        """Every piece of optimizer state (buffers, recorded step sizes, counters), by a
        name; must hold the records ``gamma``, ``gamma_hat``, ``capped``, ``steps_taken``
        and ``steps_skipped``."""

    def buffers(self) -> list[np.ndarray | None]:
        """The momentum buffer of each parameter, in the order of :meth:`build`; ``None``
        where the adapter holds none (momentum 0, or never a gradient)."""


@dataclass(frozen=True)
class Row:
    """A bad loss or gradient at the middle one of three steps."""

    name: str
    outcome: str
    loss: Any = None
    """The loss of the bad step, used when ``loss_is_given`` (else an ordinary loss)."""
    loss_is_given: bool = False
    """True when ``loss`` (even ``None``) is the value handed over."""
    grads: Callable[[list[np.ndarray]], list[np.ndarray | None]] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    sparse: bool = False
    gamma: float | None = None
    """For a taken row: the step size SPEC.md prescribes for the bad step."""
    words: tuple[str, ...] = ()
    """For an error row: what the message must contain (``{help}``: the driver's phrase)."""
    frameworks: frozenset[str] = frozenset({"torch", "jax", "keras"})
    outcome_by_framework: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    def outcome_for(self, framework: str) -> tuple[str, tuple[str, ...]]:
        return self.outcome_by_framework.get(framework, (self.outcome, self.words))


def _set(index: int, position: tuple[int, ...], value: float):
    def change(grads: list[np.ndarray]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [g.copy() for g in grads]
        out[index][position] = value  # type: ignore[index]
        return out

    return change


def _zeros(grads: list[np.ndarray]) -> list[np.ndarray | None]:
    return [np.zeros_like(g) for g in grads]


def _none(grads: list[np.ndarray]) -> list[np.ndarray | None]:
    return [None for _ in grads]


def _huge(grads: list[np.ndarray]) -> list[np.ndarray | None]:
    """Finite gradients whose squared norm overflows (float64: 1e200**2 = inf)."""
    return [g * 1e200 for g in grads]


STEP_ROWS: tuple[Row, ...] = (
    Row("nan_loss", "skipped", loss=math.nan, loss_is_given=True),
    Row("pos_inf_loss", "skipped", loss=math.inf, loss_is_given=True),
    Row("neg_inf_loss", "skipped", loss=-math.inf, loss_is_given=True),
    Row("nan_in_one_gradient_element", "skipped", grads=_set(0, (1, 0), math.nan)),
    Row("pos_inf_in_one_gradient_element", "skipped", grads=_set(1, (2,), math.inf)),
    Row("neg_inf_in_one_gradient_element", "skipped", grads=_set(2, (), -math.inf)),
    Row("finite_gradients_whose_norm_overflows", "skipped", grads=_huge),
    Row("loss_below_f_star", "taken", loss=-0.5, loss_is_given=True, gamma=0.0),
    Row(
        "loss_below_nonzero_f_star",
        "taken",
        loss=0.2,
        loss_is_given=True,
        config={"f_star": 0.5},
        gamma=0.0,
    ),
    Row("all_zero_gradients_with_eps_0", "taken", grads=_zeros, config={"eps": 0.0}, gamma=0.0),
    Row(
        "no_gradient_on_any_parameter",
        "taken",
        grads=_none,
        outcome_by_framework={
            # Keras' base optimizer refuses such a step, and AliG keeps its message.
            "keras": ("error", ("no gradients provided for any variable",)),
        },
    ),
    Row(
        "loss_is_a_batch_vector",
        "error",
        loss=np.array([0.5, 0.7, 0.9]),
        loss_is_given=True,
        words=("scalar", "(3,)", "mean"),
    ),
    Row("loss_is_a_string", "error", loss="0.5", loss_is_given=True, words=("'0.5'", "{help}")),
    Row("loss_is_complex", "error", loss=1.0 + 2.0j, loss_is_given=True, words=("real", "pass")),
    Row("loss_is_none", "error", loss=None, loss_is_given=True, words=("{help}",)),
    Row("loss_is_missing", "error", loss=MISSING, loss_is_given=True, words=("{help}",)),
    Row(
        "sparse_gradient",
        "error",
        sparse=True,
        words=("sparse", "dense"),
        frameworks=frozenset({"torch"}),
    ),
)
"""Bad losses and gradients, each at the middle one of three steps."""


@dataclass(frozen=True)
class ParamRow:
    """Parameters the optimizer is built on."""

    name: str
    outcome: str
    dtypes: tuple[str, ...]
    words: tuple[str, ...] = ()
    frameworks: frozenset[str] = frozenset({"torch", "jax", "keras"})


PARAM_ROWS: tuple[ParamRow, ...] = (
    # optax takes an empty tree, as optax.sgd (tests/jax/test_jax_generic_invariants.py), and
    # Keras' optimizers build on [] (a model with nothing to train), and so does AliG
    # (tests/keras/test_keras_generic_invariants.py): only torch refuses, as torch.optim does.
    ParamRow(
        "empty_parameter_list",
        "error",
        (),
        words=("empty", "pass"),
        frameworks=frozenset({"torch"}),
    ),
    ParamRow(
        "integer_parameter", "error", ("float64", "int32"), words=("int32", "floating", "leave")
    ),
    ParamRow(
        "complex_parameter",
        "error",
        ("float64", "complex128"),
        words=("complex128", "floating", "real and imaginary"),
    ),
    ParamRow("mixed_float32_and_float64", "taken", ("float32", "float64", "float64")),
)

_INVALID: dict[str, tuple[Any, ...]] = {
    "max_lr": (-0.1, 0.0, math.nan, math.inf, -math.inf, "0.1", True),
    "momentum": (-0.5, 1.0, 1.5, math.nan, math.inf, "0.9", None),
    "adjusted_momentum": ("yes", 1, None),
    "eps": (-1e-5, math.nan, math.inf, "1e-5", None),
    "f_star": (math.nan, math.inf, -math.inf, "0", None),
    "max_norm": (-1.0, 0.0, math.nan, math.inf, "10", False),
}
HYPERPARAMETER_ROWS: tuple[tuple[str, Any], ...] = tuple(
    (name, value) for name, values in _INVALID.items() for value in values
)
"""Every invalid hyperparameter: negative, zero, NaN, inf, a wrong type, momentum >= 1."""


def rows_for(framework: str, rows: Sequence[Any]) -> list[Any]:
    """The rows that apply to ``framework``, as pytest params with readable ids."""
    return [pytest.param(r, id=r.name) for r in rows if framework in r.frameworks]


# ---------------------------------------------------------------- the checks


def _initial_params(dtypes: Sequence[str] = ("float64",) * 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal(shape).astype(dtype)
        for shape, dtype in zip(SHAPES, dtypes, strict=False)
    ]


def _grads(seed: int, dtypes: Sequence[str] = ("float64",) * 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal(shape).astype(dtype)
        for shape, dtype in zip(SHAPES, dtypes, strict=False)
    ]


def _number(value: np.ndarray) -> float:
    """A recorded scalar (0-d, or a 1-element array) as a Python number."""
    return np.asarray(value).reshape(()).item()


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_params_bitwise(actual: list[np.ndarray], expected: list[np.ndarray], when: str) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert _bitwise_equal(a, e), f"{when}: parameter {i} changed: {a!r} != {e!r}"


def _value_error(action: Callable[[], object], what: str) -> ValueError:
    """The ValueError ``action`` raises (its message is checked word by word after)."""
    try:
        action()
    except ValueError as error:
        return error
    pytest.fail(f"no ValueError for {what}")


def _message_check(error: BaseException, words: Sequence[str], loss_help: str) -> None:
    message = str(error)
    for word in words:
        word = word.replace("{help}", loss_help)
        assert word.lower() in message.lower(), f"{word!r} is not in the message: {message!r}"


def _oracle(
    config: dict[str, Any],
    params: list[np.ndarray],
    steps: Sequence[tuple[float, Sequence[np.ndarray | None]]],
) -> list[np.ndarray]:
    """The oracle's parameters after ``steps`` of (loss, gradients)."""
    sequence = [Step(loss=loss, grads=tuple(grads), event=None) for loss, grads in steps]
    return run_oracle(AliGConfig(**config), params, sequence)[-1][0]


def check_step_row(make_driver: Callable[[], Driver], row: Row) -> None:
    """Runs ``row`` between two normal steps and asserts its outcome."""
    config = {**BASE_CONFIG, **row.config}
    first_grads, last_grads = _grads(1), _grads(2)
    bad_grads = row.grads(_grads(3)) if row.grads else _grads(3)
    bad_loss = row.loss if row.loss_is_given else 1.1

    driver = make_driver()
    driver.build(_initial_params(), **config)
    outcome, words = row.outcome_for(driver.framework)
    driver.step(GOOD_LOSSES[0], first_grads)
    params_before, state_before = driver.params(), driver.state()

    if outcome == "error":
        error = _value_error(lambda: driver.step(bad_loss, bad_grads, sparse=row.sparse), row.name)
        _message_check(error, words, driver.loss_help)
        _assert_params_bitwise(driver.params(), params_before, "after the refused step")
        return

    driver.step(bad_loss, bad_grads)
    state_after = driver.state()
    if outcome == "skipped":
        _check_first_step_skipped_outside_the_ball(make_driver, config, bad_loss, bad_grads)
        _assert_params_bitwise(driver.params(), params_before, "after the skipped step")
        for key, before in state_before.items():
            after = state_after[key]
            if key == "steps_skipped" or key in driver.advances_on_skip:
                assert _number(after) == _number(before) + 1, f"{key}: {before} -> {after}"
            else:
                assert _bitwise_equal(after, before), f"state {key!r} changed on a skipped step"
        # The next normal step: as if the bad one never happened.
        driver.step(GOOD_LOSSES[1], last_grads)
        reference = make_driver()
        reference.build(_initial_params(), **config)
        reference.step(GOOD_LOSSES[0], first_grads)
        reference.step(GOOD_LOSSES[1], last_grads)
        _assert_params_bitwise(driver.params(), reference.params(), "after the next step")
        ours, theirs = driver.state(), reference.state()
        for key, value in theirs.items():
            if key == "steps_skipped" or key in driver.advances_on_skip:
                assert _number(ours[key]) == _number(value) + 1
            else:
                assert _bitwise_equal(ours[key], value), f"state {key!r} differs after next step"
        return

    assert outcome == "taken", outcome
    assert _number(state_after["steps_taken"]) == _number(state_before["steps_taken"]) + 1
    assert _number(state_after["steps_skipped"]) == _number(state_before["steps_skipped"])
    if row.gamma is not None:
        assert _number(state_after["gamma"]) == row.gamma
    driver.step(GOOD_LOSSES[1], last_grads)
    expected = _oracle(
        config,
        _initial_params(),
        [(GOOD_LOSSES[0], first_grads), (float(bad_loss), bad_grads), (GOOD_LOSSES[1], last_grads)],
    )
    _assert_close(driver.params(), expected, 1e-10)


def _check_first_step_skipped_outside_the_ball(
    make_driver: Callable[[], Driver],
    config: dict[str, Any],
    bad_loss: Any,
    bad_grads: Sequence[np.ndarray | None],
) -> None:
    """A skipped first step leaves parameters outside the ``max_norm`` ball where they are.

    The projection follows a step taken, never a skipped one: after a normal step the
    parameters are inside the ball and a projection would change nothing, so only a skip
    that meets them outside it (here the first step, the ball half their norm) tells.
    """
    start = _initial_params()
    radius = 0.5 * math.sqrt(sum(float(np.sum(p.astype(np.float64) ** 2)) for p in start))
    driver = make_driver()
    driver.build(start, **{**config, "max_norm": radius})
    driver.step(bad_loss, bad_grads)
    _assert_params_bitwise(driver.params(), start, "after a skipped first step (max_norm)")


def _assert_close(actual: list[np.ndarray], expected: list[np.ndarray], tolerance: float) -> None:
    deviation = max_relative_deviation(actual, expected)
    assert deviation <= tolerance, f"{deviation:.3g} from the oracle"


def check_param_row(make_driver: Callable[[], Driver], row: ParamRow) -> None:
    """Builds the optimizer on the row's parameters (and steps): an error, or the oracle."""
    driver = make_driver()
    params = _initial_params(row.dtypes)[: len(row.dtypes)]
    grads = [_grads(seed, row.dtypes)[: len(row.dtypes)] for seed in (1, 2, 3)]
    if row.outcome == "error":

        def build_and_step() -> None:
            driver.build(params, **BASE_CONFIG)
            driver.step(GOOD_LOSSES[0], grads[0])  # if building did not refuse them

        _message_check(_value_error(build_and_step, row.name), row.words, driver.loss_help)
        return
    driver.build(params, **BASE_CONFIG)
    losses = (GOOD_LOSSES[0], 1.1, GOOD_LOSSES[1])
    for loss, g in zip(losses, grads, strict=True):
        driver.step(loss, g)
    for p, dtype in zip(driver.params(), row.dtypes, strict=True):
        assert p.dtype == np.dtype(dtype), f"a {dtype} parameter came back as {p.dtype}"
    # float32 parameters round every step to float32: SPEC's float32 tolerance.
    expected = _oracle(BASE_CONFIG, params, list(zip(losses, grads, strict=True)))
    _assert_close(driver.params(), expected, 1e-5)


def check_hyperparameter_row(make_driver: Callable[[], Driver], name: str, value: Any) -> None:
    """Building with ``name=value`` raises a ValueError naming both and the valid range."""
    driver = make_driver()
    error = _value_error(
        lambda: driver.build(_initial_params(), **{**BASE_CONFIG, name: value}), f"{name}={value!r}"
    )
    _message_check(error, (f"Invalid {name}", repr(value), "expected", "Pass"), "")
