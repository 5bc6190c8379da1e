"""`run.py server`: the team's tracking server, with sign-in, served artifacts and users.

A real ``mlflow server --app-name basic-auth`` started through ``run.py server`` on 127.0.0.1, with
real ``run.py`` clients in other processes; what they recorded is read back with MLflow's own client
signed in as the admin. Slow: the server takes seconds to start and every client is a process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from mlflow import MlflowClient

from .conftest import ROOT, RUN_PY, drain_to_file, free_port, stop_process_tree, subprocess_env, wait_for

pytestmark = pytest.mark.slow  # CI runs the slow suite after `make test` (.ci/run)

USERS = {"alice": "alice-password-7d1f", "bob": "bob-password-93ac"}


@dataclass
class Server:
    url: str
    folder: Path
    process: subprocess.Popen
    startup: list[str]

    @property
    def admin_password(self) -> str:
        return (self.folder / "mlruns" / "server" / "admin.password").read_text().strip()

    def admin_client(self, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", self.admin_password)
        return MlflowClient(self.url)


def _start(folder: Path, *extra: str, **env: str) -> tuple[subprocess.Popen, int]:
    """``run.py server`` in ``folder``; its stderr goes to ``folder/server.err``."""
    port = free_port()
    with (folder / "server.err").open("a") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(RUN_PY), "server", "--port", str(port), *extra],
            cwd=folder,
            env=subprocess_env(**env),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    return process, port


def _startup_lines(process: subprocess.Popen, folder: Path) -> list[str]:
    """The lines run.py prints before MLflow takes over (the last ends with "Ctrl-C stops it").

    The rest of stdout then goes to ``server.out`` (:func:`drain_to_file`: a pipe nobody read is
    what hung the load test of an earlier stop)."""
    assert process.stdout is not None
    lines = []
    while not lines or "Ctrl-C" not in lines[-1]:
        line = process.stdout.readline()
        assert line, f"the server exited: {lines}"
        lines.append(line.rstrip("\n"))
    drain_to_file(process.stdout, folder / "server.out")
    return lines


def _add_user(folder: Path, name: str, password: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_PY), "server", "--add-user", name],
        cwd=folder,
        env=subprocess_env(),
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("team")
    process, port = _start(folder)  # MLflow's 4 workers, as a team gets by default
    try:
        startup = _startup_lines(process, folder)
        wait_for(f"http://127.0.0.1:{port}/health", 120)
        for name, password in USERS.items():
            added = _add_user(folder, name, password)
            assert added.returncode == 0, added.stderr
        yield Server(f"http://127.0.0.1:{port}", folder, process, startup)
    finally:
        stop_process_tree(process)


def _run_py(
    folder: Path, *argv: str, user: str | None = None, input_text: str | None = None, **env: str
) -> subprocess.CompletedProcess:
    credentials = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": USERS[user]} if user else {}
    # Only the credentials given here: not the admin's, which this test process signs in with.
    inherited = {k: v for k, v in subprocess_env(**env).items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.run(
        [sys.executable, str(RUN_PY), *argv],
        cwd=folder,
        env={**inherited, **credentials},
        input=None if input_text is None else input_text + "\n",
        capture_output=True,
        text=True,
        timeout=1200,  # 8 at once on 2 cores
    )


def _train(
    folder: Path, uri: str, experiment: str, *extra: str, epochs: int = 1, user: str | None = None
) -> subprocess.CompletedProcess:
    """``run.py train`` on iris (lr 0.1, so no lr search) into ``experiment`` of the store at ``uri``."""
    argv = ["train", "--data", "iris", "--epochs", str(epochs), "--lr", "0.1", "--tracking-uri", uri]
    return _run_py(folder, *argv, "--experiment", experiment, *extra, user=user)


def _error_lines(stderr: str) -> list[str]:
    """stderr without the warnings Python and MLflow's web stack print on import."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _all_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def test_the_admin_password_is_generated_into_an_owner_only_file_and_never_shown(server: Server):
    secret = server.admin_password
    path = server.folder / "mlruns" / "server" / "admin.password"
    assert len(secret) >= 24 and path.stat().st_mode & 0o777 == 0o600
    assert (server.folder / "mlruns" / "server").stat().st_mode & 0o777 == 0o700
    assert any(str(Path("mlruns/server/admin.password")) in line for line in server.startup)
    assert not any(secret in line for line in server.startup)
    config = (server.folder / "mlruns" / "server" / "basic_auth.ini").read_text()
    assert secret not in config and "default_permission = READ" in config
    assert (server.folder / "mlruns" / "basic_auth.db").is_file(), "the users database is beside the store"
    # No secret on any command line of the server's process tree (what `ps` shows everyone).
    tree = psutil.Process(server.process.pid)
    for process in (tree, *tree.children(recursive=True)):
        assert secret not in " ".join(process.cmdline())
        assert "--app-name" not in process.cmdline() or "basic-auth" in process.cmdline()


