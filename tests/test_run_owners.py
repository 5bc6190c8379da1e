"""Run owners and the reaper: a RUNNING run whose process died ends FAILED ("process lost").

The owners here are real processes really SIGKILLed (``sleep``: no import cost); the runs are in a
real sqlite store, read back with MLflow's own client. tests/test_resume.py covers a real ``train``
SIGKILLed mid-fit, reaped by the next ``train`` and resumed to FINISHED (tests/test_faults.py, slow:
``run.py train`` killed from outside, ``run.py runs --reap``, ``run.py train --resume``). Also here:
experiments are created as MLflow 3 model-training experiments.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import datetime, timezone
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
    get_or_create_experiment,
)


@pytest.fixture
def store(migrated_store: Path, workdir: Path) -> str:
    """A fresh copy of the empty store at ``mlruns/mlflow.db`` in this test's folder; its URI."""
    db = workdir / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(migrated_store, db)
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


# -- where a run can be lost or wrongly ended (the mutation target `make mutate-run-owners`) -------


def test_a_resume_claims_a_reaped_run_running_again(store: str):
    """The reaped run is FAILED; --resume's claim makes it RUNNING under this process, clears the
    error, keeps the history; a reap after that leaves it (its owner lives)."""
    client = MlflowClient(store)
    experiment = get_or_create_experiment(store, "claimed")
    run_id = _run(client, experiment, "lost", _killed_owner().tags())
    assert [r.info.run_id for r in run_owners.reap_lost_runs(client)] == [run_id]
    assert client.get_run(run_id).info.status == "FAILED"
    run_owners.claim_for_resume(store, run_id)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert Owner.from_tags(run.data.tags) == Owner.of_this_process()
    assert ERROR_TAG not in run.data.tags and PROCESS_LOST_TAG in run.data.tags
    assert run_owners.reap_lost_runs(client) == []


def test_a_resume_is_not_refused_by_this_process_another_host_or_a_finished_run(store: str):
    """Refused only while a live process of this host, other than this one, trains the run."""
    client = MlflowClient(store)
    experiment = get_or_create_experiment(store, "not-refused")
    owner_process = subprocess.Popen(["sleep", "60"])
    try:
        live = Owner(socket.gethostname(), owner_process.pid, process_start(owner_process.pid))
        cases = {
            "mine": Owner.of_this_process().tags(),
            "other-host": {**live.tags(), OWNER_HOST_TAG: "another-machine"},
            "finished": live.tags(),
        }
        runs = {name: _run(client, experiment, name, tags) for name, tags in cases.items()}
        client.set_terminated(runs["finished"], "FINISHED")
        for run_id in runs.values():
            run_owners.claim_for_resume(store, run_id)
            run = client.get_run(run_id)
            assert run.info.status == "RUNNING"
            assert Owner.from_tags(run.data.tags) == Owner.of_this_process()
    finally:
        owner_process.kill()
        owner_process.wait(timeout=10)


def test_a_reaped_run_s_error_says_how_to_go_on_by_its_kind(store: str):
    client = MlflowClient(store)
    experiment = get_or_create_experiment(store, "kinds")
    dead = _killed_owner()
    kinds = {
        "study": {"lightning_batch.role": "study", "optuna_study": "wine"},
        "unnamed-study": {"lightning_batch.role": "study"},
        "trial": {"optuna_trial_number": "3", "lightning_batch.role": "trial"},
        "run": {},
    }
    runs = {name: _run(client, experiment, name, {**dead.tags(), **tags}) for name, tags in kinds.items()}
    assert len(run_owners.reap_lost_runs(client)) == 4
    hints = {
        "study": "run.py tune --study wine continues the study",
        "unnamed-study": "run.py tune --study <name> continues the study",
        "trial": "the study retries its trial (its heartbeat went stale)",
        "run": f"resume it with: python experiments/run.py train --resume {runs['run']}",
    }
    for name, run_id in runs.items():
        error = client.get_run(run_id).data.tags[ERROR_TAG]
        assert error.startswith(f"process lost: {dead} is gone") and error.endswith(f"; {hints[name]}"), error


