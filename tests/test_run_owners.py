"""Run owners and the reaper: a RUNNING run whose process died ends FAILED ("process lost").

The owners here are real processes really SIGKILLed (``sleep``: no import cost); the runs are in a
real sqlite store, read back with MLflow's own client. tests/test_resume.py covers a real ``train``
SIGKILLed mid-fit, reaped by the next ``train`` and resumed to FINISHED (tests/test_faults.py, slow:
``run.py train`` killed from outside, ``run.py runs --reap``, ``run.py train --resume``). Also here:
experiments are created as MLflow 3 model-training experiments.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lightning_batch.cli import main
from lightning_batch.tracking import run_owners
from lightning_batch.tracking.run_owners import (
    ERROR_TAG,
    OWNER_HOST_TAG,
    OWNER_MACHINE_TAG,
    OWNER_PID_TAG,
    OWNER_STARTED_TAG,
    PROCESS_LOST_TAG,
    Owner,
    process_start,
)
from lightning_batch.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    ensure_store,
    get_or_create_experiment,
)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty sqlite store, made once: creating one costs seconds (MLflow's migrations)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    ensure_store(f"sqlite:///{db}")
    return db


@pytest.fixture
def store(empty_store: Path, workdir: Path) -> str:
    """A fresh copy of the empty store at ``mlruns/mlflow.db`` in this test's folder; its URI."""
    db = workdir / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(empty_store, db)
    return f"sqlite:///{db}"


