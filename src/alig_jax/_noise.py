"""The noise of ``extrapolation(mode="noise")``: its key, from ``seed=``, and its draws."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from alig_core._extrapolation_config import validate_seed

__all__ = ["draw_noise", "noise_key"]


def noise_key(seed: Any, key: Any, mode: str) -> tuple[jax.Array | None, Any]:
    """The noise key's (data, implementation) from ``seed`` (or the deprecated ``key``)."""
    if key is not None:
        warnings.warn(
            "extrapolation(key=...) is deprecated: pass seed= (an int >= 0 or a JAX key).",
            DeprecationWarning,
            stacklevel=3,
        )
        if seed is not None:
            raise ValueError(
                f"Got both seed={seed!r} and key={key!r}; key= is the deprecated name of "
                "seed=. Pass seed= only."
            )
        seed = key
    if isinstance(seed, jax.Array) and mode == "noise":
        if not jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            seed = jax.random.wrap_key_data(seed)
        return jax.random.key_data(seed), jax.random.key_impl(seed)
    seed = validate_seed(seed, mode=mode)
    if mode != "noise":
        return None, None
    new_key = jax.random.key(seed)
    return jax.random.key_data(new_key), jax.random.key_impl(new_key)


def draw_noise(
    key_data: jax.Array, impl: Any, iteration: jax.Array | int, like: Sequence[Any]
) -> list[Any]:
    """``xi_t``: one standard normal array per leaf of ``like``, from ``fold_in(key, t)``.

    The noise of iteration ``t`` depends on the key and ``t`` only (so a resumed run draws
    the same): ``jax.random.split(jax.random.fold_in(key, t), n)[i]`` for leaf ``i``.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=impl), iteration)
    keys = jax.random.split(key, len(like))
    return [jax.random.normal(k, jnp.shape(x), x.dtype) for k, x in zip(keys, like, strict=True)]
