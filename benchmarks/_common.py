"""What the benchmarks share: a Trainer that does only training (no validation, checkpoints or bars)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def training_only_trainer(**options: Any) -> pl.Trainer:
    """A CPU Trainer for timing training steps; ``options`` (max_steps, logger, callbacks...) override."""
    defaults: dict[str, Any] = dict(
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(options)
    return pl.Trainer(**defaults)
