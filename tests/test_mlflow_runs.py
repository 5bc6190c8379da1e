"""What a run leaves in MLflow, read back with MLflow's own client."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lightning_batch import store_uri as tracking
from lightning_batch.config import RunConfig
from lightning_batch.tracking import logger
from lightning_batch.training import train

from .conftest import RUN_PY, subprocess_env


def _history(client: MlflowClient, run_id: str, key: str) -> list:
    return client.get_metric_history(run_id, key)


@pytest.mark.slow  # the whole demo, ~45 s: CI runs the slow suite after `make test` (.ci/run)
def test_demo_writes_finished_runs_with_metrics_and_artifacts(workdir: Path):
    """`python experiments/run.py` with no arguments, as a user runs it, on the default store."""
    done = subprocess.run(
        [sys.executable, str(RUN_PY)],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1" in done.stdout
    assert (workdir / "mlruns" / "mlflow.db").is_file()
    # Absolute: MLflow caches one engine per URI string for the whole process, so a relative URI used
    # by an earlier in-process test (from another working directory) would read that test's store.
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 2
    by_task = {}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.info.run_id in done.stdout
        by_task[run.data.tags["task"]] = run
        # artifacts under mlruns/artifacts/, not the deprecated file store layout
        assert "/mlruns/artifacts/" in run.info.artifact_uri
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "preprocessing.json", "loss_curves.png", "checkpoints"} <= names
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")) == [
            "checkpoints/best.ckpt",
            "checkpoints/final_weights.pt",
        ]
        # per-step metrics: one value every log_every (10) steps, and the final step
        steps = _history(client, run.info.run_id, "train_loss")
        last = max(m.step for m in steps)
        assert len(steps) == last // 10 + (1 if last % 10 else 0) and len(steps) >= 5
        assert len(_history(client, run.info.run_id, "batch_size")) == len(steps)
        assert len(_history(client, run.info.run_id, "lr")) == len(steps)
        seen = [
            m.value for m in sorted(_history(client, run.info.run_id, "samples_seen"), key=lambda m: m.step)
        ]
        # Every row once per epoch trained (a run may stop early: epochs_run, not the --epochs maximum).
        assert seen == sorted(seen) and seen[-1] == int(run.data.params["n_train"]) * int(
            run.data.metrics["epochs_run"]
        )
        assert _history(client, run.info.run_id, "val_loss")
        assert "test_loss" in run.data.metrics
        assert run.data.params["lr"] and run.data.params["batch_size"]
        assert {"task", "dataset", "model"} <= set(run.data.tags)
        assert run.inputs.dataset_inputs, "the dataset is recorded as an MLflow input"
    assert set(by_task) == {"regression", "classification"}
    assert {"test_rmse", "test_r2"} <= set(by_task["regression"].data.metrics)
    assert {"test_acc", "test_f1"} <= set(by_task["classification"].data.metrics)
    assert "val_rmse" in by_task["regression"].data.metrics
    assert "val_acc" in by_task["classification"].data.metrics
    assert "INFO mlflow" not in done.stderr, "MLflow's start-up chatter is quiet by default"

    # Issue 7's acceptance: digits through the CNN with --batch-size auto (the demo's run is that
    # command's config: data digits, model cnn, batch size auto, every other option at its default).
    cnn = next(r for r in runs if r.info.run_name == "digits-cnn-auto")
    # No --lr: the range test found it (issue 25), and the run says how.
    assert cnn.data.params["model"] == "cnn" and cnn.data.tags["lr_search"].startswith("range test")
    # The batch follows the clock (goodput's throughput model), so the trajectory, and the accuracy
    # on the 360 test images (one image = 0.28%), vary from run to run: on this machine (issue 16)
    # seed 0, the demo's, ended between 0.941 and 0.963 in 8 runs (seeds 1-3: 0.978-0.981); issue
    # 7's 0.95 sits inside that spread, so no single run can promise it. 0.93 catches a policy gone
    # wrong (the 0.915 of B=512 before the efficiency bound) without failing on the clock's luck.
    assert cnn.data.metrics["test_acc"] >= 0.93 and cnn.data.metrics["fit_seconds"] < 60
    for key in ("batch_size", "gns", "grad_norm", "grad_norm_ratio"):
        history = _history(client, cnn.info.run_id, key)
        assert len(history) >= 5 and all(math.isfinite(m.value) for m in history), key
    assert len({m.value for m in _history(client, cnn.info.run_id, "batch_size")}) > 1  # it moved

    # The seed's question, answered from the demo's own auto run: `run.py report RUN_ID`.
    auto = next(r for r in runs if r.info.run_name == "seed-auto")
    report = subprocess.run(
        [sys.executable, str(RUN_PY), "report", auto.info.run_id],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "critical batch size" in report.stdout and "goodput-optimal batch" in report.stdout
    assert "report/report.md" in {a.path for a in client.list_artifacts(auto.info.run_id, "report")}


def test_a_run_that_raises_ends_failed_with_the_error(tracking_uri: str):
    class Explode(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                raise RuntimeError("boom at step 3")

    cfg = RunConfig(
        data="iris", epochs=2, batch_size=8, log_every=1, tracking_uri=tracking_uri, experiment="fails"
    )
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, callbacks=[Explode()])
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    assert run.info.status == "FAILED"
    assert "boom at step 3" in run.data.tags["error"]
    # what was logged before the crash was written, not lost in the buffer (callbacks run before the
    # module's own on_train_batch_end, so step 3's values never reached the logger)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]


def test_metrics_are_written_in_batches_not_per_step(tracking_uri: str):
    calls = []
    original = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        calls.append(len(metrics))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    cfg = RunConfig(
        data="synthetic-regression", rows=4000, epochs=2, batch_size=8, log_every=1, tracking_uri=tracking_uri
    )
    with mock.patch.object(MlflowClient, "log_batch", counting):
        result = train(cfg)
    steps = result.samples_seen // 8
    metric_calls = [n for n in calls if n]
    assert sum(metric_calls) >= 4 * steps  # every per-step value got written ...
    assert len(metric_calls) <= 4 * steps // logger.FLUSH_EVERY + 10  # ... in a handful of writes


@pytest.fixture(scope="module")
def logger_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the logger's tests (each has its own experiment): a new sqlite store costs
    seconds of schema migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('logger')}/mlflow.db"


def _slow_or_failing_store(monkeypatch: pytest.MonkeyPatch, fail_first: bool = False) -> threading.Event:
    """MLflow's ``log_batch``, as the logger's writer thread calls it, made slow (a busy store) or,
    with ``fail_first``, failing on its first call; the event is set when a later call begins."""
    original = MlflowClient.log_batch
    calls: list[int] = []
    later_call = threading.Event()

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        calls.append(len(metrics))
        if len(calls) > 1:
            later_call.set()
        if fail_first and len(calls) == 1:
            raise MlflowException("the store is unavailable")
        if not fail_first:
            time.sleep(0.3)  # the writer lags behind the training thread
        return original(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    monkeypatch.setattr(logger, "FLUSH_EVERY", 2)  # a hand-over to the writer every step of two metrics
    return later_call


def test_flush_returns_once_every_metric_logged_is_in_the_store(logger_store: str, monkeypatch):
    """``flush()`` runs with every checkpoint (``save``): when it returns, everything logged so far is
    in the store, read back by MLflow's own client, however far behind the writer thread was."""
    _slow_or_failing_store(monkeypatch)
    log = logger.BufferedMLFlowLogger(experiment_name="flushed", tracking_uri=logger_store)
    for step in range(1, 4):
        log.log_metrics({"train_loss": 1.0 / step, "lr": 0.1 * step}, step=step)
    log.log_metrics({"val_loss": 0.5}, step=3)  # still buffered: flush() hands it over
    log.flush()
    client = MlflowClient(logger_store)
    written = {
        key: [(m.step, m.value) for m in client.get_metric_history(log.run_id, key)]
        for key in ("train_loss", "lr", "val_loss")
    }
    log.finalize()
    assert written == {
        "train_loss": [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))],
        "lr": [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3))],
        "val_loss": [(3, 0.5)],
    }