def test_without_credentials_the_server_and_train_answer_401_and_no_run_is_made(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    response = requests.get(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=5", timeout=30)
    assert response.status_code == 401
    wrong = requests.get(
        f"{server.url}/api/2.0/mlflow/experiments/search?max_results=5",
        auth=("alice", "wrong-password-1"),
        timeout=30,
    )
    assert wrong.status_code == 401
    before = len(_all_runs(server.admin_client(monkeypatch)))
    done = _run_py(tmp_path, "train", "--data", "iris", "--epochs", "2", "--tracking-uri", server.url)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = _error_lines(done.stderr)
    assert "401" in line and "MLFLOW_TRACKING_USERNAME" in line
    assert len(_all_runs(server.admin_client(monkeypatch))) == before


def test_with_credentials_train_tune_register_and_predict_go_through_the_server(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """Alice trains (with --register), runs a 2-worker study, then predicts with the champion: all
    through the server, artifacts included (her machine has no store of its own)."""
    uri = ["--tracking-uri", server.url, "--experiment", "alice-exp"]
    trained = _train(tmp_path, server.url, "alice-exp", "--register", "iris-team", epochs=3, user="alice")
    assert trained.returncode == 0, trained.stderr[-3000:]
    study = ["--study", "team-study", "--trials", "4", "--workers", "2", "--retrain", "none"]
    storage = ["--storage", f"sqlite:///{tmp_path}/optuna.db"]
    tuned = _run_py(tmp_path, "tune", "--data", "iris", "--epochs", "2", *uri, *study, *storage, user="alice")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert not (tmp_path / "mlruns" / "mlflow.db").exists(), "the client kept no store of its own"

    client = server.admin_client(monkeypatch)
    experiment = client.get_experiment_by_name("alice-exp")
    (trained_run,) = client.search_runs([experiment.experiment_id])
    assert trained_run.info.run_id in trained.stdout and trained_run.info.status == "FINISHED"
    # The study is an experiment of its own: its parent run and its 4 trials.
    study_runs = client.search_runs([client.get_experiment_by_name("team-study").experiment_id])
    assert len(study_runs) == 1 + 4 and {r.info.status for r in study_runs} == {"FINISHED"}
    trials = [r for r in study_runs if "optuna_trial_number" in r.data.tags]
    assert len(trials) == 4 and len({r.data.tags.get("lightning_batch.owner.pid") for r in trials}) == 2
    artifacts = {a.path for a in client.list_artifacts(trained_run.info.run_id)}
    assert {"loss_curves.png", "config.yaml"} <= artifacts, artifacts
    (logged,) = client.search_logged_models(
        [experiment.experiment_id], filter_string=f"source_run_id='{trained_run.info.run_id}'"
    )
    assert logged.name == "model"
    assert client.get_model_version_by_alias("iris-team", "champion").run_id == trained_run.info.run_id

    rows = tmp_path / "rows.csv"
    from sklearn.datasets import load_iris

    load_iris(as_frame=True).frame.drop(columns="target").head(12).to_csv(rows, index=False)
    predicted = _run_py(
        tmp_path,
        "predict",
        "models:/iris-team@champion",
        "--data",
        str(rows),
        "--output",
        str(tmp_path / "out.csv"),
        "--tracking-uri",
        server.url,
        user="alice",
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 1 + 12


def test_another_user_cannot_change_or_delete_an_experiment_they_do_not_own(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    owned = _train(tmp_path, server.url, "alice-owned", user="alice")
    assert owned.returncode == 0, owned.stderr[-3000:]
    experiment = server.admin_client(monkeypatch).get_experiment_by_name("alice-owned")
    bob = ("bob", USERS["bob"])
    api = f"{server.url}/api/2.0/mlflow/experiments"
    read = requests.get(
        f"{api}/get", params={"experiment_id": experiment.experiment_id}, auth=bob, timeout=30
    )
    assert read.status_code == 200, "the team reads every experiment (default_permission READ)"
    for action, body in (("update", {"new_name": "taken"}), ("delete", {})):
        response = requests.post(
            f"{api}/{action}", json={"experiment_id": experiment.experiment_id, **body}, auth=bob, timeout=30
        )
        assert response.status_code == 403, (action, response.text)
    # Bob's run into Alice's experiment: one line, exit 2, and the experiment untouched.
    refused = _train(tmp_path, server.url, "alice-owned", user="bob")
    assert refused.returncode == 2
    (line,) = _error_lines(refused.stderr)
    assert "403" in line and "--experiment" in line
    client = server.admin_client(monkeypatch)
    assert client.get_experiment(experiment.experiment_id).lifecycle_stage == "active"
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_a_password_in_the_tracking_url_works_warns_once_and_is_written_nowhere(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    secret = USERS["alice"]
    url = server.url.replace("http://", f"http://alice:{secret}@")
    done = _train(tmp_path, url, "alice-url", epochs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "carries a password" in line]
    assert len(warnings) == 1 and "MLFLOW_TRACKING_PASSWORD" in warnings[0]
    assert secret not in done.stdout + done.stderr
    client = server.admin_client(monkeypatch)
    (run,) = client.search_runs([client.get_experiment_by_name("alice-url").experiment_id])
    assert secret not in json.dumps([run.data.params, run.data.tags])
    for artifact in ("config.yaml", "preprocessing.json"):
        assert (
            secret
            not in Path(client.download_artifacts(run.info.run_id, artifact, str(tmp_path))).read_text()
        )
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert secret.encode() not in path.read_bytes(), path


def test_insecure_is_refused_off_loopback_and_says_so_on_every_line_on_it(tmp_path: Path):
    refused = _run_py(tmp_path, "server", "--insecure", "--host", "0.0.0.0")
    assert refused.returncode == 2
    (line,) = _error_lines(refused.stderr)
    assert "--insecure" in line and "0.0.0.0" in line
    assert not (tmp_path / "mlruns").exists(), "nothing was created"
    process, port = _start(tmp_path, "--insecure")
    try:
        lines = _startup_lines(process, tmp_path)
        assert lines and all(line.startswith("INSECURE") for line in lines), lines
        wait_for(f"http://127.0.0.1:{port}/health", 120)
        response = requests.get(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30
        )
        assert response.status_code == 200, "no sign-in: the lab asked for it"
    finally:
        stop_process_tree(process)


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):  # a process that ended meanwhile
            total += member.memory_info().rss
    return total


def test_eight_trains_at_once_against_the_server_and_eight_against_sqlite_all_finish_whole(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """The team's load: 8 `train` processes at once through the authenticated server, and 8 at once
    on the default sqlite store. Each ends FINISHED with one train_loss per step trained. The wall
    times and the server's peak memory go to test-output/server_load.json."""
    argv = [
        "train",
        "--data",
        "iris",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lr",
        "0.1",
        "--log-every",
        "1",
    ]
    peak = [_tree_rss(psutil.Process(server.process.pid))]

    def watch(stop: list[bool]) -> None:
        while not stop[0]:
            peak.append(_tree_rss(psutil.Process(server.process.pid)))
            time.sleep(0.2)

    figures: dict[str, float] = {}
    for name, target in (("server", ["--tracking-uri", server.url, "--experiment", "load"]), ("sqlite", [])):
        folder = tmp_path / name
        folder.mkdir()
        stop = [False]
        watcher = threading.Thread(target=watch, args=(stop,), daemon=True)
        if name == "server":
            watcher.start()
        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(8) as pool:
                runs = list(
                    pool.map(
                        lambda i, folder=folder, target=target: _run_py(
                            folder, *argv, *target, "--run-name", f"load-{i}", user="alice"
                        ),
                        range(8),
                    )
                )
        finally:  # a failed train must not leave the watcher running (and the test hanging on it)
            stop[0] = True
            if watcher.is_alive():
                watcher.join()
        figures[f"{name}_wall_seconds"] = round(time.perf_counter() - started, 1)
        for done in runs:
            assert done.returncode == 0, done.stderr[-3000:]
        client = (
            server.admin_client(monkeypatch)
            if name == "server"
            else MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db")
        )
        recorded = [r for r in _all_runs(client) if r.info.run_name.startswith("load-")]
        assert len(recorded) == 8 and {r.info.status for r in recorded} == {"FINISHED"}
        for run in recorded:
            steps = int(run.data.params["n_train"]) // 16 + bool(int(run.data.params["n_train"]) % 16)
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert sorted(m.step for m in history) == list(range(1, 3 * steps + 1)), run.info.run_name
    figures["server_peak_rss_mib"] = round(max(peak) / 2**20, 1)
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    (out / "server_load.json").write_text(json.dumps({**figures, "cpus": os.cpu_count()}, indent=2))


def test_a_server_on_a_postgresql_store_takes_its_password_from_pgpassword(tmp_path: Path):
    """The same flags as the rest of the CLI: a PostgreSQL store, its URL without the password
    (PGPASSWORD for the server, none for the clients); users and permissions in that database."""
    from urllib.parse import urlsplit

    from .test_tuning import _postgres_reachable, _postgres_url

    url = _postgres_url()
    if _postgres_reachable(url) is not None:
        pytest.skip("no PostgreSQL; .ci/postgres.sh installs and starts one")
    parts = urlsplit(url)
    # .ci/postgres.sh makes this database for MLflow: Optuna's tables share alembic_version's name.
    store = f"postgresql://{parts.username}@{parts.hostname}:{parts.port or 5432}/lightning_batch_mlflow"
    server_env = {"PGPASSWORD": parts.password or ""}
    process, port = _start(tmp_path, "--tracking-uri", store, "--workers", "1", **server_env)
    try:
        lines = _startup_lines(process, tmp_path)
        assert store in lines[0] and parts.password not in "\n".join(lines)
        wait_for(f"http://127.0.0.1:{port}/health", 120)
        user = f"pg-{os.getpid()}"
        added = _run_py(
            tmp_path,
            "server",
            "--tracking-uri",
            store,
            "--add-user",
            user,
            **server_env,
            input_text=USERS["alice"],
        )
        assert added.returncode == 0, added.stderr[-2000:]
        USERS[user] = USERS["alice"]
        done = _train(tmp_path, f"http://127.0.0.1:{port}", f"{user}-exp", user=user)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not (tmp_path / "mlruns" / "basic_auth.db").exists(), "users live in the PostgreSQL store"
    finally:
        stop_process_tree(process)
