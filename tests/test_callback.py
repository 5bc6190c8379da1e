"""DynamicBatchSize in real Lightning fits: resizing mid-epoch, lr rules, OOM, resume, DDP, MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from mlflow import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from lightning_batch.config import RunConfig
from lightning_batch.plugin.callback import DynamicBatchSize, sync_epoch_length
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.tabular.networks import LinearRegression
from lightning_batch.tabular.tables import TensorTableDataset
from lightning_batch.tabular.task_module import TaskModule
from lightning_batch.training import build_module, train

from .conftest import ROOT, quiet_trainer, subprocess_env


class RecordingDataset(TensorTableDataset):
    def __init__(self, base: TensorTableDataset) -> None:
        super().__init__(base.features, base.targets)
        self.served: list[list[int]] = []

    def __getitems__(self, indices):
        self.served.append([int(i) for i in indices])
        return super().__getitems__(indices)


class EpochRecorder(Callback):
    """Rows per epoch, validations per epoch, batch size per step."""

    def __init__(self, dataset: RecordingDataset) -> None:
        self.dataset = dataset
        self.epochs: list[list[int]] = []
        self.validations: dict[int, int] = {}
        self.sizes: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.dataset.served.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sizes.append(len(batch[0]))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.validations[trainer.current_epoch] = self.validations.get(trainer.current_epoch, 0) + 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append([i for batch in self.dataset.served for i in batch])


def _setup(
    rows: int = 600, batch_size: int = 16, **options
) -> tuple[TabularDataModule, RecordingDataset, TaskModule]:
    cfg = RunConfig(
        data="synthetic-regression", rows=rows, features=3, batch_size=batch_size, lr=0.05, **options
    )
    dm = TabularDataModule(cfg.validate())
    dm.setup()
    dataset = RecordingDataset(dm.prepared.train)
    dm.prepared.train = dataset
    return dm, dataset, build_module(cfg, dm)


class ScriptedResize(Callback):
    """Sets the next batch size from a script after every step, as DynamicBatchSize does."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = list(sizes)

    def on_train_epoch_start(self, trainer, pl_module):
        sync_epoch_length(trainer, trainer.datamodule.train_batch_sampler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.sizes:
            sampler = trainer.datamodule.train_batch_sampler
            sampler.batch_size = self.sizes.pop(0)
            sync_epoch_length(trainer, sampler)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=25))
@example(sizes=[22, 1, 90, 90, 1])  # resized right after the epoch's last batch was drawn
@example(sizes=[1, 18, 3, 40])
def test_mid_epoch_resizes_keep_every_row_once_per_epoch_and_one_validation(sizes):
    """Growing and shrinking mid-epoch, in a real Trainer: each epoch is one pass, validated once."""
    dm, dataset, module = _setup(rows=300, batch_size=7)
    recorder = EpochRecorder(dataset)
    trainer = quiet_trainer(2, [ScriptedResize(sizes), recorder])
    trainer.fit(module, datamodule=dm)
    n = len(dataset)
    assert len(recorder.epochs) == 2
    for rows in recorder.epochs:
        assert sorted(rows) == list(range(n)), "an epoch must see every row exactly once"
    assert recorder.validations == {0: 1, 1: 1}
    assert module.samples_seen == 2 * n
    # every step trained the scripted size, or what was left of the epoch when that was less
    script = [7, *sizes]
    expected, left = [], n
    while len(expected) < len(recorder.sizes) or left < n:
        wanted = script[min(len(expected), len(script) - 1)]  # the last size stays once the script ends
        expected.append(min(wanted, left))
        left = left - expected[-1] or n
    assert recorder.sizes == expected


