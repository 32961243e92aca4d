"""``import alig_torch`` (and ``alig_torch.integrations``) imports none of the trainers."""

from __future__ import annotations

import pytest

from worker_scripts import modules_loaded_by

TRAINERS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


@pytest.mark.parametrize("statement", ["import alig_torch", "import alig_torch.integrations"])
def test_importing_alig_torch_imports_no_trainer(statement: str) -> None:
    loaded = modules_loaded_by(statement)
    assert "alig_torch" in loaded
    assert [name for name in TRAINERS if name in loaded] == []
