"""Faults a user's run must survive: SIGKILL mid-epoch, a kill during a checkpoint save, NaN losses,
out-of-memory errors, and exploding gradients."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient

from lightning_batch.config import RunConfig
from lightning_batch.training import train

from .conftest import RUN_PY, subprocess_env

#: Deterministic on CPU whatever the timing: a fixed start batch, the noise policy (it reads gradient
#: statistics, not step times), no dropout.
RESUMABLE = dict(
    data="synthetic-regression",
    rows=6000,
    features=4,
    batch_size=16,
    policy="noise",
    lr=0.02,
    epochs=5,
    checkpoint_every=15,
    adjust_every=20,
    seed=3,
)


def _flags(options: dict) -> list[str]:
    out: list[str] = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def _final_weights(client: MlflowClient, run_id: str, folder: Path) -> dict[str, torch.Tensor]:
    path = client.download_artifacts(run_id, "checkpoints/final_weights.pt", str(folder))
    return torch.load(path, weights_only=True)


def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(workdir: Path, tracking_uri: str):
    reference = train(RunConfig(**RESUMABLE, tracking_uri=tracking_uri, experiment="reference"))

    process = subprocess.Popen(
        [
            sys.executable,
            str(RUN_PY),
            "train",
            *_flags(RESUMABLE),
            "--experiment",
            "killed",
            "--tracking-uri",
            tracking_uri,
        ],
        cwd=workdir,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = workdir / "mlruns" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("*/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 1.0))  # a random step, mid-epoch as likely as not
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run must still be training when killed"

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("killed").experiment_id
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "RUNNING"  # killed: nobody could close it
    saved = torch.load(next(checkpoints.glob(f"{killed.info.run_id}/last.ckpt")), weights_only=True)
    killed_at = saved["global_step"]

    done = subprocess.run(
        [
            sys.executable,
            str(RUN_PY),
            "train",
            "--resume",
            killed.info.run_id,
            "--tracking-uri",
            tracking_uri,
        ],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (resumed,) = client.search_runs([experiment])  # the same run went on: no second run
    assert resumed.info.run_id == killed.info.run_id
    assert resumed.info.status == "FINISHED", done.stdout[-3000:] + done.stderr[-3000:]
    assert resumed.data.tags["resumed"] == "true"
    n_train = int(resumed.data.params["n_train"])
    assert resumed.data.metrics["samples_seen"] == RESUMABLE["epochs"] * n_train, "no row skipped or repeated"

    expected = _final_weights(client, reference.run_id, workdir / "a")
    actual = _final_weights(client, resumed.info.run_id, workdir / "b")
    for name, tensor in expected.items():
        torch.testing.assert_close(
            actual[name], tensor, rtol=0, atol=1e-6, msg=f"{name} (killed at step {killed_at})"
        )
    decisions = [d["to"] for d in _decisions(client, reference.run_id, workdir / "c")]
    assert decisions == [d["to"] for d in _decisions(client, resumed.info.run_id, workdir / "d")]


def _decisions(client: MlflowClient, run_id: str, folder: Path) -> list[dict]:
    import json

    return json.loads(
        Path(client.download_artifacts(run_id, "batch_size_decisions.json", str(folder))).read_text()
    )["decisions"]


SAVE_LOOP = """
import sys, torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
io = TorchCheckpointIO()
i = 0
while True:
    i += 1
    io.save_checkpoint({"state_dict": {"w": torch.full((4_000_000,), float(i))}, "step": i}, sys.argv[1])
    print(i, flush=True)