def test_schedule_policy_grows_batch_and_lr_at_the_milestone():
    dm, dataset, module = _setup(rows=800, batch_size=16)
    resize = DynamicBatchSize(
        policy="schedule", lr_rule="linear", milestones=(1,), probe_memory=False, adjust_every=5
    )
    recorder = EpochRecorder(dataset)
    trainer = quiet_trainer(2, [resize, recorder])
    trainer.fit(module, datamodule=dm)
    assert resize.batch_size == 32
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)  # 0.05 × 32/16
    assert [d["to"] for d in resize.decisions] == [32]
    assert resize.decisions[0]["epoch"] == 1
    assert all(sorted(rows) == list(range(len(dataset))) for rows in recorder.epochs)


def test_lr_scale_keeps_a_scheduler_coherent():
    cfg = RunConfig(
        data="synthetic-regression",
        rows=800,
        features=3,
        batch_size=16,
        lr=0.05,
        lr_schedule="step",
        epochs=4,
    ).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    module = build_module(cfg, dm)
    resize = DynamicBatchSize(
        policy="schedule", lr_rule="linear", milestones=(1,), probe_memory=False, adjust_every=5
    )
    trainer = quiet_trainer(4, [resize])
    trainer.fit(module, datamodule=dm)
    # milestones of the step schedule at epochs 2 and 3 (×0.1 each); the batch doubled at epoch 1 (×2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 2 * 0.1 * 0.1)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(0.1)]


class OutOfMemoryAbove(torch.nn.Module):
    """A linear model that raises CUDA's OOM error when a pass holds more than ``limit`` rows."""

    def __init__(self, n_features: int, limit: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_features, 1)
        self.limit = limit
        self.ooms = 0

    def forward(self, x):
        if len(x) > self.limit:
            self.ooms += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.linear(x)


def test_out_of_memory_redoes_the_same_rows_in_halves_with_the_same_gradient():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randn(64, 1)
    model = OutOfMemoryAbove(5, limit=20)
    reference = LinearRegression(5)
    reference.linear.load_state_dict(model.linear.state_dict())
    module = TaskModule(model, lr=0.1)
    trainer = quiet_trainer(1, [], limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=64))
    assert model.ooms == 2  # 64 rows, then 32, fail; 16 fit
    assert module.max_rows_per_pass == 16 and module.oom_recoveries == 2
    # one SGD step on the full batch, done by hand
    loss = torch.nn.functional.mse_loss(reference(x), y)
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    torch.testing.assert_close(model.linear.weight, reference.linear.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.linear.bias, reference.linear.bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("accumulate", [False, True])
def test_after_an_out_of_memory_the_batch_comes_down_or_runs_in_passes(accumulate: bool):
    """Without accumulation the batch comes down to what fits; with it (the default) the batch
    stays and each step runs as passes of what fits."""
    cfg = RunConfig(data="synthetic-regression", rows=1000, features=4, batch_size=96, lr=0.02).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    model = OutOfMemoryAbove(4, limit=40)
    module = TaskModule(model, lr=0.02)
    resize = DynamicBatchSize(policy="fixed", probe_memory=False, adjust_every=5, accumulate=accumulate)
    dataset = RecordingDataset(dm.prepared.train)
    dm.prepared.train = dataset
    recorder = EpochRecorder(dataset)
    trainer = quiet_trainer(2, [resize, recorder])
    trainer.fit(module, datamodule=dm)
    assert module.oom_recoveries >= 1
    if accumulate:
        assert resize.batch_size == 96 and not resize.decisions
        assert module.max_rows_per_pass <= 40 and module._step["passes"] >= 2
    else:
        assert resize.batch_size <= 40
        assert resize.decisions[0]["reason"].startswith("forced")
    assert all(sorted(rows) == list(range(len(dataset))) for rows in recorder.epochs), (
        "no row lost to the OOM"
    )


def test_a_step_that_cannot_fit_one_row_fails_clearly():
    model = OutOfMemoryAbove(3, limit=0)
    module = TaskModule(model, lr=0.1)
    with pytest.raises(MemoryError, match="even with 1 row"):
        quiet_trainer(1, [], limit_val_batches=0).fit(
            module, DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=8)
        )


