"""BufferedMLFlowLogger where metrics can be lost or land wrong: what reaches the store (read back
with MLflow's own client), when it is handed to the writer, in how many writes, and on how many
threads (the mutation target ``make mutate-logger``, with the logger tests of
tests/test_mlflow_runs.py). No test waits a fixed time: a write is waited for by an event."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient

from lightning_batch.tracking import logger


@pytest.fixture
def store(migrated_store: Path, tmp_path: Path) -> Iterator[str]:
    """A fresh store; MLflow's process-wide tracking URI (Lightning's logger sets it) restored after."""
    import mlflow
    from mlflow.tracking import is_tracking_uri_set

    db = tmp_path / "mlflow.db"
    shutil.copyfile(migrated_store, db)
    previous = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    try:
        yield f"sqlite:///{db}"
    finally:
        mlflow.set_tracking_uri(previous)


def _started(store: str, experiment: str) -> logger.BufferedMLFlowLogger:
    """A logger whose run exists, as training starts one (its run id is read before anything is logged)."""
    log = logger.BufferedMLFlowLogger(experiment_name=experiment, tracking_uri=store)
    assert log.run_id
    return log


class Writes:
    """MLflow's ``log_batch`` as the writer thread calls it, recorded: the metric count of each call,
    the thread it ran on, and an event per call begun."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gate: threading.Event | None = None) -> None:
        self.sizes: list[int] = []
        self.threads: set[int] = set()
        self.begun = threading.Event()
        original = MlflowClient.log_batch

        def log_batch(client, run_id, metrics=(), params=(), tags=(), **kwargs):
            self.sizes.append(len(metrics))
            self.threads.add(threading.get_ident())
            self.begun.set()
            if gate is not None:
                assert gate.wait(timeout=60), "the test never opened the gate"
            return original(client, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)


def _history(store: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(store).get_metric_history(run_id, key)]


def test_values_reach_the_store_with_their_step_and_time_and_stay_for_plots(store: str, monkeypatch):
    writes = Writes(monkeypatch)
    log = _started(store, "values")
    before = int(time.time() * 1000)
    log.log_metrics({"loss": torch.tensor(0.5), "lr": 0.1}, step=3)
    log.log_metrics({"loss": 0.25})  # no step: step 0
    after = int(time.time() * 1000)
    assert writes.sizes == [], "buffered, not written per step"
    log.flush()
    assert writes.sizes == [3]
    client = MlflowClient(store)
    loss = client.get_metric_history(log.run_id, "loss")
    assert sorted((m.step, m.value) for m in loss) == [(0, 0.25), (3, 0.5)]
    assert all(before <= m.timestamp <= after for m in loss)
    assert _history(store, log.run_id, "lr") == [(3, pytest.approx(0.1))]
    assert log.history == {"loss": [(3, 0.5), (0, 0.25)], "lr": [(3, 0.1)]}
    assert all(type(v) is float for _, v in log.history["loss"])
    assert (log.last("loss"), log.last("lr"), log.last("never")) == (0.25, 0.1, None)
    log.flush()  # nothing pending: no empty write
    assert writes.sizes == [3]
    log.finalize()
    assert client.get_run(log.run_id).info.status == "FINISHED"