def _killed_owner() -> Owner:
    """The owner tags of a real process that was SIGKILLed (and waited for: its pid is free)."""
    child = subprocess.Popen(["sleep", "60"])
    owner = Owner(socket.gethostname(), child.pid, process_start(child.pid))
    assert owner.started and owner.state() == "alive"
    child.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_start(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert owner.state() == "gone", "a killed child not yet waited for (a zombie) is gone"
    child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    return owner


def _run(client: MlflowClient, experiment_id: str, name: str, tags: dict[str, str]) -> str:
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def _runs_cli(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(["runs", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_runs_reap_ends_only_this_hosts_lost_runs_failed(
    store: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    # This machine's id, fixed: a machine without /etc/machine-id would make the other-machine case
    # indistinguishable (and is documented as relying on host names alone).
    monkeypatch.setattr(run_owners, "machine_id", lambda: "this-machine")
    client = MlflowClient(store)
    lost_exp = get_or_create_experiment(store, "lost")
    other_exp = get_or_create_experiment(store, "other")
    me = Owner.of_this_process()
    dead, dead_too = _killed_owner(), _killed_owner()
    runs = {
        "killed": _run(client, lost_exp, "killed", dead.tags()),
        "killed-other-experiment": _run(client, other_exp, "killed-other", dead_too.tags()),
        "alive": _run(client, lost_exp, "alive", me.tags()),
        # Same pid as this live process, another start: the kernel reused the dead owner's pid.
        "pid-reused": _run(client, lost_exp, "pid-reused", {**me.tags(), OWNER_STARTED_TAG: "0/0"}),
        "other-host": _run(
            client, lost_exp, "other-host", {**dead.tags(), OWNER_HOST_TAG: "another-machine"}
        ),
        # This host's name on another machine (a cloned image): its pid means nothing here.
        "same-name-other-machine": _run(
            client, lost_exp, "same-name", {**dead.tags(), OWNER_MACHINE_TAG: "another-machine-id"}
        ),
        "no-owner": _run(client, lost_exp, "no-owner", {}),
    }
    finished = _run(client, lost_exp, "finished", dead.tags())
    client.set_terminated(finished, "FINISHED")

    def status(key: str) -> str:
        return client.get_run(runs[key]).info.status

    # Listing only says which runs are lost; it changes nothing.
    out = _runs_cli(capsys, "--tracking-uri", store)
    assert out.count("RUNNING (process lost)") == 3, out
    assert "3 RUNNING run(s) whose process on this host is gone" in out
    assert all(status(k) == "RUNNING" for k in runs)

    # --reap with an experiment filter touches that experiment only.
    out = _runs_cli(capsys, "--reap", "--experiment", "other", "--tracking-uri", store)
    assert f"marked FAILED (process lost): {runs['killed-other-experiment']}" in out
    assert status("killed-other-experiment") == "FAILED" and status("killed") == "RUNNING"

    out = _runs_cli(capsys, "--reap", "--tracking-uri", store)
    assert status("killed") == status("pid-reused") == "FAILED"
    assert status("alive") == status("other-host") == status("no-owner") == "RUNNING"
    assert status("same-name-other-machine") == "RUNNING"
    assert client.get_run(finished).info.status == "FINISHED"
    killed = client.get_run(runs["killed"])
    assert killed.data.tags[ERROR_TAG].startswith(f"process lost: pid {dead.pid} on {dead.host} is gone")
    assert f"run.py train --resume {runs['killed']}" in killed.data.tags[ERROR_TAG]
    assert killed.data.tags[PROCESS_LOST_TAG].startswith(
        f"pid {dead.pid} on {dead.host}; noticed by pid {me.pid}"
    )
    assert killed.info.end_time is not None
    assert runs["killed"] in out and runs["pid-reused"] in out and "marked FAILED (process lost)" in out

    # Reaping again finds nothing; listing by state shows the reaped runs as FAILED.
    assert run_owners.reap_lost_runs(client) == []
    out = _runs_cli(capsys, "--status", "FAILED", "--tracking-uri", store)
    assert out.count("process lost: pid") == 3 and "RUNNING" not in out

    # A resume claims the run: this process owns it, the error goes, the history stays.
    run_owners.claim_run(client, runs["killed"])
    tags = client.get_run(runs["killed"]).data.tags
    assert (tags[OWNER_HOST_TAG], tags[OWNER_PID_TAG]) == (me.host, str(me.pid))
    assert ERROR_TAG not in tags and PROCESS_LOST_TAG in tags


def test_the_reap_is_one_query_for_the_running_runs(store: str):
    """train and tune reap at start: one search_experiments and one search_runs (RUNNING, this host),
    however many finished runs the store holds."""
    client = MlflowClient(store)
    experiment = get_or_create_experiment(store, "many")
    for i in range(10):
        client.set_terminated(
            _run(client, experiment, f"done-{i}", Owner.of_this_process().tags()), "FINISHED"
        )
    lost = _run(client, experiment, "lost", _killed_owner().tags())
    calls: list[tuple[str, str]] = []

    class Counting:
        def __getattr__(self, name):
            method = getattr(client, name)

            def counted(*args, **kwargs):
                calls.append((name, kwargs.get("filter_string", "")))
                return method(*args, **kwargs)

            return counted

    assert [r.info.run_id for r in run_owners.reap_lost_runs(Counting())] == [lost]
    searches = [c for c in calls if c[0].startswith("search")]
    assert [c[0] for c in searches] == ["search_experiments", "search_runs"]
    assert (
        searches[1][1]
        == f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST_TAG}` = '{socket.gethostname()}'"
    )


def test_a_lost_study_run_is_reaped_and_claimed_by_the_next_tune(workdir: Path, store: str):
    """A tune killed mid-study leaves its parent run RUNNING; the next tune of that study reaps it and
    owns it again (the study goes on in the same parent run)."""
    from lightning_batch.config import RunConfig
    from lightning_batch.tune.space import TuneConfig
    from lightning_batch.tune.study import ensure_parent_run, open_study

    base = RunConfig(data="iris", epochs=1, tracking_uri=store)
    options = TuneConfig(study="owned", trials=1, storage=f"sqlite:///{workdir}/optuna.db").validate()
    study, url = open_study(base, options)
    parent = ensure_parent_run(study, base, options, url).run_id
    client = MlflowClient(store)
    assert Owner.from_tags(client.get_run(parent).data.tags) == Owner.of_this_process()

    dead = _killed_owner()
    client.set_tag(parent, OWNER_PID_TAG, str(dead.pid))  # as if a tune that died had claimed it last
    client.set_tag(parent, OWNER_STARTED_TAG, dead.started)
    assert ensure_parent_run(study, base, options, url).run_id == parent
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and Owner.from_tags(run.data.tags) == Owner.of_this_process()
    assert run.data.tags[PROCESS_LOST_TAG].startswith(f"pid {dead.pid} ")
    assert ERROR_TAG not in run.data.tags


def test_experiments_are_model_training_experiments(store: str):
    """MLflow 3's UI opens an experiment without a kind in its GenAI view; ours are marked for model
    training when created, and older ones when next used; a kind someone set stays."""
    client = MlflowClient(store)
    new = get_or_create_experiment(store, "new")
    old = client.create_experiment("old")  # as made before the tag existed
    genai = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert get_or_create_experiment(store, "old") == old
    assert get_or_create_experiment(store, "genai") == genai
    assert (
        client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    )
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(genai).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_process_start_tells_a_reused_pid_apart():
    owner = Owner.of_this_process()
    assert owner.started == process_start(os.getpid())
    assert Owner(owner.host, owner.pid, "0/0").state() == "gone"
    assert Owner(owner.host, owner.pid, None).state() == "alive"  # no start recorded: the pid decides
    assert Owner("another-machine", owner.pid, owner.started).state() == "elsewhere"
    assert Owner.from_tags({OWNER_HOST_TAG: "h", OWNER_PID_TAG: "not-a-pid"}) is None


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--experiment", "nope"], "no experiment named 'nope'"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--status", "DONE"], "invalid choice: 'DONE'"),
    ],
)
def test_runs_bad_input_is_one_line_and_exit_2(
    argv: list[str], fragment: str, store: str, capsys: pytest.CaptureFixture
):
    assert main(["runs", *argv, "--tracking-uri", store]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_runs_on_a_store_that_does_not_exist_creates_nothing(workdir: Path, capsys: pytest.CaptureFixture):
    assert main(["runs"]) == 2
    assert capsys.readouterr().err.startswith("error: no runs yet: 'mlruns/mlflow.db' does not exist")
    assert not (workdir / "mlruns").exists()


def test_resuming_a_run_whose_owner_is_alive_is_refused_in_one_line(
    store: str, workdir: Path, capsys: pytest.CaptureFixture
):
    """Two processes must not train and write one run: ``--resume`` of a RUNNING run whose owner (a
    real process, here ``sleep``) is alive is exit 2 with one line, and the run is left as it was."""
    client = MlflowClient(store)
    experiment_id = get_or_create_experiment(store, "Default")
    owner_process = subprocess.Popen(["sleep", "60"])
    try:
        owner = Owner(socket.gethostname(), owner_process.pid, process_start(owner_process.pid))
        run_id = _run(client, experiment_id, "live", owner.tags())
        # What a run that reached its first checkpoint leaves beside the store.
        folder = workdir / "mlruns" / "checkpoints" / run_id
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("data: synthetic-regression\nrows: 300\nfeatures: 3\nepochs: 1\n")
        (folder / "last.ckpt").write_bytes(b"not read: the owner check comes first")

        assert main(["train", "--resume", run_id, "--tracking-uri", store]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
        assert f"pid {owner_process.pid}" in err and "still being trained" in err
        after = client.get_run(run_id)
        assert after.info.status == "RUNNING" and Owner.from_tags(after.data.tags) == owner
        assert "resumed" not in after.data.tags
        assert len(client.search_runs([experiment_id])) == 1, "no other run was made"
    finally:
        owner_process.kill()
        owner_process.wait(timeout=10)
    # The owner gone, a resume claims the run: this process owns it, RUNNING again (the resume
    # itself would then fail on the fake checkpoint).
    assert owner.state() == "gone"
    run_owners.claim_for_resume(store, run_id)
    claimed = client.get_run(run_id)
    assert Owner.from_tags(claimed.data.tags) == Owner.of_this_process()
    assert claimed.info.status == "RUNNING"
    run_owners.claim_for_resume(store, run_id)  # its own run: not refused
