"""Exact resume from a mid-epoch checkpoint taken after a resize, killed from inside the fit.

A kill timed from outside the process lands at a random step; this one lands at a fixed step, so
the test knows the checkpoint: mid-epoch, after a batch-size change in the same epoch, with a batch
the loader fetched ahead still in flight. That is where a wrong sampler cursor shows: one that
forgets the fetched-ahead batch skips its rows, one computed as steps × current size skips or
repeats rows. The checks use the test's own record of the rows each step trained. The killed run,
left RUNNING, is ended FAILED ("process lost") by the next train on the store, and still resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from mlflow import MlflowClient
from torch.utils.data import DataLoader

from lightning_batch.config import RunConfig
from lightning_batch.plugin.callback import sync_epoch_length
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.tabular.tables import keep_batch
from lightning_batch.tabular.task_module import TaskModule
from lightning_batch.tracking.run_owners import ERROR_TAG, PROCESS_LOST_TAG, Owner
from lightning_batch.training import build_module, train

from .conftest import ROOT, quiet_trainer, subprocess_env
from .kill_at_step import TrainedRows

#: Deterministic on CPU: the noise policy reads gradient statistics, not step times, measured every
#: 20 steps (the default measures by a time budget, which a clock decides). With this seed the batch
#: goes 16 -> 8 at step 67 and 8 -> 32 at step 87, in epoch 0 (1,400 rows), which ends at step 93.
CONFIG = dict(
    data="synthetic-regression",
    rows=2000,
    features=4,
    batch_size=16,
    policy="noise",
    lr=0.02,
    epochs=2,
    checkpoint_every=10,
    adjust_every=10,
    measure_every=20,
    seed=5,
)
CHECKPOINT_STEP = 90  # the last step checkpoint before the kill: mid-epoch 0, after both resizes
KILL_STEP = 92


def _weights(client: MlflowClient, run_id: str, folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(
        client.download_artifacts(run_id, "checkpoints/final_weights.pt", str(folder)), weights_only=True
    )


def _decisions(client: MlflowClient, run_id: str, folder: Path) -> list[dict]:
    path = client.download_artifacts(run_id, "batch_size_decisions.json", str(folder))
    return json.loads(Path(path).read_text())["decisions"]


def _rows_by_epoch(steps: list[list]) -> dict[int, list[int]]:
    epochs: dict[int, list[int]] = {}
    for _, epoch, rows in steps:
        epochs.setdefault(epoch, []).extend(rows)
    return epochs


def test_a_kill_mid_epoch_after_a_resize_resumes_exactly(workdir: Path, tracking_uri: str):
    client = MlflowClient(tracking_uri)
    record = workdir / "killed.json"
    config = json.dumps({**CONFIG, "tracking_uri": tracking_uri, "experiment": "killed"})
    killed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "kill_at_step.py"), config, str(KILL_STEP), str(record)],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert run.info.status == "RUNNING"  # nobody could close it
    owner = Owner.from_tags(run.data.tags)
    assert owner is not None and owner.pid != os.getpid() and owner.state() == "gone"

    # The next train on the store (here the unbroken reference fit) ends the killed run FAILED.
    unbroken_rows = TrainedRows()
    reference = train(
        RunConfig(**CONFIG, tracking_uri=tracking_uri, experiment="reference"),
        callbacks=[unbroken_rows],
        progress_bar=False,
    )
    reaped = client.get_run(run.info.run_id)
    assert reaped.info.status == "FAILED"
    assert reaped.data.tags[ERROR_TAG].startswith(f"process lost: pid {owner.pid} on {owner.host} is gone")

    # The checkpoint the resume starts from: mid-epoch, after a resize in that epoch.
    saved = torch.load(workdir / "mlruns" / "checkpoints" / run.info.run_id / "last.ckpt", weights_only=True)
    assert saved["global_step"] == CHECKPOINT_STEP
    (sampler,) = [
        v["train_sampler"] for k, v in saved.items() if isinstance(v, dict) and "train_sampler" in v
    ]
    n_train = int(run.data.params["n_train"])
    assert sampler["epoch"] == 0 and 0 < sampler["cursor"] < n_train, "the checkpoint must be mid-epoch"
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("DynamicBatchSize")]
    sizes_in_epoch = [d for d in state["decisions"] if d["epoch"] == 0 and 0 < d["step"] <= CHECKPOINT_STEP]
    assert len(sizes_in_epoch) >= 2, "the batch must have changed size in the checkpoint's epoch"
    trained_before_kill = json.loads(record.read_text())
    assert trained_before_kill[-1][0] == KILL_STEP
    kept = [s for s in trained_before_kill if s[0] <= CHECKPOINT_STEP]  # later steps died with the process
    # The cursor is exactly the rows trained so far in the epoch (not those fetched ahead, not steps × size).
    assert sampler["cursor"] == sum(len(rows) for _, epoch, rows in kept if epoch == 0)
    assert sampler["batches_yielded"] == len(kept)

    resumed_rows = TrainedRows()
    result = train(
        RunConfig(tracking_uri=tracking_uri), resume_run_id=run.info.run_id, callbacks=[resumed_rows]
    )
    assert result.run_id == run.info.run_id and result.status == "FINISHED"
    resumed = client.get_run(run.info.run_id)  # finished by this process, the loss kept in its history
    assert resumed.info.status == "FINISHED" and ERROR_TAG not in resumed.data.tags
    assert Owner.from_tags(resumed.data.tags) == Owner.of_this_process()
    assert PROCESS_LOST_TAG in resumed.data.tags and resumed.data.tags["resumed"] == "true"
    assert resumed_rows.steps[0][0] == CHECKPOINT_STEP + 1

    for epoch, rows in _rows_by_epoch(kept + resumed_rows.steps).items():
        assert sorted(rows) == list(range(n_train)), f"epoch {epoch}: every row exactly once"
    assert sorted(_rows_by_epoch(kept + resumed_rows.steps)) == [0, 1]
    # The same steps, rows and batch sizes as the unbroken fit, hence the same weights.
    assert [s[2] for s in kept + resumed_rows.steps] == [s[2] for s in unbroken_rows.steps]
    expected = _weights(client, reference.run_id, workdir / "a")
    actual = _weights(client, run.info.run_id, workdir / "b")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert _decisions(client, run.info.run_id, workdir / "c") == _decisions(
        client, reference.run_id, workdir / "d"
    )


class _WorkerLoaderDataModule(TabularDataModule):
    """The tabular data served by a worker process: the DataLoader draws batches from the sampler
    ahead of training (two per worker), so a checkpoint is taken with batches in flight."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_sampler=self.train_batch_sampler, collate_fn=keep_batch, num_workers=1
        )


