"""A 2-rank CPU DDP fit with DynamicBatchSize, run as its own script by tests/test_callback.py.

Lightning's DDP launcher re-runs this script for rank 1, so it cannot live inside pytest. Each rank
writes what it did to ``OUT.rank{N}.json``: the rows it trained at every step (by their position in
the training set), each epoch's permutation, the noise estimate it measured at every measured step
and the values its EMAs were fed (read from the callback's public attributes), its decisions and its final lr.
"""

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402

from lightning_batch.config import RunConfig  # noqa: E402
from lightning_batch.plugin.callback import DynamicBatchSize  # noqa: E402
from lightning_batch.tabular.datamodule import TabularDataModule  # noqa: E402
from lightning_batch.training import build_module, quiet_lightning  # noqa: E402
from tests.kill_at_step import TrainedRows  # noqa: E402


class Recorder(TrainedRows):
    """Rows trained per step (TrainedRows), plus each step's global rows and each epoch's order."""

    def __init__(self) -> None:
        super().__init__()
        self.global_rows: list[int] = []
        self.permutations: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        sampler = trainer.datamodule.train_batch_sampler
        self.permutations[trainer.current_epoch] = sampler.permutation().tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.global_rows.append(trainer.datamodule.train_batch_sampler.last_global_rows)


class NoiseRecorder(pl.Callback):
    """After DynamicBatchSize's own batch-end hook (it comes first in the callbacks): each measured
    step's local estimate on this rank, and the all-ranks value the EMAs were fed."""

    def __init__(self, resize: DynamicBatchSize) -> None:
        self.resize = resize
        self.local: list = []
        self.fed: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        meter = self.resize.measurement.meter
        if meter is None or not meter.measuring:
            return
        estimate = meter.last_estimate
        self.local.append([trainer.global_step, None if estimate is None else list(estimate)])
        if self.resize.measurement.last is not None:
            self.fed.append([trainer.global_step, *self.resize.measurement.last])


def main(out: str) -> None:
    quiet_lightning()
    cfg = RunConfig(
        data="synthetic-regression", rows=2200, features=4, batch_size=15, lr=0.05, epochs=2
    ).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    module = build_module(cfg, dm)
    recorder = Recorder()
    # multiple=1: global batches of any size, odd ones included (a rank's share then differs by one).
    resize = DynamicBatchSize(
        policy="noise",
        lr_rule="sqrt",
        adjust_every=5,
        measure_every=2,
        min_batch=7,
        max_batch=301,
        multiple=1,
    )
    noise = NoiseRecorder(resize)
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
        callbacks=[resize, recorder, noise],
    )
    trainer.fit(module, datamodule=dm)
    result = {
        "rank": trainer.global_rank,
        "steps": recorder.steps,
        "global_rows": recorder.global_rows,
        "permutations": recorder.permutations,
        "local_estimates": noise.local,
        "ema_fed": noise.fed,
        "ema": resize.ema.state_dict(),
        "decisions": [d["to"] for d in resize.decisions],
        "n_train": len(dm.train_set),
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "ceiling": resize.ceiling,
        "samples_seen": module.samples_seen,
        "epochs": cfg.epochs,
    }
    Path(f"{out}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
