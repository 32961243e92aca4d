"""``import alig_torch`` (and ``alig_torch.integrations``) imports none of the trainers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TRAINERS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


@pytest.mark.parametrize("statement", ["import alig_torch", "import alig_torch.integrations"])
def test_importing_alig_torch_imports_no_trainer(statement: str) -> None:
    code = (
        f"import sys, json; {statement}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert "alig_torch" in loaded
    assert [name for name in TRAINERS if name in loaded] == []