def test_a_failed_metric_write_is_raised_by_the_next_flush(logger_store: str, monkeypatch):
    """The logger's contract: ``flush()`` raises what a write raised, so no metric is lost silently;
    also when the failed write finished long before, with other writes handed over since."""
    later_call = _slow_or_failing_store(monkeypatch, fail_first=True)
    log = logger.BufferedMLFlowLogger(experiment_name="failed-write", tracking_uri=logger_store)
    log.log_metrics({"train_loss": 1.0, "lr": 0.1}, step=1)  # its write fails
    log.log_metrics({"train_loss": 0.5, "lr": 0.1}, step=2)
    # One writer thread, in order: once the second write has begun the failed one has finished.
    assert later_call.wait(timeout=60)
    log.log_metrics({"train_loss": 0.25, "lr": 0.1}, step=3)
    with pytest.raises(MlflowException, match="the store is unavailable"):
        log.flush()
    log.finalize()


def test_explicit_tracking_uri_and_env_override(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    assert tracking.resolve_tracking_uri(None) == "sqlite:///mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking.resolve_tracking_uri(None) == "sqlite:///elsewhere.db"
    assert tracking.resolve_tracking_uri("sqlite:///flag.db") == "sqlite:///flag.db"


def test_unnamed_runs_get_distinct_readable_names(tracking_uri: str):
    from lightning_batch.training import train

    names = [train(RunConfig(data="iris", epochs=1, tracking_uri=tracking_uri)).run_id for _ in range(2)]
    client = MlflowClient(tracking_uri)
    run_names = [client.get_run(r).info.run_name for r in names]
    assert run_names[0] != run_names[1]
    assert all(n.startswith("iris-softmax-b32-") for n in run_names), run_names
