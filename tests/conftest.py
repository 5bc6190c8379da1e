"""Shared fixtures: every test writes its MLflow store under its own tmp folder."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from typing import IO

import lightning.pytorch as pl
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RUN_PY = ROOT / "experiments" / "run.py"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh folder so the default store (mlruns/) lands there; no inherited tracking URI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir}/mlruns/mlflow.db"


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty sqlite MLflow store (MLflow's schema migrations applied) to copy: migrating a new one
    costs seconds. Made once per MLflow version and kept beside pytest's temporary folders for later
    sessions (mutation testing runs the same tests hundreds of times); copy it, never open it."""
    import mlflow

    from lightning_batch.tracking.store import ensure_store

    kept = tmp_path_factory.getbasetemp().parent / f"lightning-batch-empty-mlflow-{mlflow.__version__}.db"
    if not kept.is_file():
        db = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
        ensure_store(f"sqlite:///{db}")
        staged = kept.with_name(f"{kept.name}.{os.getpid()}.tmp")
        shutil.copyfile(db, staged)
        os.replace(staged, kept)  # whole or not at all, whoever else makes it at the same time
    return kept


def quiet_trainer(epochs: int, callbacks: list | None = None, **options) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or sanity check; ``options`` override."""
    defaults = dict(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(options)
    return pl.Trainer(callbacks=callbacks or [], **defaults)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s: {last}")


def drain_to_file(stream: IO[str], into: Path) -> None:
    """Copy what a server writes to ``stream`` into ``into``, on a daemon thread, until it closes.

    An MLflow server (``run.py server`` or ``ui``) writes an access line per request to stdout. A
    pipe nobody reads fills after ~64 KiB (about 800 requests) and then blocks the server mid-request:
    a test that reads only the first lines must hand the rest to this.
    """

    def copy() -> None:
        with into.open("a") as out:
            for line in stream:
                out.write(line)

    threading.Thread(target=copy, daemon=True).start()


def stop_process_tree(process: subprocess.Popen) -> None:
    """Terminate a server started through run.py and the server process it started."""
    import psutil

    for child in psutil.Process(process.pid).children(recursive=True):
        child.terminate()
    process.terminate()
    process.wait(timeout=30)


warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def measured_step(net, meter, x, y, passes: int = 1) -> tuple[float, float]:
    """One step of a classifier measured by ``meter`` (then removed), its rows in ``passes`` equal
    passes whose losses are weighted by their share of the rows (as TaskModule and Lightning's
    accumulation weigh them)."""
    net.zero_grad()
    meter.begin_step(measure=True, batch=(x, y))
    for xs, ys in zip(x.tensor_split(passes), y.tensor_split(passes), strict=True):
        (torch.nn.functional.cross_entropy(net(xs), ys) * (len(xs) / len(x))).backward()
        meter.after_backward()
    meter.before_optimizer_step()
    estimate = meter.estimate(global_rows=len(x))
    meter.remove()
    assert estimate is not None
    return estimate
