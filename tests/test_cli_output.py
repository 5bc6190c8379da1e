"""What a newcomer copies and reads from the CLI: whole run ids, id prefixes, the end batch, the UI's URL.

Each test goes through ``run.py``'s own entry point (``main``) or the script itself, against a real
sqlite store read back with MLflow's own client.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.store.tracking import sqlalchemy_store

from lightning_batch.cli import _print_summary, main
from lightning_batch.config import RunConfig
from lightning_batch.tracking.store import ensure_store, get_or_create_experiment
from lightning_batch.training import train

from .conftest import RUN_PY, free_port, subprocess_env

# Two ids that share their first 10 characters, as two runs' ids may.
TWINS = ("6b8d55a3c3f143408a8a22f5f06986fb", "6b8d55a3c3aa11112222333344445555")


def _create_runs_with_ids(client: MlflowClient, experiment_id: str, ids: tuple[str, ...], **kwargs) -> None:
    """Runs whose ids are ``ids``: MLflow's sqlite store draws a run id from ``uuid.uuid4()``."""
    for run_id in ids:
        original = uuid.uuid4
        sqlalchemy_store.uuid.uuid4 = lambda run_id=run_id: uuid.UUID(run_id)
        try:
            assert client.create_run(experiment_id, **kwargs).info.run_id == run_id
        finally:
            sqlalchemy_store.uuid.uuid4 = original


@pytest.fixture
def store_with_twins(tracking_uri: str) -> tuple[str, MlflowClient, str]:
    ensure_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(tracking_uri, "a-long-experiment-name-that-wants-room")
    _create_runs_with_ids(
        client,
        experiment_id,
        TWINS,
        run_name="synthetic-regression-mlp-bauto-with-a-long-name",
        tags={"lightning_batch.error": "ValueError: " + "a long error message that wants to wrap " * 4},
    )
    return tracking_uri, client, experiment_id


