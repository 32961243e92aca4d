"""The Lightning Trainer of the integration tests: on the CPU, writing nothing."""

from __future__ import annotations

from typing import Any

import lightning as L

__all__ = ["quiet_trainer"]


def quiet_trainer(max_steps: int, **options: Any) -> L.Trainer:
    """``L.Trainer`` for ``max_steps`` optimizer steps on the CPU, without a logger, a
    checkpoint, a progress bar or a model summary; ``options`` go to the Trainer."""
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )
