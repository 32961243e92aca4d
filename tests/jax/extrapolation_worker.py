"""The optax extrapolation wrapper on the shared extrapolation table; resume worker too.

Imported by the tests of tests/jax (``import_script``) for :func:`build` and :func:`run`;
run as a script by test_jax_extrapolation_resume.py to resume in a new process.

Usage: python extrapolation_worker.py CASE CHECKPOINT OUT. Builds a fresh wrapper and fresh
(zero) params for the row CASE of extrapolation_cases (float64), restores the params and
the state from CHECKPOINT (an .npz of their leaves, into the structure of ``tx.init``),
continues the calls from SPLIT to TOTAL under ``jax.jit`` and writes the params and the
state's leaves to OUT (.npz).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from alig_core import AliGConfig  # noqa: E402
from alig_core.oracle_extrapolation import SGDNesterov  # noqa: E402
from alig_jax import AliGState, alig, anchor_params, extrapolation  # noqa: E402
from alig_jax._noise import draw_noise  # noqa: E402
from extrapolation_cases import (  # noqa: E402
    CASES,
    SEED,
    ExtrapolationCase,
    Problem,
    initial_params,
    wrapper_options,
)
from jax_checkpoints import load, save  # noqa: E402

TOTAL, SPLIT = 61, 33
"""Calls in all, and where the run is cut (odd: in "gradient" mode the params hold w~)."""


def jax_cases() -> tuple[ExtrapolationCase, ...]:
    """The rows this adapter runs: every row in the alternating form (its one call form).

    "past" and "noise" rows of the same-batch form are the same loop and left out; the
    same-batch variants of "gradient" mode (correction off, an lr_x schedule) run
    alternating.
    """
    cases: dict[str, ExtrapolationCase] = {}
    for case in CASES:
        if case.call_form != "alternating":
            if case.mode != "gradient" or not case.label:
                continue
            case = replace(case, call_form="alternating")
        cases.setdefault(case.name, case)
    return tuple(cases.values())


def base_transformation(case: ExtrapolationCase) -> optax.GradientTransformation:
    """The optax base of ``case``: ``alig`` or ``optax.sgd(nesterov=True)``.

    SGD with ``lr_x=None`` is built under ``inject_hyperparams`` (so that its learning rate,
    the default ``lr_x``, is in its state); with a given ``lr_x``, plain.
    """
    config = case.base_config
    if isinstance(config, SGDNesterov):
        kwargs = {"learning_rate": config.lr, "momentum": config.momentum, "nesterov": True}
        if case.lr_x is None:
            return optax.inject_hyperparams(optax.sgd)(**kwargs)
        return optax.sgd(**kwargs)
    assert isinstance(config, AliGConfig)
    return alig(**asdict(config))


def wrapper(case: ExtrapolationCase, **options: Any) -> optax.GradientTransformationExtraArgs:
    """``extrapolation(base)`` with the row's options (``options`` override them)."""
    kwargs = wrapper_options(case.config) | options
    return extrapolation(base_transformation(case), **kwargs)


def build(case: ExtrapolationCase | str, dtype: Any = np.float64, fresh: bool = False):
    """(tx, params, state) for ``case`` from :func:`initial_params` (zeros where fresh)."""
    if isinstance(case, str):
        case = next(c for c in jax_cases() if c.name == case)
    tx = wrapper(case)
    params = [
        jnp.asarray((np.zeros_like(p) if fresh else p).astype(dtype)) for p in initial_params()
    ]
    return tx, params, tx.init(params)


def oracle_noise(state: Any, like: list[jax.Array]):
    """``noise(t)`` for the oracle: the wrapper's own draws, as float64."""
    impl = jax.random.key_impl(jax.random.key(SEED))

    def noise(t: int) -> list[np.ndarray]:
        draws = draw_noise(state.key, impl, t, like)
        return [np.asarray(x, dtype=np.float64) for x in draws]

    return noise


def evaluate(problem: Problem, params: list[jax.Array], batch: int, dtype: Any):
    """The problem's (loss, grads) at ``params``, as arrays of ``dtype`` (``None`` kept)."""
    with np.errstate(all="ignore"):
        loss, grads = problem.evaluate([np.asarray(p) for p in params], batch)
    return (
        jnp.asarray(loss, dtype),
        [None if g is None else jnp.asarray(np.asarray(g, dtype)) for g in grads],
    )


def jax_update(tx):
    """The jitted ``tx.update``."""
    return jax.jit(tx.update)


def apply(params, updates):
    """``optax.apply_updates``: the params land where the wrapper says."""
    return optax.apply_updates(params, updates)


def run(tx, params, state, problem: Problem, start: int, stop: int, dtype: Any = np.float64):
    """Calls ``start`` to ``stop`` (call k on minibatch k) under ``jax.jit``: (params, state)."""
    update = jax_update(tx)
    params = [jnp.asarray(p) for p in params]
    for batch in range(start, stop):
        loss, grads = evaluate(problem, params, batch, dtype)
        updates, state = update(grads, state, params, value=loss)
        params = apply(params, updates)
    return params, state


def anchor(state, params) -> list[np.ndarray]:
    return [np.asarray(a) for a in anchor_params(state, params)]


def alig_state(state) -> AliGState | None:
    found = [
        s
        for s in jax.tree.leaves(state.base_state, is_leaf=lambda x: isinstance(x, AliGState))
        if isinstance(s, AliGState)
    ]
    return found[0] if found else None


def base_buffers(state) -> list[np.ndarray]:
    """The base's momentum buffers: ALI-G's ``momentum``, or optax.sgd's trace."""
    found = alig_state(state)
    if found is not None:
        return [np.asarray(b) for b in found.momentum_buffer]
    traces = [
        s
        for s in jax.tree.leaves(
            state.base_state, is_leaf=lambda x: isinstance(x, optax.TraceState)
        )
        if isinstance(s, optax.TraceState)
    ]
    return [np.asarray(b) for b in traces[0].trace]


def problem_at(calls_made: int) -> Problem:
    """The problem as it is after ``calls_made`` calls (one evaluation per call)."""
    problem = Problem()
    problem.evaluations = calls_made
    return problem


if __name__ == "__main__":
    case_name, checkpoint, out = sys.argv[1:]
    tx, params, _ = build(case_name, fresh=True)
    params, state = load(tx, params, checkpoint)
    params, state = run(tx, params, state, problem_at(SPLIT), SPLIT, TOTAL)
    save(params, state, out)