def test_resume_from_a_checkpoint_restores_the_controller_state(tmp_path: Path):
    dm, _, module = _setup(rows=2000, batch_size=16)
    # A fixed measurement spacing: the default time budget spaces measurements by the clock, and on
    # a loaded machine too few of them came before the first decisions for the batch to move.
    noise = dict(policy="noise", lr_rule="sqrt", probe_memory=False, adjust_every=10, measure_every=2)
    resize = DynamicBatchSize(**noise)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(1, [resize, checkpoint], enable_checkpointing=True).fit(module, datamodule=dm)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("DynamicBatchSize")]
    assert state["batch_size"] != 16, "the first epoch should have moved the batch size"

    dm2, _, module2 = _setup(rows=2000, batch_size=16)
    resumed = DynamicBatchSize(**noise)
    seen = {}

    class Peek(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("rows", len(batch[0]))
            seen.setdefault("updates", resumed.ema.num_updates)

    trainer = quiet_trainer(2, [resumed, Peek()])
    trainer.fit(module2, datamodule=dm2, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.base_batch == 16
    assert seen["rows"] == state["batch_size"], "the resumed fit starts at the saved batch size"
    assert seen["updates"] == state["ema"]["num_updates"]
    assert resumed.decisions[: len(state["decisions"])] == state["decisions"]
    assert module2.samples_seen == 2 * len(dm2.train_set)


def test_auto_run_records_the_batch_dynamics_in_mlflow(tracking_uri: str):
    cfg = RunConfig(
        data="synthetic-regression",
        rows=20_000,
        features=8,
        batch_size="auto",
        lr=0.01,
        epochs=3,
        tracking_uri=tracking_uri,
        experiment="auto",
    )
    result = train(cfg)
    assert result.batch_size_max > 32
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert int(run.data.params["memory_probe_ceiling"]) >= 1
    assert run.data.params["memory_probe_backend"] == "cpu"
    assert int(run.data.params["memory_probe_trials"]) <= 4
    for key in ("gns", "grad_sqr", "grad_var", "throughput", "mem_peak", "batch_size", "lr"):
        assert client.get_metric_history(result.run_id, key), key
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"batch_size.png", "batch_size_decisions.json"} <= names
    # the regression reaches the noise floor (noise 0.5 → MSE 0.25)
    assert result.metrics["test_loss"] < 0.3


@pytest.mark.ddp
def test_two_rank_ddp_fit_trains_each_row_once_with_odd_global_batches_and_averaged_noise(tmp_path: Path):
    """Two gloo ranks: what each rank actually trained, step by step, against the sampler's contract
    (rank r takes every other row of the global batch), and the EMAs fed the mean of both ranks'
    estimates (the all-reduce), computed here from each rank's own record."""
    out = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_fit.py"), str(out)],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    rank0, rank1 = ranks
    n_train = rank0["n_train"]
    assert rank0["decisions"] == rank1["decisions"] and len(set(rank0["decisions"])) > 2
    assert rank0["lr"] == rank1["lr"]
    assert rank0["ceiling"] == rank1["ceiling"] and rank0["ceiling"] is not None

    # Rows trained: at every step both ranks trained their stride of the same global batch.
    assert [s[0] for s in rank0["steps"]] == [s[0] for s in rank1["steps"]]
    cursor = dict.fromkeys(rank0["permutations"], 0)
    odd = 0
    for step0, step1, global_rows in zip(rank0["steps"], rank1["steps"], rank0["global_rows"], strict=True):
        (_, epoch, rows0), (_, _, rows1) = step0, step1
        order = rank0["permutations"][str(epoch)]
        start = cursor[str(epoch)]
        batch = order[start : start + len(rows0) + len(rows1)]
        cursor[str(epoch)] = start + len(batch)
        assert rows0 == batch[0::2] and rows1 == batch[1::2], f"step {step0[0]}"
        assert len(batch) == global_rows
        odd += len(batch) % 2
    assert rank0["permutations"] == rank1["permutations"]
    assert all(c == n_train for c in cursor.values()), "every epoch ran to its last row"
    assert odd >= 3, "odd global batches (one rank a row short) must have been trained"
    # The module counts global rows from the sampler: an odd batch is not rank 0's half times two.
    assert rank0["samples_seen"] == rank1["samples_seen"] == rank0["epochs"] * n_train

    # Noise statistics: every update of the EMAs is the mean of the two ranks' local estimates.
    local = [{step: value for step, value in r["local_estimates"]} for r in ranks]
    assert local[0].keys() == local[1].keys() and len(local[0]) >= 10
    both_measured = [s for s in local[0] if local[0][s] is not None and local[1][s] is not None]
    assert len(both_measured) >= 10
    fed = {step: (g, t) for step, g, t in rank0["ema_fed"]}
    assert rank1["ema_fed"] == rank0["ema_fed"], "the ranks' EMAs must move together"
    assert sorted(fed) == sorted(both_measured)
    for step in both_measured:
        expected = [(a + b) / 2 for a, b in zip(local[0][step], local[1][step], strict=True)]
        assert fed[step] == pytest.approx(expected, rel=1e-9), f"step {step}"
    # the ranks see different rows, so their local estimates differ: the average is not trivial
    assert sum(local[0][s] != local[1][s] for s in both_measured) >= len(both_measured) - 1
    assert rank0["ema"] == rank1["ema"]


def test_a_stopped_run_resumes_on_the_same_mlflow_run_with_the_controller_state(tracking_uri: str):
    class StopInEpoch(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                raise RuntimeError("machine went away")

    cfg = RunConfig(
        data="synthetic-regression",
        rows=6000,
        features=4,
        batch_size=16,
        policy="noise",
        lr=0.02,
        epochs=4,
        adjust_every=20,
        tracking_uri=tracking_uri,
        experiment="resume",
    )
    with pytest.raises(RuntimeError, match="went away"):
        train(cfg, callbacks=[StopInEpoch()])
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FAILED"
    saved = torch.load(
        Path(tracking_uri.removeprefix("sqlite:///")).parent / "checkpoints" / run.info.run_id / "last.ckpt",
        weights_only=False,
    )
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("DynamicBatchSize")]

    result = train(RunConfig(tracking_uri=tracking_uri), resume_run_id=run.info.run_id)
    assert result.run_id == run.info.run_id
    assert len(client.search_runs([client.get_experiment_by_name("resume").experiment_id])) == 1
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["resumed"] == "true"
    assert result.samples_seen == 4 * int(finished.data.params["n_train"])
    assert result.epochs == 4
    # the controller went on from its saved decisions rather than starting over at B=16
    decisions = json.loads(
        Path(client.download_artifacts(run.info.run_id, "batch_size_decisions.json")).read_text()
    )
    assert decisions["decisions"][: len(state["decisions"])] == state["decisions"]


def test_resume_without_a_checkpoint_is_a_clear_error(tracking_uri: str):
    from lightning_batch.errors import UserError

    with pytest.raises(UserError, match="no checkpoint to resume"):
        train(RunConfig(tracking_uri=tracking_uri), resume_run_id="0123456789abcdef")


@pytest.mark.parametrize("sampler_made_before_the_fit", [False, True])
def test_lightnings_own_batch_size_finder_runs_with_the_task_module(
    tmp_path: Path, sampler_made_before_the_fit
):
    """BatchSizeFinder trains steps before the module's on_fit_start: the module must be ready.

    Its search saves a checkpoint, tries sizes, and restores the checkpoint; the size it found must
    survive that restore also when the data module's sampler (and so its saved state) already
    existed, as it does once user code set ``dm.batch_size`` before the fit."""
    from lightning.pytorch.callbacks import BatchSizeFinder

    dm, _, module = _setup(rows=2000, batch_size=16)
    if sampler_made_before_the_fit:
        dm.batch_size = 16
    finder = BatchSizeFinder(mode="power", init_val=16, max_trials=3, steps_per_trial=2)
    quiet_trainer(1, [finder], limit_val_batches=0, default_root_dir=tmp_path).fit(module, datamodule=dm)
    assert finder.optimal_batch_size == 64 and dm.batch_size == 64  # 16, 32, 64: three trials
    assert module.samples_seen == len(dm.train_set)


def _documented_decision_steps(
    rows: list[int], epoch_rows: int, adjust_every: int, min_steps: int
) -> list[int]:
    """The cadence the docs promise, written out: a decision at the end of the step where
    ``adjust_every`` steps, or a quarter epoch of rows, went by since the last one; never before
    ``min_steps`` steps (goodput's timed steps); the first two decisions wait a quarter and a half
    of both (the warm-up)."""
    due, steps, seen = [], 0, 0
    for step, r in enumerate(rows, start=1):
        steps, seen = steps + 1, seen + r
        div = 2 ** max(0, 2 - len(due))
        every, least = max(1, adjust_every // div), max(1, min_steps // div)
        if steps >= least and (steps >= every or 4 * seen >= epoch_rows):
            due.append(step)
            steps = seen = 0
    return due


class _DecisionSpy(Callback):
    """The step of every decision the callback's controller takes while training (the number of
    steps begun by then; the decision before the first step is left out), and every step's rows."""

    def __init__(self, resize: DynamicBatchSize) -> None:
        self.decided: list[int] = []
        self.rows: list[int] = []
        decide = resize.controller.decide

        def spy(context):
            if self.rows:
                self.decided.append(len(self.rows))
            return decide(context)

        resize.controller.decide = spy

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append(len(batch[0]))


@pytest.mark.parametrize(
    ("policy", "options", "min_steps"),
    [
        ("noise", dict(adjust_every=5), 1),  # below the old hidden floor of 20: honoured
        ("memory", dict(adjust_every=30, max_batch=150), 1),  # big batches: a quarter epoch decides
        ("goodput", dict(adjust_every=5), 20),  # goodput times 20 steps a size by default ...
        ("goodput", dict(adjust_every=5, min_timed_steps=5), 5),  # ... unless told otherwise
    ],
)
def test_decisions_fall_at_the_documented_steps(policy, options, min_steps, caplog):
    dm, dataset, module = _setup(rows=3000, batch_size=16)
    with caplog.at_level("WARNING", logger="lightning_batch.plugin.callback"):
        resize = DynamicBatchSize(policy=policy, probe_memory=False, **options)
    warnings = [r.getMessage() for r in caplog.records if "decides every" in r.getMessage()]
    if options["adjust_every"] < min_steps:
        assert len(warnings) == 1 and "min_timed_steps" in warnings[0]
    else:
        assert not warnings
    spy = _DecisionSpy(resize)
    quiet_trainer(2, [resize, spy], limit_val_batches=0).fit(module, datamodule=dm)
    expected = _documented_decision_steps(spy.rows, len(dataset), options["adjust_every"], min_steps)
    assert spy.decided == expected
    assert len(expected) >= 3


def test_min_timed_steps_reaches_the_callback_from_flags():
    from lightning_batch.cli import build_parser, config_from_args
    from lightning_batch.training import build_resizer

    args = build_parser().parse_args(
        ["train", "--batch-size", "auto", "--adjust-every", "5", "--min-timed-steps", "7"]
    )
    resizer = build_resizer(config_from_args(args))
    assert (resizer.cadence.adjust_every, resizer.cadence.min_steps) == (5, 7)
    noise = build_resizer(
        RunConfig(policy="noise", batch_size=16, adjust_every=5, min_timed_steps=7).validate()
    )
    assert noise.cadence.min_steps == 1, "only goodput times steps"
