"""A password given in a URL works, is warned about once, and is written down nowhere.

Against the real PostgreSQL that ``.ci/postgres.sh`` starts (its password is a string that occurs
nowhere else, so a grep finds only leaks). Without one these tests skip and say why; the tracking
server's half (a password in an ``http://`` tracking URI) is in tests/test_auth_server.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna
import pytest
from mlflow import MlflowClient

from lightning_batch.store_uri import redact

from .conftest import RUN_PY, subprocess_env
from .test_tuning import _postgres_reachable, _postgres_url

pytestmark = pytest.mark.slow  # two 2-worker studies each; CI runs the slow suite after `make test`


@pytest.fixture
def postgres() -> tuple[str, str]:
    """The test database's URL and its password."""
    url = _postgres_url()
    why = _postgres_reachable(url)
    if why is not None:
        pytest.skip(f"no PostgreSQL at {redact(url)} ({why}); .ci/postgres.sh installs and starts one")
    password = urlsplit(url).password
    if not password or len(password) < 8:
        pytest.skip("the test database's URL carries no distinctive password to grep for")
    return url, password


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _tune(workdir: Path, storage: str, study: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_PY), "tune", "--data", "iris", "--epochs", "2", "--batch-size", "16"]
        + ["--storage", storage, "--study", study, "--trials", "2", "--workers", "2"]
        + ["--tracking-uri", f"sqlite:///{workdir}/mlruns/mlflow.db"],
        cwd=workdir,
        # Only the password sources given here: none inherited from the test's own environment.
        env={
            **{k: v for k, v in subprocess_env().items() if k not in ("PGPASSWORD", "PGPASSFILE")},
            "PGPASSFILE": str(workdir / "no-pgpass"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_password_in_the_storage_url_is_warned_once_and_written_nowhere(postgres, workdir: Path):
    url, password = postgres
    study = f"secret-{uuid.uuid4().hex[:8]}"
    done = _tune(workdir, url, study)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "carries a password" in line]
    assert len(warnings) == 1 and "PGPASSWORD" in warnings[0], done.stderr[-3000:]
    assert password not in done.stdout + done.stderr

    # MLflow: every run's params and tags, and every artifact it logged.
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    assert len(runs) >= 3, "the study's run, its 2 trials and the refit"
    downloads = workdir / "downloaded"
    for run in runs:
        assert password not in json.dumps([run.data.params, run.data.tags])
        client.download_artifacts(run.info.run_id, "", str(downloads / run.info.run_id))
    # Optuna: the study's and the trials' attributes.
    loaded = optuna.load_study(study_name=study, storage=url)
    attributes = [loaded.user_attrs, *([t.user_attrs, t.params] for t in loaded.trials)]
    assert password not in json.dumps(attributes, default=str)
    # Every file the command left: the MLflow store, artifacts, checkpoints, configs, logs.
    files = [path for path in workdir.rglob("*") if path.is_file()]
    assert any(path.name == "config.yaml" for path in files)
    for path in files:
        assert password.encode() not in path.read_bytes(), path


def test_a_url_without_its_password_takes_it_from_pgpassword_or_a_pgpass_file(postgres, workdir: Path):
    url, password = postgres
    bare = _without_password(url)
    done = _tune(workdir, bare, f"pgpassword-{uuid.uuid4().hex[:8]}", PGPASSWORD=password)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "carries a password" not in done.stderr

    parts = urlsplit(url)
    pgpass = workdir / "pgpass"
    pgpass.write_text(
        f"{parts.hostname}:{parts.port or 5432}:{parts.path.lstrip('/')}:{parts.username}:{password}\n"
    )
    pgpass.chmod(0o600)  # libpq ignores a .pgpass that others can read
    done = _tune(workdir, bare, f"pgpass-{uuid.uuid4().hex[:8]}", PGPASSFILE=str(pgpass))
    assert done.returncode == 0, done.stderr[-3000:]