def test_reap_quietly_reaps_the_whole_store_and_names_the_runs_in_one_warning(
    store: str, caplog: pytest.LogCaptureFixture
):
    client = MlflowClient(store)
    dead = _killed_owner()
    lost = [
        _run(client, get_or_create_experiment(store, name), name, dead.tags()) for name in ("first", "second")
    ]
    with caplog.at_level("WARNING"):
        reaped = run_owners.reap_quietly(store)
    assert sorted(reaped) == sorted(lost)
    assert all(client.get_run(r).info.status == "FAILED" for r in lost)
    records = [r for r in caplog.records if r.name == "lightning_batch"]
    assert len(records) == 1 and records[0].levelname == "WARNING"
    message = records[0].getMessage()
    assert (
        message.startswith(f"marked FAILED (process lost): {', '.join(reaped)}; ")
        and "run.py runs" in message
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert run_owners.reap_quietly(store) == []
    assert not [r for r in caplog.records if r.name == "lightning_batch"], "nothing reaped, nothing said"


def test_reap_quietly_on_a_store_it_cannot_read_says_nothing(caplog: pytest.LogCaptureFixture):
    with caplog.at_level("WARNING"):
        assert run_owners.reap_quietly("no-such-scheme://store") == []
    assert not [r for r in caplog.records if r.name == "lightning_batch"]


def test_runs_lists_the_newest_first_and_says_whether_there_are_more(store: str):
    client = MlflowClient(store)
    experiment = get_or_create_experiment(store, "listed")
    ids = [client.create_run(experiment, start_time=1_000_000 + i).info.run_id for i in range(52)]
    newest = ids[::-1]
    for limit, more in ((3, True), (51, True), (52, False), (60, False)):
        runs, has_more = run_owners.list_runs(client, [experiment], limit=limit)
        assert ([r.info.run_id for r in runs], has_more) == (newest[:limit], more), limit
    runs, has_more = run_owners.list_runs(client, [experiment])
    assert ([r.info.run_id for r in runs], has_more) == (newest[:50], True)
    client.set_terminated(ids[0], "FAILED")
    runs, has_more = run_owners.list_runs(client, [experiment], "FAILED", limit=1)
    assert ([r.info.run_id for r in runs], has_more) == ([ids[0]], False)


def test_the_machine_id_is_systemd_s_or_else_d_bus_s(monkeypatch: pytest.MonkeyPatch):
    """A simulated machine: /etc/machine-id missing or empty falls back to D-Bus's copy; neither: None."""
    files: dict[str, str] = {}

    def read_text(path: Path, *args, **kwargs) -> str:
        if str(path) not in files:
            raise FileNotFoundError(path)
        return files[str(path)]

    monkeypatch.setattr(Path, "read_text", read_text)
    assert run_owners.machine_id() is None
    files["/var/lib/dbus/machine-id"] = "dbus-id\n"
    assert run_owners.machine_id() == "dbus-id"
    files["/etc/machine-id"] = "\n"
    assert run_owners.machine_id() == "dbus-id"
    files["/etc/machine-id"] = "systemd-id\n"
    assert run_owners.machine_id() == "systemd-id"


def test_a_search_goes_through_every_page_in_the_order_asked(store: str):
    client = MlflowClient(store)
    experiment = get_or_create_experiment(store, "paged")
    ids = [client.create_run(experiment, start_time=1_000_000 + i).info.run_id for i in range(5)]
    client.set_terminated(ids[2], "FINISHED")
    found = list(
        itertools.islice(run_owners._search(client, [experiment], "", ["attributes.start_time ASC"], 2), 10)
    )
    assert [r.info.run_id for r in found] == ids
    running = run_owners._search(client, [experiment], "attributes.status = 'RUNNING'", page=2)
    assert [r.info.run_id for r in itertools.islice(running, 10)] == [ids[4], ids[3], ids[1], ids[0]]
    assert list(run_owners._search(client, [], "")) == []


def test_only_a_running_run_whose_owner_is_gone_is_lost(store: str):
    client = MlflowClient(store)
    experiment = get_or_create_experiment(store, "lost-or-not")
    dead = _killed_owner()
    lost = _run(client, experiment, "lost", dead.tags())
    finished = _run(client, experiment, "finished", dead.tags())
    client.set_terminated(finished, "FINISHED")
    unowned = _run(client, experiment, "unowned", {})
    mine = _run(client, experiment, "mine", Owner.of_this_process().tags())
    assert run_owners.lost_owner(client.get_run(lost)) == dead
    assert [run_owners.lost_owner(client.get_run(r)) for r in (finished, unowned, mine)] == [None] * 3


def test_the_reap_records_who_noticed_and_when(store: str):
    _reap_and_check_who_noticed_and_when(store)


def _reap_and_check_who_noticed_and_when(store: str) -> None:
    client = MlflowClient(store)
    experiment = get_or_create_experiment(store, "noticed")
    dead = _killed_owner()
    run_id = _run(client, experiment, "lost", dead.tags())
    before = datetime.now(timezone.utc).replace(microsecond=0)
    run_owners.reap_lost_runs(client)
    after = datetime.now(timezone.utc)
    tag = client.get_run(run_id).data.tags[PROCESS_LOST_TAG]
    head, _, when = tag.rpartition(" at ")
    assert head == f"{dead}; noticed by pid {os.getpid()}"
    assert before <= datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) <= after


