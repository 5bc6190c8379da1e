"""A 2-rank CPU DDP fit with DynamicBatchSize, run as its own script by tests/test_callback.py.

Lightning's DDP launcher re-runs this script for rank 1, so it cannot live inside pytest. Each rank
writes what it did to ``OUT.rank{N}.json``: the rows it trained at every step (by their position in
the training set), each epoch's permutation, the noise estimate it measured at every measured step
and the values its EMAs were fed, its decisions and its final lr.
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
from lightning_batch.data import TabularDataModule  # noqa: E402
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


def spy_on_noise_statistics(resize: DynamicBatchSize, trainer_ref: list) -> tuple[list, list]:
    """Record every local estimate and every value fed to the EMAs, with the step it belongs to."""
    local: list = []
    fed: list = []
    measure, update = resize._local_estimate, resize.ema.update

    def local_estimate(pl_module):
        value = measure(pl_module)
        local.append([trainer_ref[0].global_step, None if value is None else list(value)])
        return value

    def ema_update(grad_sqr, trace):
        fed.append([trainer_ref[0].global_step, grad_sqr, trace])
        return update(grad_sqr, trace)

    resize._local_estimate = local_estimate
    resize.ema.update = ema_update
    return local, fed


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
    trainer_ref: list = []
    local, fed = spy_on_noise_statistics(resize, trainer_ref)
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
    trainer_ref.append(trainer)
    trainer.fit(module, datamodule=dm)
    result = {
        "rank": trainer.global_rank,
        "steps": recorder.steps,
        "global_rows": recorder.global_rows,
        "permutations": recorder.permutations,
        "local_estimates": local,
        "ema_fed": fed,
        "ema": resize.ema.state_dict(),
        "decisions": [d["to"] for d in resize.decisions],
        "n_train": len(dm.train_set),
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "ceiling": resize.ceiling,
    }
    Path(f"{out}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
