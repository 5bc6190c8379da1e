"""The lr a real fit trains with after each batch-size change, against the test's own formulas.

Each fit records, with every decision, the noise statistics it was taken from (``grad_sqr``, the
EMA of |G|², and ``grad_var``, of tr Σ). The lr MLflow logged after the change must be lr0 times
the rule's multiplier computed here from those statistics: AdaScale's gain (Johnson et al. 2020),
√(B/B0) or B/B0; and ``--lr-rule auto`` must pick AdaScale for SGD and √ for Adam and AdamW.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lightning_batch.config import RunConfig
from lightning_batch.training import train


def _adascale(b: float, b0: float, grad_sqr: float, trace: float) -> float:
    """r = (σ² + |G|²) / (σ²/S + |G|²) with σ² = tr Σ / B0 and S = B / B0, written out."""
    return (trace / b0 + grad_sqr) / (trace / b + grad_sqr)


RULES = {
    "adascale": lambda d, b0: _adascale(d["to"], b0, d["grad_sqr"], d["grad_var"]),
    "sqrt": lambda d, b0: math.sqrt(d["to"] / b0),
    "linear": lambda d, b0: d["to"] / b0,
}


@pytest.mark.parametrize(
    ("optimizer", "lr_rule", "expected_rule"),
    [
        ("sgd", "auto", "adascale"),
        ("adam", "auto", "sqrt"),
        ("adamw", "auto", "sqrt"),
        ("sgd", "linear", "linear"),  # an explicit rule wins over auto
    ],
)
def test_the_lr_after_each_resize_follows_the_rule_of_the_logged_statistics(
    tracking_uri: str, workdir: Path, optimizer: str, lr_rule: str, expected_rule: str
):
    lr0, b0 = (0.02, 16) if optimizer == "sgd" else (0.002, 16)
    cfg = RunConfig(
        data="synthetic-regression",
        rows=1500,
        features=4,
        batch_size=b0,
        policy="noise",
        lr_rule=lr_rule,
        optimizer=optimizer,
        lr=lr0,
        epochs=1,
        adjust_every=10,
        log_every=1,
        seed=3,
        tracking_uri=tracking_uri,
    )
    result = train(cfg, progress_bar=False, evaluate_test=False)
    client = MlflowClient(tracking_uri)
    decisions = json.loads(
        Path(client.download_artifacts(result.run_id, "batch_size_decisions.json", str(workdir))).read_text()
    )["decisions"]
    changes = [d for d in decisions if d["to"] != b0]
    assert changes, "the fit must have moved the batch away from B0"
    lr_by_step = {m.step: m.value for m in client.get_metric_history(result.run_id, "lr")}
    for decision in decisions:
        expected = RULES[expected_rule](decision, b0)
        assert decision["lr_scale"] == pytest.approx(expected, rel=1e-9), decision
        # the optimizer trained with it from the decision's step on (logged at every step)
        assert lr_by_step[decision["step"]] == pytest.approx(lr0 * expected, rel=1e-6), decision
    # the other rules would have given other numbers: the check tells them apart
    for other, rule in RULES.items():
        if other != expected_rule:
            assert any(d["lr_scale"] != pytest.approx(rule(d, b0), rel=1e-3) for d in changes), other


def test_adamw_in_a_plain_module_gets_the_square_root_rule_times_its_own_schedule():
    """The callback at its default lr rule (auto), in a user's module with AdamW and an epoch StepLR:
    at every step the lr is lr0 × the schedule's factor × √(B/B0), and the resolved rule is logged."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import Logger

    from lightning_batch import DynamicBatchSize

    from .plain_project import PlainDataModule, PlainRegressor

    class AdamWRegressor(PlainRegressor):
        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]

    class Params(Logger):
        name, version = "params", 0
        params: dict = {}

        def log_hyperparams(self, params, *args, **kwargs):
            self.params.update(params)

        def log_metrics(self, metrics, step=None):
            pass

    seen = []

    class LrAtEveryStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            seen.append((trainer.current_epoch, resize.batch_size, len(batch[0]), lr))

    lr0, b0 = 0.01, 16
    resize = DynamicBatchSize(policy="schedule", milestones=[1, 2], schedule_factor=2.0, probe_memory=False)
    logger = Params()
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[resize, LrAtEveryStep()],
    )
    trainer.fit(AdamWRegressor(lr=lr0), datamodule=PlainDataModule(batch_size=b0, rows=640))
    assert logger.params["lr_rule_resolved"] == "sqrt"
    assert {b for _, b, _, _ in seen} == {16, 32, 64}, "the schedule moved the batch"
    assert any(rows < batch for _, batch, rows, _ in seen), "some epoch ends on a short step"
    for epoch, batch, rows, lr in seen:
        # An epoch's short last step: the rule at its own rows, between lr0 and the batch's lr.
        scale = min(max(math.sqrt(rows / b0), 1.0), math.sqrt(batch / b0))
        assert lr == pytest.approx(lr0 * 0.5**epoch * scale, rel=1e-9), (epoch, batch, rows)


