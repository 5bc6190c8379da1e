"""The MLflow store: where it is, created once, and experiments made for model training.

- The default store is ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts/``
  (MLflow 3.17's ``./mlruns`` file store is in maintenance mode); ``--tracking-uri`` and then
  ``$MLFLOW_TRACKING_URI`` override it (:func:`~lightning_batch.store_uri.resolve_tracking_uri`).
- :func:`ensure_store` creates a sqlite database once, under a file lock, before any worker
  touches it: two processes creating the same sqlite schema at once race.
- :func:`get_or_create_experiment` makes model-training experiments, so the MLflow UI opens them
  on their runs and charts rather than in its GenAI view.

Examples:
    >>> artifact_root_for("sqlite:///mlruns/mlflow.db").endswith("/mlruns/artifacts")
    True
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lightning_batch._extras import extra_imports
from lightning_batch.errors import UserError
from lightning_batch.locks import file_lock
from lightning_batch.store_uri import sqlite_path

DEFAULT_STORE_DIR = Path("mlruns")


#: How a missing [tracking] extra is reported: "MLflow tracking needs mlflow: pip install ...".
_FEATURE = "MLflow tracking"


#: MLflow 3's experiment kind: without it the UI opens an experiment in its GenAI view (traces,
#: evaluations); ``custom_model_development`` opens it on training runs and their charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


EXPERIMENT_KIND = "custom_model_development"


def artifact_root_for(uri: str) -> str | None:
    """Where experiments created in this store keep artifacts: ``artifacts/`` beside a sqlite DB.

    For a tracking server (http) the server decides (``--artifacts-destination``): None.
    """
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent.resolve() / "artifacts").as_uri()


def ensure_store(uri: str) -> None:
    """Create the tracking store if it is a sqlite file that does not exist yet (once, under a lock)."""
    db = sqlite_path(uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(db.with_name(db.name + ".lock")):
        with extra_imports("tracking", _FEATURE):
            from mlflow import MlflowClient

        # The first client call runs the schema migrations; the lock makes it one process's job.
        MlflowClient(uri).search_experiments(max_results=1)


def check_store_access(uri: str) -> None:
    """Before anything is trained: a tracking server that refuses these credentials is one error line.

    MLflow's client sends ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (basic auth);
    without them, or with wrong ones, an authenticated server answers 401 to every call, and a run
    would otherwise be prepared (data, lr search) only to fail when it is created.
    """
    if not uri.startswith(("http://", "https://")):
        return
    from lightning_batch.store_uri import redact

    with extra_imports("tracking", _FEATURE):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

    # MLflow retries a refused connection for minutes; a check needs one retry.
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        status = exc.get_http_status_code()
        if "Max retries exceeded" in exc.message or "Failed to establish" in exc.message:
            raise UserError(
                f"cannot reach the tracking server {redact(uri)}; is it running (run.py server), and is the "
                "address right?"
            ) from None
        if status == 401:
            given = "MLFLOW_TRACKING_USERNAME" in os.environ
            raise UserError(
                f"the tracking server {redact(uri)} refused "
                + (
                    "these credentials (401): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                    if given
                    else "a client without credentials (401): set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (its admin adds users with `run.py server --add-user NAME`)"
                )
            ) from None
        if status == 403:
            raise UserError(
                f"the tracking server {redact(uri)} refused access (403): {exc.message}"
            ) from None
        raise
    finally:
        if retries is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries


def get_or_create_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, created with its artifacts under ``mlruns/artifacts/<name>``.

    It is a model-training experiment (:data:`EXPERIMENT_KIND`): one made before this tag, or by
    another tool without any kind, gets it now; a kind someone chose is left as it is.
    """
    with extra_imports("tracking", _FEATURE):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    root = artifact_root_for(uri)
    location = f"{root}/{_safe_name(name)}" if root else None
    try:
        return client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException:  # another process created it between our look-up and create
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "experiment"


def git_commit() -> str | None:
    """The project checkout's commit, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
