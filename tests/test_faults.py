"""Faults a user's run must survive: SIGKILL mid-epoch, a kill during a checkpoint save, NaN losses,
out-of-memory errors, and exploding gradients."""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from lightning_batch.cli import main
from lightning_batch.config import RunConfig
from lightning_batch.tabular.networks import LinearRegression
from lightning_batch.tabular.task_module import MAX_CONSECUTIVE_NAN_SKIPS, NonFiniteLossError, TaskModule
from lightning_batch.training import train

from .conftest import ROOT, RUN_PY, quiet_trainer, subprocess_env

#: Deterministic on CPU whatever the timing: a fixed start batch, the noise policy (it reads gradient
#: statistics, not step times) measured every 20 steps (not by a time budget), no dropout.
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
    measure_every=20,
    seed=3,
)


def _flags(options: dict) -> list[str]:
    out: list[str] = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def _run_py(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """``python experiments/run.py ARGS`` in ``workdir``, its output captured."""
    return subprocess.run(
        [sys.executable, str(RUN_PY), *args],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _final_weights(client: MlflowClient, run_id: str, folder: Path) -> dict[str, torch.Tensor]:
    path = client.download_artifacts(run_id, "checkpoints/final_weights.pt", str(folder))
    return torch.load(path, weights_only=True)


# Slow: tests/test_resume.py kills at a fixed, known step (mid-epoch, after a resize) in the default suite.
@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(workdir: Path, tracking_uri: str):
    reference = train(RunConfig(**RESUMABLE, tracking_uri=tracking_uri, experiment="reference"))

    # The whole fit takes about a second on an idle machine, so each step sleeps 20 ms (about 4 s in
    # all, the run's results unchanged: nothing in RESUMABLE reads the clock) and the kill lands
    # within the first 2 s after the first step checkpoint: mid-training, at a step nobody chose.
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "run_py_with_faults.py"),
            "train",
            *_flags(RESUMABLE),
            "--experiment",
            "killed",
            "--tracking-uri",
            tracking_uri,
        ],
        cwd=workdir,
        env={**subprocess_env(), "LB_STEP_SLEEP_S": "0.02"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = workdir / "mlruns" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("*/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 2.0))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run must still be training when killed"

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("killed").experiment_id
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "RUNNING"  # killed: nobody could close it
    saved = torch.load(next(checkpoints.glob(f"{killed.info.run_id}/last.ckpt")), weights_only=True)
    killed_at = saved["global_step"]

    # `run.py runs --reap` ends the lost run FAILED; `--resume` still continues it.
    reaped = _run_py(workdir, "runs", "--reap", "--experiment", "killed", "--tracking-uri", tracking_uri)
    assert reaped.returncode == 0, reaped.stderr[-3000:]
    assert f"marked FAILED (process lost): {killed.info.run_id}" in reaped.stdout, reaped.stdout
    assert client.get_run(killed.info.run_id).info.status == "FAILED"

    done = _run_py(workdir, "train", "--resume", killed.info.run_id, "--tracking-uri", tracking_uri)
    assert done.returncode == 0, done.stderr[-3000:]
    (resumed,) = client.search_runs([experiment])  # the same run went on: no second run
    assert resumed.info.run_id == killed.info.run_id
    assert resumed.info.status == "FINISHED", done.stdout[-3000:] + done.stderr[-3000:]
    assert resumed.data.tags["resumed"] == "true" and "error" not in resumed.data.tags
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


#: A wide MLP: ~4.4 MB of weights, so each of its every-step saves of last.ckpt takes a while.
WIDE = dict(
    data="synthetic-regression",
    rows=1200,
    features=64,
    model="mlp",
    hidden="1024 1024",
    batch_size=32,
    lr=0.001,
    epochs=1,
    checkpoint_every=1,
    log_every=50,
)


def _temp_files(folder: Path) -> list[Path]:
    """AtomicCheckpointIO's temporary files (``.last.ckpt.PID.tmp``) in ``folder`` that hold bytes."""
    found = []
    if not folder.is_dir():
        return found
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                if entry.name.endswith(".tmp") and entry.is_file() and entry.stat().st_size:
                    found.append(Path(entry.path))
            except FileNotFoundError:  # renamed over last.ckpt meanwhile
                pass
    return found


def _stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (Linux /proc)."""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended
        if state not in ("T", "t"):
            return False
    return True


def _kill_a_wide_run_while_saving(workdir: Path, tracking_uri: str, temp: Path) -> tuple[Path, list[Path]]:
    """Start ``run.py train`` on WIDE with $TMPDIR at ``temp``; once a last.ckpt exists, SIGKILL the
    run as soon as a temporary file of a save holds bytes beside it (checked while the run is
    stopped with SIGSTOP, so the kill lands in that very save). Returns last.ckpt and the temporary
    files seen at the kill."""
    flags = [*_flags({k: v for k, v in WIDE.items() if k != "hidden"}), "--hidden", *WIDE["hidden"].split()]
    process = subprocess.Popen(
        [sys.executable, str(RUN_PY), "train", *flags, "--tracking-uri", tracking_uri],
        cwd=workdir,
        env=subprocess_env(TMPDIR=str(temp)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = workdir / "mlruns" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("*/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.01)
    (last,) = checkpoints.glob("*/last.ckpt")  # one save finished: there is a last.ckpt to keep whole
    in_progress: list[Path] = []
    while process.poll() is None and time.monotonic() < deadline:
        if not _temp_files(last.parent):
            time.sleep(0.0005)  # a save's temporary file lives for milliseconds: poll often, not busily
            continue
        # Freeze the run, then look: a save caught in progress is still in progress at the kill.
        process.send_signal(signal.SIGSTOP)
        while not _stopped(process.pid) and process.poll() is None:
            time.sleep(0.001)
        temps = _temp_files(last.parent)
        if temps:
            in_progress = temps
            break
        process.send_signal(signal.SIGCONT)  # the save finished meanwhile: wait for the next one
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run must still be training when killed"
    assert in_progress, "no checkpoint save was caught in progress"
    return last, in_progress


def test_a_kill_during_a_checkpoint_save_leaves_the_last_one_whole(workdir: Path, tracking_uri: str):
    """SIGKILL ``run.py train --checkpoint-every 1`` while it writes last.ckpt: the previous last.ckpt
    stays whole (it loads with weights_only=True) and ``--resume`` from it finishes the run.

    AtomicCheckpointIO writes a checkpoint to a temporary file beside last.ckpt and renames it over
    last.ckpt; the test kills the run while such a file holds bytes: a save is then in progress, never
    finished (the file is left behind). $TMPDIR points at another filesystem where there is one (a
    tmpfs): Lightning's own writer staged checkpoints there and *copied* them over last.ckpt, which a
    kill tore (measured); this writer does not use $TMPDIR at all.
    """
    other = _other_filesystem()
    temp = Path(tempfile.mkdtemp(dir=other)) if other is not None else workdir / "tmp"
    temp.mkdir(exist_ok=True)
    try:
        last, in_progress = _kill_a_wide_run_while_saving(workdir, tracking_uri, temp)
        assert not list(temp.iterdir()), "nothing may be staged in $TMPDIR"
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    (orphan,) = in_progress
    assert orphan.exists(), "the kill came after the save had finished"
    assert orphan.read_bytes()[:2] == b"PK", "the temporary file is not a checkpoint (torch's zip format)"

    saved = torch.load(last, weights_only=True)
    client = MlflowClient(tracking_uri)
    run_id = last.parent.name
    params = client.get_run(run_id).data.params
    steps_per_epoch = -(-int(params["n_train"]) // WIDE["batch_size"])
    # killed mid-epoch 0, before its last step: the save in progress was a step save of last.ckpt
    # (best.ckpt is written only after a validation)
    assert saved["epoch"] == 0 and 0 < saved["global_step"] < steps_per_epoch - 1
    assert not (last.parent / "best.ckpt").exists()
    weights = saved["state_dict"]
    assert weights["model.net.0.weight"].shape == (1024, 64)
    assert weights["model.net.2.weight"].shape == (1024, 1024)
    assert all(torch.isfinite(t).all() for t in weights.values())

    # the same command a user types (in this process: a second interpreter would cost its imports)
    assert main(["train", "--resume", str(last), "--tracking-uri", tracking_uri]) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert run.data.metrics["samples_seen"] == int(params["n_train"]), "no row skipped or repeated"


def _other_filesystem() -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != Path.cwd().stat().st_dev:
        return shm
    return None


def test_the_checkpoint_writer_stages_beside_the_target_and_renames(tmp_path: Path, monkeypatch):
    """Whatever $TMPDIR is, the temporary file lives in the checkpoint's folder and an atomic rename
    puts it in place (a move across filesystems would be a copy, torn by a kill)."""
    from lightning_batch.plugin.checkpoint_io import AtomicCheckpointIO

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((Path(a), Path(b))), real_replace(a, b)))
    target = tmp_path / "run" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3)}, target)
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(4)}, target)
    assert [(a.parent, b) for a, b in renames] == [(target.parent, target)] * 2
    assert torch.load(target, weights_only=True)["w"].tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"], "no temporary file left"
    assert not list(elsewhere.iterdir())
    # a killed writer's leftover goes with the next save; a live process's file stays
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan = target.parent / f".last.ckpt.{int(dead.stdout)}.tmp"
    # a live process of this test's own: never signal another (mutation testing may turn the probe into one)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = target.parent / f".last.ckpt.{writer.pid}.tmp"
    orphan.write_bytes(b"PK torn"), live.write_bytes(b"PK busy")
    try:
        AtomicCheckpointIO().save_checkpoint({"w": torch.arange(5)}, target)
    finally:
        alive = writer.poll() is None
        writer.kill()
        writer.wait()
    assert not orphan.exists() and live.exists()
    assert alive, "the live writer was disturbed by the check"


def test_the_checkpoint_s_bytes_are_on_disk_before_it_is_renamed_over_the_last_one(
    tmp_path: Path, monkeypatch
):
    """The rename is atomic, but after a power cut a renamed file whose bytes were still in Python's
    buffer or the page cache is empty: the writer must flush and fsync the temporary file, whole,
    before renaming it over last.ckpt. Recorded here: what each fsync and rename sees on disk."""
    from lightning_batch.plugin.checkpoint_io import AtomicCheckpointIO

    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        status = os.fstat(fd)
        events.append(("fsync", (status.st_dev, status.st_ino), status.st_size))

    def replace(source, destination) -> None:
        status = os.stat(source)
        events.append(("rename", (status.st_dev, status.st_ino), status.st_size, Path(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "run" / "last.ckpt"
    for step in (1, 2):  # a first save, then one over an existing last.ckpt
        events.clear()
        AtomicCheckpointIO().save_checkpoint({"step": step, "w": torch.arange(8)}, target)
        renames = [e for e in events if e[0] == "rename"]
        assert len(renames) == 1 and renames[0][3] == target, events
        _, renamed_file, size, _ = renames[0]
        assert size == target.stat().st_size > 0
        synced = events[: events.index(renames[0])]
        assert ("fsync", renamed_file, size) in synced, (
            f"the renamed file was not fsynced whole first: {events}"
        )
        assert torch.load(target, weights_only=True)["step"] == step


# -- numbers ---------------------------------------------------------------------------------------


class _PoisonStep(Callback):
    """Makes the loss NaN at one step by poisoning the model's weights before it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


#: A short regression run for the non-finite-loss tests.
NAN_RUN = dict(data="synthetic-regression", rows=2000, epochs=2, log_every=5)


def test_a_nan_loss_fails_the_run_with_the_step_in_a_tag(tracking_uri: str):
    """--on-nan fail: today's behaviour before rollbacks (the default) existed."""
    cfg = RunConfig(**NAN_RUN, on_nan="fail", tracking_uri=tracking_uri)
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
    cfg = RunConfig(**NAN_RUN, lr=0.04, on_nan="skip", tracking_uri=tracking_uri)
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


def _nan_validation(monkeypatch: pytest.MonkeyPatch, when=lambda module: True) -> None:
    """Validation inputs become NaN (for the modules ``when`` picks); training batches are untouched."""
    original = TaskModule.validation_step

    def poisoned(self, batch, batch_idx):
        x, y = batch
        if when(self):
            x = torch.full_like(x, float("nan"))
        return original(self, (x, y), batch_idx)

    monkeypatch.setattr(TaskModule, "validation_step", poisoned)


def test_a_nan_validation_loss_with_a_finite_training_loss_fails_the_run(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    _nan_validation(monkeypatch)
    argv = ["train", "--data", "synthetic-regression", "--rows", "600", "--features", "4", "--epochs", "2"]
    status = main([*argv, "--log-every", "1", "--tracking-uri", tracking_uri])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 1
    assert len(lines) == 1 and lines[0].startswith("error: val_loss is nan after epoch 0"), lines
    assert lines[0].endswith("(the run is marked FAILED in MLflow)")
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lightning-batch").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("FloatingPointError: val_loss is nan after epoch 0")
    assert "nonfinite_step" not in run.data.tags  # the training loss never was
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(losses) == -(-int(run.data.params["n_train"]) // 32) and all(map(math.isfinite, losses))


def test_in_a_study_a_nan_validation_loss_is_a_failed_trial_not_a_pruned_one(
    workdir: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
):
    """Trial 1 validates to NaN while it trains finely. The median pruner (after 1 complete trial,
    from epoch 1) would call a NaN PRUNED; StopOnNonFiniteLoss fails the trial at epoch 0 first."""
    import optuna

    from lightning_batch.tune.space import TuneConfig
    from lightning_batch.tune.study import tune

    _nan_validation(monkeypatch, when=lambda module: module.hparams.lr == 0.0123)
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    options = TuneConfig(
        study="nan-val",
        trials=2,
        storage=storage,
        startup_trials=1,
        retrain="none",
        space={"lr": {"low": 0.001, "high": 0.1, "log": True}},
        enqueue=[{"lr": 0.05}, {"lr": 0.0123}],
    )
    base = RunConfig(data="synthetic-regression", rows=600, features=4, epochs=2, tracking_uri=tracking_uri)
    result = tune(base, options, echo=lambda line: None)
    assert result.states["COMPLETE"] == 1 and result.states["FAIL"] == 1 and not result.states["PRUNED"]
    trials = optuna.load_study(study_name="nan-val", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["fail_reason"].startswith("FloatingPointError: val_loss is nan after epoch 0")
    client = MlflowClient(tracking_uri)
    run = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "val_loss is nan" in run.data.tags["error"]


class _NanBatches(Callback):
    """Makes the training batches at the given indices NaN, so their loss is NaN."""

    def __init__(self, batches) -> None:
        self.batches = set(batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.batches:
            batch[0].fill_(float("nan"))


def _fit_skipping_nans(nan_batches) -> tuple[TaskModule, pl.Trainer]:
    """One epoch of 64 batches of 8 rows, a linear model, ``on_nan="skip"``, lr 0.1."""
    torch.manual_seed(0)
    x = torch.randn(64 * 8, 3)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    module = TaskModule(LinearRegression(3), task="regression", lr=0.1, on_nan="skip", log_every=1000)
    trainer = quiet_trainer(1, callbacks=[_NanBatches(nan_batches)])
    trainer.fit(module, loader)
    return module, trainer


def test_on_nan_skip_skips_20_nan_steps_in_a_row_and_fails_on_the_21st():
    """The documented limit, exactly: 20 NaN steps in a row are skipped (each halving the lr), the
    21st fails the run with its step; a finite step in between starts the count again."""
    assert MAX_CONSECUTIVE_NAN_SKIPS == 20  # the README states 20
    module, trainer = _fit_skipping_nans(range(5, 25))
    assert module.nan_skips == 20 and trainer.global_step == 64 - 20
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1 * 0.5**20

    with pytest.raises(NonFiniteLossError, match="at step 5 after 20 skipped steps") as raised:
        _fit_skipping_nans(range(5, 26))
    assert raised.value.step == 5  # skipped steps do not move global_step: 5 steps were taken

    module, trainer = _fit_skipping_nans([*range(5, 25), *range(26, 46)])  # batch 25 is finite
    assert module.nan_skips == 40 and trainer.global_step == 64 - 40
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1 * 0.5**40


def test_by_default_a_nan_batch_is_rolled_back_and_the_run_finishes(tracking_uri: str):
    """The default on_nan is rollback: one poisoned batch costs a rollback (a warning, a tag, the
    rollbacks metric and half the lr), not the run."""
    cfg = RunConfig(**NAN_RUN, lr=0.04, tracking_uri=tracking_uri)
    result = train(cfg, callbacks=[_NanBatch(12)])
    assert result.status == "FINISHED"
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.data.tags["rollback"].startswith("step 12: the training loss reached nan")
    assert run.data.metrics["rollbacks"] == 1.0
