"""The terminal's view of a fit: Lightning's TQDM bar with the batch size, lr and noise scale.

The values are read when the bar refreshes (every ``refresh_rate`` steps), from state the module
and :class:`~lightning_batch.plugin.callback.DynamicBatchSize` keep anyway: no extra ``self.log`` per
step and no host sync.

Examples:
    >>> bar = BatchProgressBar()
    >>> bar.refresh_rate
    10
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_batch.plugin.callback import DynamicBatchSize


class BatchProgressBar(TQDMProgressBar):
    """TQDM bar showing ``B`` (rows in the last step, all ranks), ``lr`` and ``gns`` (the noise scale)."""

    def __init__(self, refresh_rate: int = 10) -> None:
        super().__init__(refresh_rate=refresh_rate)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the MLflow run id is in the summary; a version number is noise here
        rows = getattr(pl_module, "_step", {}).get("rows")
        if rows:
            metrics["B"] = int(rows)
        lr = getattr(pl_module, "current_lr", None)
        if isinstance(lr, float):
            metrics["lr"] = f"{lr:.3g}"
        callbacks = getattr(trainer, "callbacks", [])  # set by Lightning's callback connector, undeclared
        resizer = next((c for c in callbacks if isinstance(c, DynamicBatchSize)), None)
        gns = resizer.ema.gns if resizer is not None else None
        if gns is not None and math.isfinite(gns):
            metrics["gns"] = f"{gns:.3g}"
        return metrics

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A resize changes the epoch's step count (DynamicBatchSize tells the loop): follow it.
        total = trainer.num_training_batches
        if self.train_progress_bar.total != total and math.isfinite(total):
            self.train_progress_bar.total = total
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
