"""Checkpoint and resume in a new process (run by test_jax_resume.py).

Usage: python resume_worker.py CASE CHECKPOINT OUT. Builds fresh parameters (zeros) and a
fresh ``alig`` for the configuration CASE of alig_cases, restores the params and the
optimizer state from CHECKPOINT (an .npz of their leaves, restored into the structure of
``tx.init``), continues the shared sequence from SPLIT to TOTAL under ``jax.jit`` and
writes the parameters and the state's leaves to OUT (.npz).
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from alig_cases import CASES, initial_params, make_sequence  # noqa: E402
from alig_jax import alig  # noqa: E402
from jax_checkpoints import load, save  # noqa: E402
from jax_driver import apply  # noqa: E402

TOTAL, SPLIT = 60, 27
"""Steps in all, and where the run is cut (after skipped steps, before the frozen layer)."""


def build(case_name: str, fresh: bool = False):
    case = next(c for c in CASES if c.name == case_name)
    tx = alig(**case.kwargs)
    params = [jnp.asarray(np.zeros_like(p) if fresh else p) for p in initial_params()]
    return tx, params, tx.init(params)


def run(tx, params, state, start: int, stop: int):
    update = jax.jit(tx.update)
    for step in make_sequence(TOTAL)[start:stop]:
        grads = [None if g is None else jnp.asarray(g) for g in step.grads]
        updates, state = update(grads, state, params, value=step.loss)
        params = apply(params, updates)
    return params, state


if __name__ == "__main__":
    case_name, checkpoint, out = sys.argv[1:]
    tx, params, _ = build(case_name, fresh=True)
    params, state = load(tx, params, checkpoint)
    params, state = run(tx, params, state, SPLIT, TOTAL)
    save(params, state, out)
