"""A 2-rank CPU DDP fit with DynamicBatchSize, run as its own script by tests/test_callback.py.

Lightning's DDP launcher re-runs this script for rank 1, so it cannot live inside pytest. Each rank
writes what it saw — the global batch size of every step and the rows of every epoch — to
``OUT.rank{N}.json``.
"""

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402

from lightning_batch.callback import DynamicBatchSize  # noqa: E402
from lightning_batch.config import RunConfig  # noqa: E402
from lightning_batch.data import TabularDataModule, TensorTableDataset  # noqa: E402
from lightning_batch.training import build_module, quiet_lightning  # noqa: E402


class RecordingDataset(TensorTableDataset):
    """Remembers every batch of row indices it served."""

    def __init__(self, base: TensorTableDataset) -> None:
        super().__init__(base.features, base.targets)
        self.served: list[list[int]] = []

    def __getitems__(self, indices):
        self.served.append([int(i) for i in indices])
        return super().__getitems__(indices)


class Recorder(pl.Callback):
    def __init__(self, dataset: RecordingDataset) -> None:
        self.dataset = dataset
        self.sizes: list[int] = []
        self.epochs: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.dataset.served.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sizes.append(int(trainer.datamodule.batch_size))

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs[trainer.current_epoch] = [i for batch in self.dataset.served for i in batch]


def main(out: str) -> None:
    quiet_lightning()
    cfg = RunConfig(
        data="synthetic-regression", rows=3000, features=4, batch_size=16, lr=0.05, epochs=3
    ).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    dataset = RecordingDataset(dm.prepared.train)
    dm.prepared.train = dataset
    module = build_module(cfg, dm)
    recorder = Recorder(dataset)
    resize = DynamicBatchSize(policy="noise", lr_rule="sqrt", adjust_every=5, min_batch=8, max_batch=512)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=cfg.epochs,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[resize, recorder],
    )
    trainer.fit(module, datamodule=dm)
    result = {
        "rank": trainer.global_rank,
        "sizes": recorder.sizes,
        "epochs": recorder.epochs,
        "decisions": [d["to"] for d in resize.decisions],
        "n_train": len(dataset),
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "ceiling": resize.ceiling,
    }
    Path(f"{out}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
