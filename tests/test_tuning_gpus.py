"""Optuna workers on GPUs: worker i of K sees GPU i mod n (``CUDA_VISIBLE_DEVICES``), threads split.

This machine has no GPU: the device count is faked (``hardware.gpu_count``), and what is checked
is the environment each worker process is started with; the one integration check starts two real
workers, which train on the CPU (torch finds no CUDA there) but tag their trials with the GPU
they were given.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from lightning_batch import placement as hardware
from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.tune.space import TuneConfig
from lightning_batch.tune.study import (
    WORKER_GPUS_ENV,
    WORKER_GPUS_TAG,
    tune,
    worker_environment,
    worker_gpus,
)


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch):
    """``fake_gpus(n)``: torch (as the package asks it) sees n GPUs; no CUDA_VISIBLE_DEVICES set."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def fake(count: int) -> None:
        monkeypatch.setattr(hardware, "gpu_count", lambda: count)

    return fake


def _envs(base: RunConfig, workers: int, parent: dict[str, str] | None = None, cpus: int = 16) -> list[dict]:
    gpus, per_worker = worker_gpus(base, workers)
    return [
        worker_environment(parent or {}, i, workers, cpus=cpus, gpus=gpus, gpus_per_worker=per_worker)
        for i in range(workers)
    ]