def test_a_host_name_with_a_quote_is_reaped_too(store: str, monkeypatch: pytest.MonkeyPatch):
    """MLflow's filter grammar cannot quote such a name: the runs are filtered after the query."""
    monkeypatch.setattr(socket, "gethostname", lambda: "bob's-laptop")
    client = MlflowClient(store)
    experiment = get_or_create_experiment(store, "quoted")
    dead = _killed_owner()
    assert dead.host == "bob's-laptop"
    lost = _run(client, experiment, "lost", dead.tags())
    _run(client, experiment, "elsewhere", {**dead.tags(), OWNER_HOST_TAG: "bob-s-laptop"})
    assert [r.info.run_id for r in run_owners.reap_lost_runs(client)] == [lost]


def _psutil_ticks(pid: int) -> float:
    """A process's start in clock ticks since boot, by psutil (an independent reading of /proc)."""
    import psutil

    return (psutil.Process(pid).create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").exists(), reason="Linux /proc only")
def test_on_linux_a_start_is_the_boot_and_its_clock_tick_even_for_a_name_with_parentheses(tmp_path: Path):
    """``BOOT_ID/TICKS``: the boot's id and the start in ticks (as psutil reads it); a command name
    holding ``) `` and spaces does not shift the fields."""
    odd = tmp_path / "x) 1 2 3"
    shutil.copy(shutil.which("sleep"), odd)
    child = subprocess.Popen([str(odd), "60"])
    try:
        for pid in (os.getpid(), child.pid):
            boot, _, ticks = process_start(pid).partition("/")
            assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            assert abs(int(ticks) - _psutil_ticks(pid)) <= 2, pid
        assert Owner(socket.gethostname(), child.pid, process_start(child.pid)).state() == "alive"
    finally:
        child.kill()
        child.wait(timeout=10)


@pytest.fixture
def without_proc_boot_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """A simulated system without /proc's boot id (macOS, BSD): starts are psutil's create_time."""
    real = Path.read_text

    def read_text(path: Path, *args, **kwargs) -> str:
        if str(path) == "/proc/sys/kernel/random/boot_id":
            raise FileNotFoundError(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)


def test_elsewhere_a_start_is_psutils_create_time_and_a_zombie_is_gone(without_proc_boot_id: None):
    import psutil

    assert process_start(os.getpid()) == f"{psutil.Process().create_time():.2f}"
    child = subprocess.Popen(["sleep", "60"])
    started = process_start(child.pid)
    assert started == f"{psutil.Process(child.pid).create_time():.2f}"
    child.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process_start(child.pid) is None, "a zombie is not running"
    owner = Owner(socket.gethostname(), child.pid, started)
    assert owner.state() == "gone"
    child.wait(timeout=10)
    assert process_start(child.pid) is None and owner.state() == "gone"


def test_elsewhere_a_start_is_compared_to_within_a_second(without_proc_boot_id: None):
    me = Owner.of_this_process()
    now = float(me.started)
    assert Owner(me.host, me.pid, f"{now + 0.5:.2f}").state() == "alive"
    assert Owner(me.host, me.pid, f"{now - 0.5:.2f}").state() == "alive"
    assert Owner(me.host, me.pid, f"{now + 1.5:.2f}").state() == "gone"
    assert Owner(me.host, me.pid, f"{now - 1.5:.2f}").state() == "gone"
    assert Owner(me.host, me.pid, "boot/123").state() == "gone", "a start recorded on Linux is exact"
    assert Owner(me.host, me.pid, "damaged").state() == "alive", "unknown: the pid alone decides"
    # exactly one second apart is another start
    assert not run_owners._same_start("100.00", "101.00") and run_owners._same_start("100.00", "100.99")
    assert not run_owners._same_start("100.00", "boot/100"), "one side exact: exact"


def test_an_owner_is_this_machines_by_host_name_and_machine_id():
    me = Owner.of_this_process()
    if Path("/etc/machine-id").is_file():
        assert me.machine == Path("/etc/machine-id").read_text().strip()
    assert Owner.from_tags(me.tags()) == me and me.state() == "alive"
    assert Owner(me.host, me.pid, me.started, "another-machine-id").state() == "elsewhere"
    assert Owner(me.host, me.pid, me.started, None).state() == "alive", "no machine id recorded"
    for tags in ({OWNER_PID_TAG: "12"}, {OWNER_HOST_TAG: "", OWNER_PID_TAG: "12"}, {OWNER_HOST_TAG: "h"}):
        assert Owner.from_tags(tags) is None, tags


def test_a_run_claimed_while_being_reaped_is_left_to_its_new_owner(store: str):
    """Between the search and the reap each run is read again: one a resume claimed meanwhile (here,
    the first the reaper reads again) is left RUNNING under its new owner; the other lost one is
    still reaped."""
    client = MlflowClient(store)
    experiment = get_or_create_experiment(store, "raced")
    dead = _killed_owner()
    lost = [_run(client, experiment, name, dead.tags()) for name in ("a", "b")]
    claimed: list[str] = []

    class Racing:
        def __getattr__(self, name):
            return getattr(client, name)

        def get_run(self, run_id):
            if not claimed:
                claimed.append(run_id)
                run_owners.claim_run(client, run_id)  # another process's resume, as it happens
            return client.get_run(run_id)

    reaped = [r.info.run_id for r in run_owners.reap_lost_runs(Racing())]
    (other,) = set(lost) - set(claimed)
    assert reaped == [other]
    assert client.get_run(claimed[0]).info.status == "RUNNING"
    assert client.get_run(other).info.status == "FAILED"


def test_the_reap_time_is_utc_whatever_the_local_zone(store: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    try:
        _reap_and_check_who_noticed_and_when(store)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_every_experiment_is_searched_deleted_ones_and_every_page(store: str):
    """A store may answer in pages smaller than asked (a server's cap): every page is read; deleted
    experiments count (their runs may still be RUNNING)."""
    client = MlflowClient(store)
    ids = [get_or_create_experiment(store, f"e{i}") for i in range(4)]
    client.delete_experiment(ids[1])
    calls: list[int] = []

    class SmallPages:
        def search_experiments(self, **kwargs):
            calls.append(1)
            assert len(calls) < 50, "the same page again and again"
            return client.search_experiments(**{**kwargs, "max_results": 2})

    names = run_owners.experiment_names(SmallPages())
    assert names == {e: f"e{i}" for i, e in enumerate(ids)} | {"0": "Default"}
    assert len(calls) == 3
