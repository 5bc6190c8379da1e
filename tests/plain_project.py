"""A plain Lightning project, as a user has one: no class of lightning_batch in it.

Used by tests/test_plugin.py in-process and, as a script, for fits that must run in their own
process (a SIGKILL from inside the fit, 2-rank DDP):

    python tests/plain_project.py kill CONFIG_JSON KILL_STEP OUT_JSON   # SIGKILL at KILL_STEP
    python tests/plain_project.py fit CONFIG_JSON OUT_JSON [CKPT]       # fit (or resume) to the end

The dataset serves one ``(features, target, index)`` per row through ``__getitem__`` (no
``__getitems__``), so batches go through PyTorch's per-row collate, and each batch says which rows
it holds, even when worker processes load it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class RowDataset(Dataset):
    """y = x·w + noise, one row per index."""

    def __init__(self, rows: int = 1200, features: int = 6, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(rows, features, generator=generator)
        weights = torch.randn(features, 1, generator=generator)
        self.y = self.x @ weights + 0.3 * torch.randn(rows, 1, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[index], self.y[index], int(index)


class PlainRegressor(pl.LightningModule):
    """A two-layer MLP trained with SGD, automatic optimization."""

    def __init__(self, features: int = 6, hidden: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(prediction, target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return self.loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class PlainDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 16, num_workers: int = 0, rows: int = 1200) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dataset = RowDataset(rows)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class RowsTrained(pl.Callback):
    """Per optimizer step: ``[global_step, epoch, [row indices]]`` of the batch it trained."""

    def __init__(self) -> None:
        self.steps: list[list] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append([trainer.global_step, trainer.current_epoch, batch[2].tolist()])


class KillAt(pl.Callback):
    """Write the record, then SIGKILL this process, once ``step`` optimizer steps are done."""

    def __init__(self, step: int, rows: RowsTrained, out: Path) -> None:
        self.step, self.rows, self.out = step, rows, out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            self.out.write_text(json.dumps(self.rows.steps))
            os.kill(os.getpid(), signal.SIGKILL)


def fit(
    config: dict, callbacks: list, ckpt_path: str | None = None, module: PlainRegressor | None = None
) -> tuple[pl.Trainer, PlainRegressor]:
    """Fit the plain project with ``DynamicBatchSize(**config["resize"])`` and ``callbacks``."""
    from lightning_batch import DynamicBatchSize

    pl.seed_everything(config.get("seed", 0), verbose=False)
    module = module or PlainRegressor()
    data = PlainDataModule(
        config.get("batch_size", 16), config.get("num_workers", 0), config.get("rows", 1200)
    )
    probe_memory = False
    if config.get("ceiling"):  # a memory ceiling of this many rows a rank, as if probed
        import lightning_batch.plugin.probe as probe
        from lightning_batch.plugin.memory import MemoryProbeResult

        rows = config["ceiling"]
        found = MemoryProbeResult(
            ceiling=rows, steps=[(rows, rows)], budget_bytes=rows, backend="fake", bytes_per_sample=1.0
        )
        probe.probe_training_ceiling = lambda *args, **kwargs: found
        probe_memory = True
    resize = DynamicBatchSize(**{"probe_memory": probe_memory, **config.get("resize", {})})
    saves = []
    if config.get("checkpoint_every"):
        # The resumable state every N steps, mid-epoch included: last.ckpt in the root folder.
        saves = [
            pl.callbacks.ModelCheckpoint(
                dirpath=config["root"],
                every_n_train_steps=config["checkpoint_every"],
                save_last=True,
                save_top_k=0,
            )
        ]
    trainer = pl.Trainer(
        max_epochs=config.get("epochs", 2),
        accelerator="cpu",
        devices=config.get("devices", 1),
        strategy=config.get("strategy", "auto"),
        logger=config.get("trainer", {}).pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=config.get("root"),
        enable_checkpointing=bool(saves),
        callbacks=[resize, *saves, *callbacks],
        **config.get("trainer", {}),
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    command, config = argv[0], json.loads(argv[1])
    rows = RowsTrained()
    if command == "kill":
        step, out = int(argv[2]), Path(argv[3])
        fit(config, [rows, KillAt(step, rows, out)])
        raise SystemExit("the fit ended before the kill step")
    out = Path(argv[2])
    trainer, module = fit(config, [rows], ckpt_path=argv[3] if len(argv) > 3 else None)
    resize = next(c for c in trainer.callbacks if type(c).__name__ == "DynamicBatchSize")
    result = {
        "steps": rows.steps,
        "decisions": [d["to"] for d in resize.decisions],
        "weights": {k: v.tolist() for k, v in module.state_dict().items()},
    }
    Path(f"{out}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