@pytest.mark.parametrize(("workers", "gpus"), [(1, 1), (2, 2), (4, 2), (3, 4), (5, 3), (2, 8)])
def test_worker_i_sees_gpu_i_mod_n(fake_gpus, workers: int, gpus: int):
    fake_gpus(gpus)
    envs = _envs(RunConfig(), workers, cpus=16)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == [str(i % gpus) for i in range(workers)]
    assert [env[WORKER_GPUS_ENV] for env in envs] == [env["CUDA_VISIBLE_DEVICES"] for env in envs]
    # the CPU threads are split as without GPUs
    assert {env["OMP_NUM_THREADS"] for env in envs} == {str(max(1, 16 // workers))}
    assert {env["LIGHTNING_BATCH_THREADS"] for env in envs} == {str(max(1, 16 // workers))}


def test_a_parent_cuda_visible_devices_list_is_respected(fake_gpus, monkeypatch: pytest.MonkeyPatch):
    """Worker i gets entry i mod n of the parent's list (indices or UUIDs: the same physical GPU)."""
    fake_gpus(3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,GPU-8f2c")
    assert hardware.visible_gpus() == ["3", "5", "GPU-8f2c"]
    envs = _envs(RunConfig(accelerator="gpu"), 4)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["3", "5", "GPU-8f2c", "3"]
    # CUDA stops at an entry it cannot use: torch counts what it sees, the list is cut to that
    fake_gpus(2)
    assert hardware.visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    fake_gpus(0)
    assert hardware.visible_gpus() == []


@pytest.mark.parametrize("parent", [{}, {"CUDA_VISIBLE_DEVICES": "7"}])
def test_cpu_runs_and_machines_without_gpus_leave_cuda_visible_devices_alone(fake_gpus, parent):
    fake_gpus(2)
    assert worker_gpus(RunConfig(accelerator="cpu"), 2) == ([], 1)
    fake_gpus(0)
    assert worker_gpus(RunConfig(accelerator="auto"), 2) == ([], 1)
    for env in _envs(RunConfig(accelerator="auto"), 2, parent={**parent, WORKER_GPUS_ENV: "stale"}):
        assert env.get("CUDA_VISIBLE_DEVICES") == parent.get("CUDA_VISIBLE_DEVICES")
        assert WORKER_GPUS_ENV not in env  # its trials get no worker_gpus tag


def test_trials_on_several_devices_get_a_block_of_gpus_each(fake_gpus):
    fake_gpus(4)
    two = RunConfig(accelerator="gpu", devices=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in _envs(two, 2)] == ["0,1", "2,3"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in _envs(two, 3)] == ["0,1", "2,3", "0,1"]
    # --devices auto (every GPU the process sees): each worker's share
    auto = RunConfig(accelerator="gpu", devices="auto")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in _envs(auto, 2)] == ["0,1", "2,3"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in _envs(auto, 8)] == [str(i % 4) for i in range(8)]


def test_threads_and_pythonpath(fake_gpus):
    fake_gpus(0)
    env = worker_environment({"PYTHONPATH": "elsewhere", "KEEP": "1"}, 0, 4, cpus=2)
    assert env["OMP_NUM_THREADS"] == env["LIGHTNING_BATCH_THREADS"] == "1"  # never 0
    assert env["KEEP"] == "1"
    root, rest = env["PYTHONPATH"].split(":", 1)
    assert Path(root, "lightning_batch", "tune", "study.py").is_file() and rest == "elsewhere"


class _Recorded:
    """Stands in for a worker process: records how it was started, exits 0 at once."""

    started: list[tuple[list[str], dict[str, str]]] = []

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.pid = 100_000 + len(self.started)
        self.started.append((command, env))

    def wait(self) -> int:
        return 0


def test_the_worker_processes_are_started_with_these_environments(fake_gpus, monkeypatch, workdir: Path):
    from lightning_batch.tune import study as tuning

    fake_gpus(2)
    monkeypatch.setattr(tuning.subprocess, "Popen", _Recorded)
    monkeypatch.setattr(tuning.os, "cpu_count", lambda: 6)
    _Recorded.started = []
    lines: list[str] = []
    codes, pids = tuning._run_workers(RunConfig().validate(), TuneConfig(trials=5, workers=3), lines.append)
    assert codes == [0, 0, 0] and len(pids) == 3
    assert [command[-2:] for command, _ in _Recorded.started] == [["1", "2"], ["2", "2"], ["3", "1"]]
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in _Recorded.started] == ["0", "1", "0"]
    assert {env["OMP_NUM_THREADS"] for _, env in _Recorded.started} == {"2"}
    assert "GPUs per worker (CUDA_VISIBLE_DEVICES): 1: 0, 2: 1, 3: 0" in lines
    # --accelerator cpu: no GPU handed out, nothing said about GPUs
    _Recorded.started, lines[:] = [], []
    tuning._run_workers(
        RunConfig(accelerator="cpu").validate(), TuneConfig(trials=2, workers=2), lines.append
    )
    assert all("CUDA_VISIBLE_DEVICES" not in env for _, env in _Recorded.started)
    assert not [line for line in lines if "GPU" in line]


def test_a_trial_run_is_tagged_with_its_workers_gpus(monkeypatch, workdir: Path, tracking_uri: str):
    """What a worker given GPU 1 records (in-process: the worker reads its environment)."""
    monkeypatch.setenv(WORKER_GPUS_ENV, "1")
    tune(
        RunConfig(data="synthetic-regression", rows=400, features=4, epochs=1, tracking_uri=tracking_uri),
        TuneConfig(
            study="tagged", trials=1, pruner="none", retrain="none", storage=f"sqlite:///{workdir}/o.db"
        ),
        echo=lambda line: None,
    )
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tagged").experiment_id])
    trial = next(r for r in runs if "optuna_trial_number" in r.data.tags)
    assert trial.data.tags[WORKER_GPUS_TAG] == "1"
    study = next(r for r in runs if r.data.tags.get("lightning_batch.role") == "study")
    assert WORKER_GPUS_TAG not in study.data.tags


def test_a_study_on_a_missing_gpu_is_refused_before_it_exists(workdir: Path, tracking_uri: str):
    storage = workdir / "o.db"
    with pytest.raises(UserError, match="torch sees no GPU"):
        tune(
            RunConfig(data="iris", epochs=1, accelerator="gpu", tracking_uri=tracking_uri),
            TuneConfig(study="nogpu", trials=1, storage=f"sqlite:///{storage}"),
            echo=lambda line: None,
        )
    assert not storage.exists() and not (workdir / "mlruns").exists()


@pytest.mark.slow  # two real worker processes: ~20-35 s on 2 cores; the tests above cover each half
def test_two_workers_on_two_faked_gpus_tag_their_trials(fake_gpus, workdir: Path, tracking_uri: str):
    """Real worker processes get the environment: each trial's run names the GPU its worker saw."""
    fake_gpus(2)
    lines: list[str] = []
    result = tune(
        RunConfig(data="synthetic-regression", rows=400, features=4, epochs=1, tracking_uri=tracking_uri),
        TuneConfig(
            study="gpus",
            trials=2,
            workers=2,
            pruner="none",
            retrain="none",
            storage=f"sqlite:///{workdir}/optuna.db",
        ),
        echo=lines.append,
    )
    assert result.states["COMPLETE"] == 2, lines
    assert "GPUs per worker (CUDA_VISIBLE_DEVICES): 1: 0, 2: 1" in lines
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("gpus").experiment_id])
    trials = [r for r in runs if "optuna_trial_number" in r.data.tags]
    assert sorted(r.data.tags[WORKER_GPUS_TAG] for r in trials) == ["0", "1"]
    # torch in the workers finds no CUDA, so they trained on the CPU as auto says
    assert {r.data.params["accelerator"] for r in trials} == {"auto"}
    assert {r.data.tags["device_count"] for r in trials} == {"1"}