@pytest.mark.parametrize("columns", [80, 200])
def test_run_ids_print_whole_on_one_line(
    store_with_twins, columns: int, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """``run.py runs`` and the training summary: an id is what users copy next, so it never wraps."""
    uri, _, _ = store_with_twins
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["runs", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    for run_id in TWINS:
        assert sum(run_id in line for line in out.splitlines()) == 1, out
    assert max(len(line) for line in out.splitlines()) <= columns

    result = SimpleNamespace(
        dataset="synthetic-regression-with-a-long-name",
        model="mlp",
        batch_size_start=32,
        batch_size_end=256,
        batch_size_max=512,
        epochs=200,
        metrics={"best_val_loss": 0.123, "test_loss": 0.456, "test_rmse": 1.5, "test_r2": 0.9},
        poor_fit=False,
        target_scaled=True,
        seconds=12.5,
        run_id=TWINS[0],
        tracking_uri=uri,
    )
    _print_summary([result])
    out = capsys.readouterr().out
    assert sum(TWINS[0] in line for line in out.splitlines()) == 1, out


def test_a_run_id_prefix_resolves_and_an_ambiguous_one_lists_the_candidates(
    store_with_twins, capsys: pytest.CaptureFixture
):
    uri, client, experiment_id = store_with_twins
    (other,) = [client.create_run(experiment_id).info.run_id]
    # Unique: `predict` resolves it to the whole id, whose (missing) model the error then names.
    assert main(["predict", other[:8], "--data", "x.csv", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert f"run {other!r} has no MLflow model" in err and len(err.splitlines()) == 1
    # Ambiguous: one line naming both candidates, for every command that takes a run id.
    for argv in (["predict", TWINS[0][:10], "--data", "x.csv"], ["report", TWINS[0][:10]]):
        assert main([*argv, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "matches 2 runs" in err and TWINS[0] in err and TWINS[1] in err
    # Shorter than 8 characters is no prefix: a study name, for `report`.
    assert main(["report", TWINS[0][:6], "--tracking-uri", uri]) == 2
    assert "neither a run id" in capsys.readouterr().err


def test_resume_takes_a_prefix_of_a_checkpointed_run(tracking_uri: str, workdir: Path, capsys):
    """``--resume`` resolves among the runs with checkpoint folders (what every DDP rank can read)."""
    checkpoints = workdir / "mlruns" / "checkpoints"
    for run_id in TWINS:
        (checkpoints / run_id).mkdir(parents=True)
    assert main(["train", "--resume", TWINS[0][:10], "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and TWINS[0] in err and TWINS[1] in err
    # Unique: the whole id reaches the resume, which names its (empty) checkpoint folder.
    assert main(["train", "--resume", TWINS[1][:11], "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err
    assert f"run {TWINS[1]!r} has no checkpoint to resume from" in err


def test_a_fixed_batch_with_a_short_last_batch_reports_the_batch_size_chosen(
    tracking_uri: str, capsys: pytest.CaptureFixture
):
    """700 training rows at 64 a step: 10 full steps and one of 60 an epoch. With a log window of
    11 steps, every window ends on the short step; the batch size used is still 64 everywhere."""
    result = train(
        RunConfig(
            data="synthetic-regression",
            rows=1000,
            batch_size=64,
            epochs=2,
            log_every=11,
            lr=0.05,
            tracking_uri=tracking_uri,
        )
    )
    client = MlflowClient(tracking_uri)
    n_train = int(client.get_run(result.run_id).data.params["n_train"])
    assert n_train % 64 and -(-n_train // 64) == 11, "the epoch's last step is a short one"
    logged = client.get_metric_history(result.run_id, "batch_size")
    assert sorted(m.step for m in logged) == [11, 22] and {m.value for m in logged} == {64.0}
    assert (result.batch_size_start, result.batch_size_end, result.batch_size_max) == (64, 64, 64)
    capsys.readouterr()
    assert main(["report", result.run_id[:8], "--tracking-uri", tracking_uri]) == 0
    assert "│ 64 → 64 (64)" in capsys.readouterr().out


def test_run_py_ui_prints_the_training_runs_page_in_the_model_training_view(store_with_twins, workdir: Path):
    uri, client, experiment_id = store_with_twins
    newer = get_or_create_experiment(uri, "newer")
    client.create_run(newer)

    def first_line(*extra: str) -> str:
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, str(RUN_PY), "ui", "--tracking-uri", uri, "--port", str(port), *extra],
            cwd=workdir,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            return server.stdout.readline()
        finally:
            server.kill()
            server.wait(timeout=30)

    line = first_line()
    assert f"/#/experiments/{newer}/runs?workflowType=machine_learning " in line, line
    line = first_line("--experiment", "a-long-experiment-name-that-wants-room")
    assert f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning " in line, line
    done = subprocess.run(
        [sys.executable, str(RUN_PY), "ui", "--tracking-uri", uri, "--experiment", "nope"],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "no experiment named 'nope'" in done.stderr


def test_the_decision_record_says_why_each_decision_point_kept_the_batch(tracking_uri: str, workdir: Path):
    """``--adjust-every 5``: every decision point is in batch_size_decisions.json, a change in
    ``decisions`` or a keep in ``kept`` with its reason; points without a fresh noise measurement
    say so."""
    result = train(
        RunConfig(
            data="synthetic-regression",
            rows=6000,
            batch_size="auto",
            epochs=2,
            adjust_every=5,
            lr=0.05,
            tracking_uri=tracking_uri,
        )
    )
    client = MlflowClient(tracking_uri)
    record = json.loads(
        Path(client.download_artifacts(result.run_id, "batch_size_decisions.json", str(workdir))).read_text()
    )
    kept = record["kept"]
    assert kept, "with decisions every 5 steps, some keep the batch"
    for entry in kept:
        assert entry["reason"].split(":")[0] in ("keep", "hold"), entry
        assert entry["step"] <= entry["last_step"] and entry["count"] >= 1
        if entry["new_measurements"] == 0:
            assert "no new noise measurement" in entry["reason"]
        else:
            assert "no new noise measurement" not in entry["reason"]
    steps = sorted([d["step"] for d in record["decisions"]] + [e["step"] for e in kept])
    assert len(steps) == len(set(steps)), "one entry per decision point"
