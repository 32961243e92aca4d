"""An optax checkpoint as the leaves of (params, state) in one NumPy ``.npz`` file.

The resume workers of tests/jax (``CASE CHECKPOINT OUT``) restore with :func:`load` into the
structure of a fresh ``tx.init``, as a user's own checkpointing (orbax, or NumPy) restores
the leaves of an optax state, and write what they end with by :func:`save`;
:func:`resume_in_a_new_process` runs one of them on a checkpoint of this process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from worker_scripts import run_script

__all__ = ["assert_bitwise_equal", "leaves", "load", "resume_in_a_new_process", "save"]


def leaves(params: Sequence[Any], state: Any) -> dict[str, np.ndarray]:
    """Every parameter and every leaf of ``state``, by a name (``params_i``, ``state_i``)."""
    out = {f"params_{i}": np.asarray(p) for i, p in enumerate(params)}
    return out | {f"state_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}


def save(params: Sequence[Any], state: Any, path: str | Path) -> None:
    """Writes :func:`leaves` to ``path``."""
    np.savez(path, **leaves(params, state))


def load(
    tx: optax.GradientTransformation, params: Sequence[Any], path: str | Path
) -> tuple[list[jax.Array], Any]:
    """The parameters (as many as ``params``) and the state of ``tx``, read from ``path``."""
    saved = np.load(path)
    params = [jnp.asarray(saved[f"params_{i}"]) for i in range(len(params))]
    structure = jax.tree.structure(tx.init(params))
    state_leaves = [jnp.asarray(saved[f"state_{i}"]) for i in range(structure.num_leaves)]
    return params, jax.tree.unflatten(structure, state_leaves)


def resume_in_a_new_process(
    worker: Path, case_name: str, params: Sequence[Any], state: Any, folder: Path
) -> dict[str, np.ndarray]:
    """Saves (params, state), has ``worker`` resume from them in a new process (on one
    device), and returns the leaves it ended with."""
    save(params, state, folder / "checkpoint.npz")
    run_script(
        worker,
        case_name,
        folder / "checkpoint.npz",
        folder / "resumed.npz",
        env={"XLA_FLAGS": ""},  # one device is enough here
    )
    return dict(np.load(folder / "resumed.npz"))


def assert_bitwise_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """The same leaves, each of the same dtype and the same bits."""
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert actual[name].tobytes() == value.tobytes(), name
