"""alig_core imports no framework (einops-style: a framework loads only when it is used)."""

from __future__ import annotations

from worker_scripts import modules_loaded_by

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "jaxlib", "optax", "numpy")


def test_import_alig_core_loads_no_framework_and_not_even_numpy() -> None:
    loaded = modules_loaded_by("import alig_core")
    assert "alig_core" in loaded
    assert [name for name in FRAMEWORKS if name in loaded] == []


def test_the_oracle_module_imports_numpy_only_when_it_runs() -> None:
    assert "numpy" not in modules_loaded_by("import alig_core.oracle")