"""


def test_a_kill_during_a_checkpoint_save_leaves_the_last_one_whole(tmp_path: Path):
    """Lightning's checkpoint IO (the one our ModelCheckpoints use) writes a temporary file and renames
    it: SIGKILL at random moments of a busy save loop never leaves a torn last.ckpt."""
    path = tmp_path / "last.ckpt"
    rng = random.Random()
    kills = 0
    for _ in range(6):
        process = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(path)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        process.stdout.readline()  # one save done: the file exists
        time.sleep(rng.uniform(0.0, 0.3))  # 16 MB a save: a kill lands mid-write most of the time
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        kills += 1
        saved = torch.load(path, weights_only=True)
        assert torch.all(saved["state_dict"]["w"] == float(saved["step"])), "a torn checkpoint"
    assert kills == 6


# -- numbers ---------------------------------------------------------------------------------------


class _PoisonStep(Callback):
    """Makes the loss NaN at one step by poisoning the model's weights before it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def test_a_nan_loss_fails_the_run_with_the_step_in_a_tag(tracking_uri: str):
    cfg = RunConfig(data="synthetic-regression", rows=2000, epochs=2, log_every=5, tracking_uri=tracking_uri)
    with pytest.raises(FloatingPointError, match="not finite"):
        train(cfg, callbacks=[_PoisonStep(12)])
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lightning-batch").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["nonfinite_step"] == "12"
    assert "not finite" in run.data.tags["error"] and "step 12" in run.data.tags["error"]


class _NanBatch(Callback):
    """Puts a NaN into the training batch at one step (the data, not the weights, go bad)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not self.done:
            self.done = True
            batch[0][0, 0] = float("nan")


def test_on_nan_skip_skips_the_step_halves_the_lr_and_counts_it(tracking_uri: str):
    cfg = RunConfig(
        data="synthetic-regression",
        rows=2000,
        epochs=2,
        lr=0.04,
        log_every=5,
        on_nan="skip",
        tracking_uri=tracking_uri,
    )
    result = train(cfg, callbacks=[_NanBatch(7)])
    assert result.status == "FINISHED"
    client = MlflowClient(tracking_uri)
    history = client.get_metric_history(result.run_id, "nan_skips")
    assert history and history[-1].value == 1
    assert client.get_metric_history(result.run_id, "lr")[-1].value == pytest.approx(0.02)
    assert torch.isfinite(torch.tensor(result.metrics["test_loss"]))


def test_out_of_memory_at_random_steps_is_recovered_with_the_same_result(tracking_uri: str):
    """OOMs injected at random steps: each step is redone in smaller passes over the same rows, so the
    weights end where an undisturbed run's do (up to float summation order)."""
    options = dict(
        data="synthetic-regression", rows=3000, features=4, batch_size=64, lr=0.05, epochs=2, seed=1
    )
    reference = train(RunConfig(**options, tracking_uri=tracking_uri, experiment="calm"))
    steps = sorted(random.Random().sample(range(1, 60), 3))

    class InjectOOM(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in steps and not getattr(pl_module.model, "_armed", False):
                original = pl_module.model.forward

                def failing_once(*args, **kwargs):
                    pl_module.model.forward = original
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

                pl_module.model.forward = failing_once

    disturbed = train(
        RunConfig(**options, tracking_uri=tracking_uri, experiment="oom"), callbacks=[InjectOOM()]
    )
    assert disturbed.status == "FINISHED"
    client = MlflowClient(tracking_uri)
    assert client.get_metric_history(disturbed.run_id, "oom_recoveries")[-1].value == len(steps)
    assert disturbed.samples_seen == reference.samples_seen
    expected = _final_weights(
        client, reference.run_id, Path(tracking_uri.removeprefix("sqlite:///")).parent / "a"
    )
    actual = _final_weights(
        client, disturbed.run_id, Path(tracking_uri.removeprefix("sqlite:///")).parent / "b"
    )
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_batch_that_never_fits_fails_naming_the_memory_budget(tracking_uri: str):
    cfg = RunConfig(
        data="synthetic-regression",
        rows=2000,
        batch_size="auto",
        memory_budget=1e-12,
        tracking_uri=tracking_uri,
    )
    with pytest.raises(Exception, match="memory budget") as raised:
        train(cfg)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lightning-batch").experiment_id])
    assert run.info.status == "FAILED" and "memory budget" in run.data.tags["error"]
    assert "--memory-budget" in str(raised.value)
