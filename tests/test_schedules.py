"""Step-interval lr schedules planned for the starting batch finish when their data are seen.

A user's ``CosineAnnealingLR`` with ``T_max = trainer.estimated_stepping_batches`` and a HuggingFace
linear warm-up and decay, in a plain module with AdamW, while the schedule policy doubles the
batch at each epoch: the last lr is the schedule's floor, and the lr against samples seen is a
fixed-batch run's at the same samples (times the lr rule's √(B/B0)). Without ``schedule_progress``
the same fit ends with the lr far above the floor, which is what the option is for.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from lightning_batch import DynamicBatchSize
from lightning_batch.plugin.schedules import ScheduleProgress, rows_worth

from .plain_project import PlainDataModule, PlainRegressor

LR0, B0, ROWS, EPOCHS = 0.01, 16, 640, 3


class Scheduled(PlainRegressor):
    """AdamW and a per-step schedule sized, as users do, from the Trainer's estimate of the steps."""

    def __init__(self, schedule: str) -> None:
        super().__init__(lr=LR0)
        self.schedule = schedule

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=LR0)
        total = self.trainer.estimated_stepping_batches
        if self.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        else:
            scheduler = get_linear_schedule_with_warmup(
                optimizer, num_warmup_steps=10, num_training_steps=total
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LrBySamples(pl.Callback):
    """``(rows trained before the step, batch size chosen, lr the step trained with)`` per step, the
    rows of each step (an epoch's short last step trains at the lr rule's scale for its own rows),
    and the last lr."""

    def __init__(self, resize: DynamicBatchSize | None = None) -> None:
        self.resize = resize
        self.steps: list[tuple[int, int, float]] = []
        self.rows: list[int] = []
        self.samples = 0
        self.last_lr = math.nan

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        chosen = self.resize.batch_size if self.resize is not None else B0
        self.steps.append((self.samples, chosen, trainer.optimizers[0].param_groups[0]["lr"]))
        self.rows.append(len(batch[0]))
        self.samples += len(batch[0])

    def on_train_end(self, trainer, pl_module):
        self.last_lr = trainer.optimizers[0].param_groups[0]["lr"]


def _fit(schedule: str, callbacks: list, ckpt_path=None) -> LrBySamples:
    record = LrBySamples(next((c for c in callbacks if isinstance(c, DynamicBatchSize)), None))
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        callbacks=[*callbacks, record],
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(
        Scheduled(schedule), datamodule=PlainDataModule(batch_size=B0, rows=ROWS), ckpt_path=ckpt_path
    )
    return record


def _growing(**options) -> DynamicBatchSize:
    return DynamicBatchSize(policy="schedule", milestones=[1, 2], probe_memory=False, **options)


@pytest.mark.parametrize("schedule", ["cosine", "linear-warmup"])
def test_a_step_schedule_ends_at_its_floor_and_follows_samples_as_at_the_starting_batch(schedule):
    fixed = _fit(schedule, [])
    fixed_lr = {samples: lr for samples, _, lr in fixed.steps}
    growing = _fit(schedule, [_growing()])
    assert {b for _, b, _ in growing.steps} == {16, 32, 64}, "the batch grew"
    assert len(growing.steps) < 0.7 * len(fixed.steps)  # 120 steps at B0
    assert growing.last_lr <= 0.01 * LR0 and fixed.last_lr <= 0.01 * LR0
    assert any(rows < batch for (_, batch, _), rows in zip(growing.steps, growing.rows, strict=True))
    for (samples, batch, lr), rows in zip(growing.steps, growing.rows, strict=True):
        # AdamW's rule (auto -> sqrt) scales the schedule's lr by √(B/B0) on top; an epoch's short
        # last step by the rule at its own rows, between 1 and the batch's.
        scale = min(max(math.sqrt(rows / B0), 1.0), math.sqrt(batch / B0))
        assert lr / scale == pytest.approx(fixed_lr[samples], rel=1e-6, abs=1e-12), samples


def test_without_schedule_progress_the_schedule_is_cut_short():
    growing = _fit("cosine", [_growing(schedule_progress=False)])
    assert growing.last_lr / math.sqrt(64 / B0) > 0.3 * LR0, (
        "a step-counted cosine stops a third of the way down"
    )


def test_progress_carries_fractions_and_round_trips_through_its_state():
    progress = ScheduleProgress()
    assert [progress.steps(0, 1.5) for _ in range(4)] == [1, 2, 1, 2]
    assert progress.steps(3, 0.75) == 0
    restored = ScheduleProgress()
    restored.load_state_dict(progress.state_dict())
    assert restored.steps(3, 0.25) == 1 and restored.steps(0, 1.0) == 1
    assert progress.steps(1, -1.0) == 0  # a negative worth never steps back


def test_a_row_is_worth_the_same_share_of_an_epoch_whatever_the_batch():
    # 600 rows at B0=16: 38 steps (the last of 8 rows); each row is 38/600 of a step.
    assert sum(rows_worth(r, 16, 600) for r in [16] * 37 + [8]) == pytest.approx(38)
    assert sum(rows_worth(r, 16, 600) for r in [64] * 9 + [24]) == pytest.approx(38)
    # drop_last: 37 full batches, the 8 left over are never trained.
    assert sum(rows_worth(r, 16, 600, drop_last=True) for r in [16] * 37) == pytest.approx(37)
    assert rows_worth(10, 0, 600) == 1.0


def test_a_resumed_fit_steps_its_schedule_as_an_unbroken_one(tmp_path):
    """The carried fraction is checkpointed: a fit stopped mid-epoch at a batch of 1.5 B0, half a
    schedule step carried, and resumed trains every later step at the lr of the unbroken fit."""

    class Stop(Exception):
        pass

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 47:
                raise Stop

    def fit(callbacks: list, ckpt_path=None) -> LrBySamples:
        resize = DynamicBatchSize(policy="schedule", milestones=[1], schedule_factor=1.5, probe_memory=False)
        saves = [
            pl.callbacks.ModelCheckpoint(
                dirpath=tmp_path, every_n_train_steps=23, save_last=True, save_top_k=0
            )
            for _ in callbacks[:1]  # the stopped fit only: one last.ckpt, its own
        ]
        return _fit("cosine", [resize, *saves, *callbacks], ckpt_path)

    unbroken = fit([])
    with pytest.raises(Stop):
        fit([StopAt()])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (own,) = [state for key, state in saved["callbacks"].items() if key.startswith("DynamicBatchSize")]
    assert saved["global_step"] == 46 and own["batch_size"] == 24
    assert own["schedule_progress"]["carry"] == {"0": 0.5}, "checkpointed with half a schedule step carried"
    resumed = fit([], ckpt_path=tmp_path / "last.ckpt")
    assert [lr for _, _, lr in resumed.steps] == pytest.approx(
        [lr for _, _, lr in unbroken.steps[46:]], rel=1e-12
    )
    assert resumed.last_lr == pytest.approx(unbroken.last_lr, rel=1e-12, abs=1e-15)