def test_every_param_group_is_rescaled_by_the_rule_and_its_scheduler_follows():
    """An optimizer with three param groups at different lrs (as with per-layer lrs or no decay on
    biases), and an epoch LambdaLR, which recomputes each group's lr from its base lr: after the
    schedule doubles the batch, every group trains at its own lr0 × the schedule's factor × B/B0
    (linear rule), not the first group only; a group left behind would train at half the lr the
    rule asks for, and its scheduler would pull it back there at the next epoch."""
    import lightning.pytorch as pl
    import torch

    from lightning_batch import DynamicBatchSize

    from .conftest import quiet_trainer
    from .plain_project import PlainDataModule, PlainRegressor

    lrs0 = (0.05, 0.01, 0.002)

    class PerLayerLrs(PlainRegressor):
        def configure_optimizers(self):
            first, second = self.net[0], self.net[2]
            groups = [
                {"params": [first.weight], "lr": lrs0[0]},
                {"params": [first.bias], "lr": lrs0[1]},
                {"params": list(second.parameters()), "lr": lrs0[2]},
            ]
            optimizer = torch.optim.SGD(groups, lr=1.0)
            decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
            return [optimizer], [decay]

    seen = []

    class LrsAtEveryStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]
            seen.append((trainer.current_epoch, resize.batch_size, len(batch[0]), lrs))

    b0 = 16
    resize = DynamicBatchSize(
        policy="schedule", lr_rule="linear", milestones=[1], schedule_factor=2.0, probe_memory=False
    )
    trainer = quiet_trainer(3, [resize, LrsAtEveryStep()])
    trainer.fit(PerLayerLrs(), datamodule=PlainDataModule(batch_size=b0, rows=320))
    assert [d["to"] for d in resize.decisions] == [32], "the schedule doubled the batch in epoch 1"
    assert {(epoch, batch) for epoch, batch, _, _ in seen} == {(0, 16), (1, 16), (1, 32), (2, 32)}
    assert any(rows < batch for _, batch, rows, _ in seen), "an epoch ends on a short step"
    for epoch, batch, rows, lrs in seen:
        # An epoch's short last step: the rule at its own rows, between lr0 and the batch's lr.
        scale = min(max(rows / b0, 1.0), batch / b0)
        expected = [lr0 * 0.5**epoch * scale for lr0 in lrs0]
        assert lrs == pytest.approx(expected, rel=1e-9), (epoch, batch, rows)


def test_a_checkpoint_saved_during_a_short_step_resumes_at_the_lrs_of_the_unbroken_fit(tmp_path):
    """A user's callback listed before ours saves in the middle of an epoch's short last step, while
    its lr is lowered to the rule's for its rows: the resumed fit trains every later step at the lr
    the unbroken fit did (the batch's lr comes back, not the short step's)."""
    import lightning.pytorch as pl
    import torch

    from lightning_batch import DynamicBatchSize

    from .conftest import quiet_trainer
    from .plain_project import PlainDataModule, PlainRegressor

    class Stop(Exception):
        pass

    class LrsAtEveryStep(pl.Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    class SaveInTheShortStepOfEpoch1(pl.Callback):
        def __init__(self, resize: DynamicBatchSize) -> None:
            self.resize = resize

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and len(batch[0]) < self.resize.batch_size:
                trainer.save_checkpoint(tmp_path / "short.ckpt")
                raise Stop

    def fit(stop: bool, ckpt_path=None) -> tuple[LrsAtEveryStep, DynamicBatchSize]:
        resize = DynamicBatchSize(
            policy="schedule", lr_rule="linear", milestones=[1], schedule_factor=4.0, probe_memory=False
        )
        record = LrsAtEveryStep()
        saver = [SaveInTheShortStepOfEpoch1(resize)] if stop else []
        pl.seed_everything(0, verbose=False)
        trainer = quiet_trainer(3, [*saver, resize, record])
        trainer.fit(
            PlainRegressor(lr=0.01), datamodule=PlainDataModule(batch_size=16, rows=200), ckpt_path=ckpt_path
        )
        return record, resize

    unbroken, _ = fit(stop=False)
    with pytest.raises(Stop):
        fit(stop=True)
    saved = torch.load(tmp_path / "short.ckpt", weights_only=True)
    (own,) = [state for key, state in saved["callbacks"].items() if key.startswith("DynamicBatchSize")]
    assert own["full_step_lr_scale"] == 4.0 and own["lr_scale"] < 4.0, (
        "saved while the short step's lr was lower"
    )
    resumed, _ = fit(stop=False, ckpt_path=tmp_path / "short.ckpt")
    assert resumed.lrs == pytest.approx(unbroken.lrs[-len(resumed.lrs) :], rel=1e-12)
    assert resumed.lrs[0] == pytest.approx(0.04), "the next step trains at the batch's lr"