def test_a_full_buffer_is_handed_over_at_once_and_written_in_batches_mlflow_accepts(store: str, monkeypatch):
    """FLUSH_EVERY values waiting: handed to the writer by log_metrics itself (awaited here by the
    write beginning, not by flush); 2,500 at once are written 1,000 (MLflow's limit) at a time."""
    writes = Writes(monkeypatch)
    log = _started(store, "batches")
    for step in range(logger.FLUSH_EVERY // 2 - 1):
        log.log_metrics({"a": 1.0, "b": 2.0}, step=step)
    log.log_metrics({"a": 1.0}, step=10_000)  # FLUSH_EVERY - 1 values waiting
    log.flush()
    assert writes.sizes == [logger.FLUSH_EVERY - 1]
    writes.begun.clear()
    for step in range(logger.FLUSH_EVERY // 2):
        log.log_metrics({"a": 1.0, "b": 2.0}, step=step)
    assert writes.begun.wait(timeout=60), "FLUSH_EVERY values waiting were not handed over"
    log.log_metrics({f"k{i}": float(i) for i in range(2500)}, step=1)
    log.flush()
    assert writes.sizes == [logger.FLUSH_EVERY - 1, logger.FLUSH_EVERY, 1000, 1000, 500]
    run = MlflowClient(store).get_run(log.run_id)
    assert len(run.data.metrics) == 2 + 2500
    assert all(run.data.metrics[f"k{i}"] == float(i) for i in range(2500))
    assert len(_history(store, log.run_id, "b")) == logger.FLUSH_EVERY // 2 - 1 + logger.FLUSH_EVERY // 2
    log.finalize()


def test_values_are_handed_over_once_flush_seconds_have_passed(store: str, monkeypatch):
    """Strictly more than FLUSH_SECONDS since the last hand-over (a fake clock for the logger)."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(logger, "time", SimpleNamespace(monotonic=lambda: clock.now, time=time.time))
    writes = Writes(monkeypatch)
    log = _started(store, "timed")
    seconds = logger.FLUSH_SECONDS
    for step, now in enumerate([1.0, seconds, seconds + 0.001, seconds + 5, 2 * seconds + 0.001]):
        clock.now = now
        log.log_metrics({"x": float(step)}, step=step)
    log.flush()
    assert writes.sizes == [3, 2]  # at seconds + 0.001, and at 2 * seconds + 0.001: since the last
    assert _history(store, log.run_id, "x") == [(s, float(s)) for s in range(5)]
    log.finalize()


def test_one_writer_thread_in_order_and_log_metrics_never_waits_for_it(store: str, monkeypatch):
    """While a write is stuck (the store busy), training goes on: log_metrics hands over more without
    waiting, still to the one writer thread, which writes the batches in order once the store frees."""
    gate = threading.Event()
    writes = Writes(monkeypatch, gate)
    monkeypatch.setattr(logger, "FLUSH_EVERY", 2)
    log = _started(store, "stuck")
    threads_before = set(threading.enumerate())
    log.log_metrics({"loss": 1.0, "lr": 0.1}, step=1)  # handed over: its write blocks at the gate
    assert writes.begun.wait(timeout=60)
    for step in (2, 3):
        log.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)  # returns: the training thread is free
    writers = set(threading.enumerate()) - threads_before
    gate.set()
    log.flush()
    assert len(writers) == 1, "one writer thread keeps the batches in order"
    assert len(writes.threads) == 1 and writes.sizes == [2, 2, 2]
    assert _history(store, log.run_id, "loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    log.finalize()


def test_save_writes_what_is_buffered(store: str, monkeypatch):
    """save() runs with every checkpoint: when it returns, every value logged before is in the store."""
    Writes(monkeypatch)
    log = _started(store, "saved")
    log.log_metrics({"loss": 0.5}, step=1)
    log.save()
    assert _history(store, log.run_id, "loss") == [(1, 0.5)]
    log.finalize()


def test_after_finalize_a_logger_used_again_writes_and_finishes_again(store: str, monkeypatch):
    """fit, then test with the same logger: values logged after the first finalize still reach the
    store, and the run ends FINISHED again."""
    writes = Writes(monkeypatch)
    log = _started(store, "twice")
    log.log_metrics({"loss": 0.5}, step=1)
    log.finalize()
    client = MlflowClient(store)
    assert client.get_run(log.run_id).info.status == "FINISHED"
    log.log_metrics({"test_loss": 0.75}, step=2)
    log.finalize("success")
    assert _history(store, log.run_id, "test_loss") == [(2, 0.75)]
    assert client.get_run(log.run_id).info.status == "FINISHED"
    assert writes.sizes == [1, 1]


def test_finalize_of_an_unused_logger_creates_no_run(store: str):
    log = logger.BufferedMLFlowLogger(experiment_name="unused", tracking_uri=store)
    log.finalize()
    client = MlflowClient(store)
    assert client.get_experiment_by_name("unused") is None
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_values_logged_before_the_run_exists_are_written_by_finalize(store: str, monkeypatch):
    """A user's own loop may log a few values and finish before anything asked for the run (the
    project's training reads run_id first; Lightning's logger creates the run only then): finalize
    creates the run and writes them, rather than returning early with them in the buffer."""
    Writes(monkeypatch)
    log = logger.BufferedMLFlowLogger(experiment_name="late", tracking_uri=store)
    log.log_metrics({"loss": 0.5}, step=1)
    log.finalize()
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("late").experiment_id])
    assert run.info.status == "FINISHED"
    assert _history(store, run.info.run_id, "loss") == [(1, 0.5)]


def test_a_failed_run_ends_failed_after_its_values_are_written(store: str, monkeypatch):
    Writes(monkeypatch)
    log = _started(store, "failed")
    log.log_metrics({"loss": 0.5}, step=1)
    log.finalize("failed")
    assert MlflowClient(store).get_run(log.run_id).info.status == "FAILED"
    assert _history(store, log.run_id, "loss") == [(1, 0.5)]


def test_a_long_tag_is_cut_to_5000_characters(store: str):
    log = _started(store, "tagged")
    log.set_tag("note", "x" * 6000)
    log.set_tag("short", "fine")
    tags = MlflowClient(store).get_run(log.run_id).data.tags
    assert (tags["note"], tags["short"]) == ("x" * 5000, "fine")
    log.finalize()


def test_positional_arguments_are_lightnings(store: str):
    """MLFlowLogger(experiment_name, run_name, tracking_uri, ...): positional arguments keep their meaning."""
    log = logger.BufferedMLFlowLogger("positional", "named-run", store)
    run = MlflowClient(store).get_run(log.run_id)
    assert run.info.run_name == "named-run"
    assert MlflowClient(store).get_experiment(run.info.experiment_id).name == "positional"
    log.finalize()
