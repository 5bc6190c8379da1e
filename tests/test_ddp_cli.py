"""``run.py train`` under DDP on CPU (gloo): one MLflow run, written by global rank 0 only.

Lightning's DDP launcher runs the command once more per extra device, so each rank runs ``train``
from the start; only rank 0 may create, write and end the run. Everything is read back with
MLflow's own client: one run, FINISHED, ``samples_seen`` equal to epochs × training rows, each
metric's steps logged once, one set of artifacts, one summary printed. Then the same over two
"machines" (two processes started with NODE_RANK 0 and 1 over 127.0.0.1), a killed DDP run
resumed, a failing rank that still ends the run FAILED, and ``ddp_spawn`` refused in one line.

Each DDP run costs two cold Python starts (torch, Lightning, MLflow) on this 2-core machine,
about 20-30 s; the two-process and two-node runs are in the default suite, the kill-and-resume and
the failure tests are marked slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.utilities import rank_zero_only
from mlflow import MlflowClient

from lightning_batch.cli import main
from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.placement import resolve_placement
from lightning_batch.training import process_rank, train

from .conftest import ROOT, RUN_PY, free_port, subprocess_env

pytestmark = pytest.mark.ddp

#: 2000 rows split 70/15/15: 1400 training rows, an even number, so every global batch (a
#: multiple of 8, or a tail of what is left) is even and each of the two ranks trains half of it.
DATA = ["--data", "synthetic-regression", "--rows", "2000", "--features", "4", "--epochs", "2"]
EPOCHS = 2
SUMMARY_TITLE = "lightning-batch runs"


def _run(args: list[str], tmp_path: Path, *, script: Path = RUN_PY, timeout: float = 240, **env: str):
    return subprocess.run(
        [sys.executable, str(script), "train", *args],
        cwd=tmp_path,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _only_run(client: MlflowClient):
    """The one run in the store, whatever experiment: a second run would be a rank that wrote one."""
    runs = [
        run
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
    ]
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    return runs[0]


def _check_written_once(client: MlflowClient, run) -> None:
    """samples_seen = epochs × training rows, and no metric logged twice at a step."""
    run_id, n_train = run.info.run_id, int(run.data.params["n_train"])
    seen = client.get_metric_history(run_id, "samples_seen")
    assert max(m.value for m in seen) == EPOCHS * n_train
    assert run.data.metrics["samples_seen"] == EPOCHS * n_train
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
    assert len(client.get_metric_history(run_id, "train_loss")) >= 3


# In the default suite although it costs ~20 s (two processes start torch and Lightning): it is
# what the DDP-from-the-CLI promise rests on.
def test_run_py_train_with_two_ddp_processes_makes_one_finished_run(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = _run(
        [*DATA, "--batch-size", "auto", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
        + ["--tracking-uri", uri],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(SUMMARY_TITLE) == 1, done.stdout  # rank 1 prints nothing

    client = MlflowClient(uri)
    run = _only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["devices"] == "2" and run.data.params["strategy"] == "ddp"
    assert run.data.tags["device_count"] == "2"
    assert run.info.run_id in done.stdout
    _check_written_once(client, run)
    # The dynamic batch ran (rank 0 decided, both ranks switched; tests/test_callback.py checks the agreement).
    assert client.get_metric_history(run.info.run_id, "gns")
    assert len(run.inputs.dataset_inputs) == 1

    names = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert names == [
        "batch_size.png",
        "batch_size_decisions.json",
        "checkpoints",
        "config.yaml",
        "loss_curves.png",
        "preprocessing.json",
    ]
    checkpoints = sorted(a.path for a in client.list_artifacts(run.info.run_id, "checkpoints"))
    assert checkpoints == ["checkpoints/best.ckpt", "checkpoints/final_weights.pt"]
    # One run's artifact folder and one logged model (rank 0's), and the resumable checkpoints
    # cleared once it finished.
    assert sorted(p.name for p in (tmp_path / "artifacts").glob("*/*")) == sorted([run.info.run_id, "models"])
    assert len(list((tmp_path / "artifacts").glob("*/models/*"))) == 1
    assert list((tmp_path / "checkpoints").iterdir()) == []


# In the default suite too (~20 s): the README's multi-machine commands, run over 127.0.0.1.
def test_two_nodes_of_one_process_over_localhost_make_one_run(tmp_path: Path):
    """Lightning's own multi-node environment, started as the README's 'Several machines' says.

    Node 1 is given a store of its own, in a folder of its own: it must never open it (only global
    rank 0 writes), and it must not need node 0's files (it tests the best weights rank 0 sends).
    """
    node_dirs = [tmp_path / "node0", tmp_path / "node1"]
    for folder in node_dirs:
        folder.mkdir()
    uris = [f"sqlite:///{folder}/store/mlflow.db" for folder in node_dirs]
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, str(RUN_PY), "train", *DATA, "--batch-size", "64", "--accelerator", "cpu"]
            + ["--num-nodes", "2", "--devices", "1", "--tracking-uri", uris[node]],
            cwd=node_dirs[node],
            env=subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert outputs[0][0].count(SUMMARY_TITLE) == 1
    assert outputs[1][0] == "", "node 1 (global rank 1) prints no summary"
    assert list(node_dirs[1].iterdir()) == [], "node 1 wrote nothing"

    client = MlflowClient(uris[0])
    run = _only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["num_nodes"] == "2" and run.data.tags["device_count"] == "2"
    _check_written_once(client, run)
    assert "test_loss" in run.data.metrics


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_on_the_same_run(tmp_path: Path):
    """Both ranks SIGKILLed right after the step-50 checkpoint (epoch 1 of 2), then ``--resume RUN_ID``:
    the same run ends FINISHED with every training row seen once per epoch."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    killed = _run(
        [*DATA, "--batch-size", "32", "--checkpoint-every", "25", "--accelerator", "cpu"]
        + ["--devices", "2", "--strategy", "ddp", "--tracking-uri", uri],
        tmp_path,
        script=ROOT / "tests" / "run_py_with_faults.py",
        LB_KILL_AT_STEP="50",
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    client = MlflowClient(uri)
    run_id = _only_run(client).info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    assert (tmp_path / "checkpoints" / run_id / "last.ckpt").is_file()

    resumed = _run(["--resume", run_id, "--tracking-uri", uri], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count(SUMMARY_TITLE) == 1
    run = _only_run(client)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed"] == "true" and run.data.params["devices"] == "2"
    _check_written_once(client, run)
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert min(steps) <= 50 < max(steps), "logged before the kill and after the resume"


@pytest.mark.slow
def test_a_rank_that_fails_alone_still_ends_the_run_failed(tmp_path: Path):
    """Rank 1 raises mid-epoch. Lightning's launcher SIGKILLs rank 0's process as soon as rank 1 exits
    with an error, so rank 1 first closes its connections (rank 0's next collective fails and marks
    the run FAILED) and waits for rank 0 to exit."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = _run(
        [*DATA, "--batch-size", "32", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
        + ["--tracking-uri", uri],
        tmp_path,
        script=ROOT / "tests" / "run_py_with_faults.py",
        LB_FAIL_AT_STEP="20",
        LB_FAIL_RANK="1",
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "injected failure on rank 1 at step 20" in done.stderr
    run = _only_run(MlflowClient(uri))
    assert run.info.status == "FAILED"
    # gloo words it "closed" when rank 1's socket shut cleanly, "reset" when the close raced a send.
    assert re.search(r"Connection (closed|reset) by peer", run.data.tags["error"]), run.data.tags["error"]
    assert SUMMARY_TITLE not in done.stdout


def test_ddp_spawn_is_refused_in_one_line_before_a_run_exists(workdir: Path, capsys):
    uri = f"sqlite:///{workdir}/mlflow.db"
    args = ["train", "--data", "iris", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp_spawn"]
    assert main([*args, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --strategy ddp_spawn is not supported")
    assert "use --strategy ddp" in err
    assert not (workdir / "mlflow.db").exists()
    with pytest.raises(UserError, match="ddp_spawn is not supported"):
        train(RunConfig(data="iris", accelerator="cpu", devices=2, strategy="ddp_spawn", tracking_uri=uri))


@pytest.mark.parametrize(
    ("env", "placement", "rank"),
    [
        ({}, dict(devices=2), 0),
        ({"LOCAL_RANK": "1"}, dict(devices=2), 1),  # a process Lightning's launcher started
        ({"NODE_RANK": "1"}, dict(devices=1, num_nodes=2), 1),  # the second machine
        ({"NODE_RANK": "1", "LOCAL_RANK": "1"}, dict(devices=2, num_nodes=2), 3),
    ],
)
def test_process_rank_is_lightnings_global_rank_before_the_fit(
    monkeypatch: pytest.MonkeyPatch, env: dict, placement: dict, rank: int
):
    for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Building a DDP Trainer sets Lightning's process-wide rank: put it back for the other tests.
    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))
    cfg = RunConfig(accelerator="cpu", strategy="ddp", **placement)
    assert process_rank(resolve_placement(cfg)) == rank
    assert os.environ.get("LOCAL_RANK") == env.get("LOCAL_RANK")  # nothing launched, nothing set


def test_a_single_process_run_is_rank_zero_without_building_a_trainer():
    assert process_rank(resolve_placement(RunConfig(accelerator="cpu"))) == 0


def test_another_ranks_error_line_names_its_rank(monkeypatch: pytest.MonkeyPatch, capsys):
    from lightning_batch import cli

    monkeypatch.setattr(rank_zero_only, "rank", 1)

    def diverged(args):
        raise FloatingPointError("val_loss is nan after epoch 0")

    monkeypatch.setattr(cli, "run_train", diverged)
    assert main(["train"]) == 1
    err = capsys.readouterr().err
    assert err == "error: rank 1: val_loss is nan after epoch 0\n"  # rank 0 says the run is FAILED
