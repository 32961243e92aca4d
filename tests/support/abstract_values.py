"""A value that stands for a traced one (a JAX tracer inside ``jit``): the validators of
``alig_core`` cannot check it and must accept it unchecked (it was checked at construction)."""

from __future__ import annotations

__all__ = ["AbstractScalar"]


class AbstractScalar:
    """0-d, a float dtype, but no concrete value: ``float()`` raises as a tracer's does."""

    shape = ()
    dtype = "float32"

    def __float__(self) -> float:
        raise TypeError("abstract value")
