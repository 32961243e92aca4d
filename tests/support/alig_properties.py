"""Property tests shared by every adapter: random configurations and random sequences.

Each framework's bad-input test file runs :func:`check_random_run` with its ``Driver`` (see
``bad_inputs.py``) under hypothesis (the suite :class:`RandomRunChecks`), on configurations
drawn from the valid ranges of SPEC.md and (loss, gradient) sequences that mix zeros, tiny
and huge magnitudes. After every step: the parameters equal the oracle's (float64, SPEC's
1e-10), gamma lies in ``[0, max_lr]``, the parameter norm is at most ``max_norm``, and no
NaN appeared.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from alig_cases import max_relative_deviation
from alig_checks import AdapterSuite
from alig_core import AliGConfig
from alig_core.oracle import OracleState, oracle_step
from bad_inputs import SHAPES

__all__ = ["RandomRunChecks", "check_random_run", "configs", "runs"]

MAGNITUDES = (0.0, 1e-30, 1e-8, 1e-3, 1.0, 1e3, 1e8)
"""Gradient scales: exact zeros, tiny, ordinary and huge (float64)."""

configs = st.fixed_dictionaries(
    {
        "max_lr": st.none() | st.floats(1e-4, 10.0),
        "momentum": st.sampled_from([0.0, 0.5, 0.9, 0.99]) | st.floats(0.0, 0.999),
        "adjusted_momentum": st.booleans(),
        "eps": st.sampled_from([0.0, 1e-5]) | st.floats(0.0, 1e-2),
        "f_star": st.sampled_from([0.0]) | st.floats(-1.0, 1.0),
        "max_norm": st.none() | st.floats(0.5, 100.0),
    }
)
"""Hyperparameters anywhere in SPEC.md's valid ranges."""


@st.composite
def _step(draw: st.DrawFn) -> tuple[float, list[np.ndarray | None]]:
    loss = draw(st.sampled_from([0.0, 1e-12, 0.5, 2.0, 1e4]) | st.floats(-1.0, 1e4))
    grads: list[np.ndarray | None] = []
    for shape in SHAPES:
        kind = draw(st.sampled_from(["normal", "normal", "normal", "none"]))
        if kind == "none":
            grads.append(None)
            continue
        scale = draw(st.sampled_from(MAGNITUDES))
        seed = draw(st.integers(0, 2**16))
        grads.append(scale * np.random.default_rng(seed).standard_normal(shape))
    if all(g is None for g in grads):  # that row is in bad_inputs.py (Keras refuses it)
        grads[0] = np.ones(SHAPES[0])
    return loss, grads


runs = st.tuples(st.integers(0, 2**16), st.lists(_step(), min_size=1, max_size=5))
"""(seed of the initial parameters, the sequence of (loss, gradients))."""


def check_random_run(
    make_driver: Callable[[], Any],
    config: dict[str, Any],
    run: tuple[int, list[tuple[float, list[np.ndarray | None]]]],
) -> None:
    """Drives one adapter and the oracle through ``run``; checks the four properties."""
    seed, steps = run
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(shape) * 3.0 for shape in SHAPES]
    driver = make_driver()
    driver.build(params, **config)
    oracle_params = [p.copy() for p in params]
    oracle_state = OracleState.zeros(len(params))
    alig_config = AliGConfig(**config)
    for t, (loss, grads) in enumerate(steps):
        driver.step(loss, grads)
        oracle_params, oracle_state = oracle_step(
            oracle_params, grads, loss, oracle_state, alig_config
        )
        ours = driver.params()
        where = f"step {t} of {steps!r} with {config}"
        assert not any(np.isnan(p).any() for p in ours), f"NaN in the parameters at {where}"
        gamma = float(np.asarray(driver.state()["gamma"]).reshape(()))
        assert 0.0 <= gamma <= (config["max_lr"] or math.inf), f"gamma={gamma} at {where}"
        if config["max_norm"] is not None:
            norm = math.sqrt(sum(float(np.sum(np.square(p))) for p in ours))
            assert norm <= config["max_norm"] * (1 + 1e-12), f"norm {norm} at {where}"
        deviation = max_relative_deviation(ours, oracle_params)
        assert deviation <= 1e-10, f"{deviation:.3g} from the oracle at {where}"


class RandomRunChecks(AdapterSuite):
    """:func:`check_random_run` under hypothesis (60 examples), in float64, each example on
    one of :attr:`random_drivers` (drawn)."""

    random_drivers: ClassVar[tuple[str, ...] | None] = None
    """The names in ``drivers`` an example is drawn from (``None``: all of them)."""

    @settings(max_examples=60, deadline=None)
    @given(config=configs, run=runs, data=st.data())
    def test_random_configurations_and_sequences_follow_the_oracle(
        self, config: dict[str, Any], run: Any, data: st.DataObject
    ) -> None:
        names = self.random_drivers or tuple(self.drivers)
        name = data.draw(st.sampled_from(names), label="driver")
        with self.dtype_scope("float64"):
            check_random_run(self.drivers[name], config, run)
