"""alig_core imports no framework (einops-style: a framework loads only when it is used)."""

from __future__ import annotations

import json
import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "jaxlib", "optax", "numpy")


def _modules_loaded_by(statement: str) -> list[str]:
    code = (
        f"import sys, json; {statement}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_alig_core_loads_no_framework_and_not_even_numpy() -> None:
    loaded = _modules_loaded_by("import alig_core")
    assert "alig_core" in loaded
    assert [name for name in FRAMEWORKS if name in loaded] == []


def test_the_oracle_module_imports_numpy_only_when_it_runs() -> None:
    assert "numpy" not in _modules_loaded_by("import alig_core.oracle")