class _ResizeAt(Callback):
    """Sets the batch size after fixed steps, as DynamicBatchSize does (odd sizes included)."""

    def __init__(self, sizes: dict[int, int]) -> None:
        self.sizes = sizes

    def on_train_epoch_start(self, trainer, pl_module):
        sync_epoch_length(trainer, trainer.datamodule.train_batch_sampler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.sizes:
            sampler = trainer.datamodule.train_batch_sampler
            sampler.batch_size = self.sizes[trainer.global_step]
            sync_epoch_length(trainer, sampler)


class _Killed(Exception):
    pass


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Killed  # the fit ends here, no checkpoint taken, as after a kill


def _worker_fit(
    tmp: Path, callbacks: list, ckpt_path: Path | None = None, rows: TrainedRows | None = None
) -> tuple[TrainedRows, TaskModule]:
    cfg = RunConfig(
        data="synthetic-regression", rows=600, features=3, batch_size=16, lr=0.05, seed=1
    ).validate()
    torch.manual_seed(0)
    dm = _WorkerLoaderDataModule(cfg)
    dm.setup()
    module = build_module(cfg, dm)
    rows = rows or TrainedRows()
    resize = _ResizeAt({5: 24, 12: 9})
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = quiet_trainer(
        2, [rows, resize, *callbacks], limit_val_batches=0, enable_checkpointing=checkpoints
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return rows, module


def test_a_checkpoint_with_batches_in_flight_resumes_from_the_trained_position(tmp_path: Path):
    """With a worker prefetching, the sampler's cursor runs ahead of training; the checkpoint must
    hold the trained position, or the fetched-ahead rows are never trained."""
    unbroken, reference = _worker_fit(tmp_path, [])
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_last=True, save_top_k=0)
    stopped = TrainedRows()
    with pytest.raises(_Killed):
        _worker_fit(tmp_path, [saver, _StopAt(13)], rows=stopped)
    assert stopped.steps[-1][0] == 13
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 10
    sampler = saved["_WorkerLoaderDataModule"]["train_sampler"]
    kept = [s for s in stopped.steps if s[0] <= 10]
    assert sampler["cursor"] == sum(len(r) for _, _, r in kept), "the cursor is the rows trained, no more"

    resumed, module = _worker_fit(tmp_path, [], ckpt_path=tmp_path / "last.ckpt")
    n = len(set(r for s in unbroken.steps for r in s[2]))
    for epoch, rows in _rows_by_epoch(kept + resumed.steps).items():
        assert sorted(rows) == list(range(n)), f"epoch {epoch}: every row exactly once"
    assert [len(s[2]) for s in kept + resumed.steps] == [len(s[2]) for s in unbroken.steps]
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
