"""The MLflow UI and optuna-dashboard, as a user sees them: real servers, headless Chromium.

Chromium renders the single-page apps (their JavaScript fetches runs, metrics and artifacts from
the server); ``--dump-dom`` returns the rendered page, ``--screenshot`` a picture of it. The
screenshots are kept in ``test-output/`` (ignored by git). ``.ci/chromium.sh`` installs Debian's
chromium where it is missing; without it these tests skip and say so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import ROOT, RUN_PY, drain_to_file, free_port, stop_process_tree, subprocess_env, wait_for

pytestmark = pytest.mark.e2e

SCREENSHOTS = ROOT / "test-output"
# The flags this machine's closed network needs (background fetches to Google are refused).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--virtual-time-budget=10000",  # let the app's fetches and renders finish before the dump
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH; .ci/chromium.sh installs Debian's chromium")
    return path


def _render(url: str, profile: Path, screenshot: Path | None = None, height: int = 900) -> str:
    """The page's DOM after its JavaScript ran (and a screenshot of it, if asked), in a window
    1400 pixels wide and ``height`` high (chart grids render only the charts in view)."""
    chromium = _chromium()
    args = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size=1400,{height}"]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        # Three times the dump's budget: the charts fetch each metric's history before they draw.
        longer = [
            a if not a.startswith("--virtual-time-budget") else "--virtual-time-budget=30000" for a in args
        ]
        subprocess.run([*longer, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    done = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return done.stdout


def _serve(workdir: Path, *command: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(RUN_PY), *command, "--port", str(port)],
        cwd=workdir,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server, port


@pytest.mark.slow  # CI runs the slow suite after `make test` (.ci/run)
def test_mlflow_ui_shows_the_runs_the_model_the_registry_and_the_charts(workdir: Path, tmp_path: Path):
    """A run trained with --register: `run.py ui` prints the URL of the experiment's training runs
    in the Model training view, which a fresh browser shows as such; the run page lists its logged model, the Models page the registered one, and the run's Model
    metrics tab draws batch_size and gns (the README's screenshot, docs/mlflow-run.png)."""
    _chromium()
    done = subprocess.run(
        [
            sys.executable,
            str(RUN_PY),
            "train",
            "--data",
            "synthetic-regression",
            "--rows",
            "4000",
            "--batch-size",
            "auto",
            "--epochs",
            "2",
            "--run-name",
            "e2e-auto",
            "--experiment",
            "e2e",
            "--register",
            "e2e-model",
        ],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("e2e")
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    (logged,) = client.search_logged_models([experiment.experiment_id])
    assert logged.source_run_id == run.info.run_id
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(RUN_PY), "ui", "--port", str(port)],
        cwd=workdir,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        printed_url = next(w for w in server.stdout.readline().split() if w.startswith("http://"))
        drain_to_file(server.stdout, workdir / "ui.out")  # the server's access lines, unread
        wait_for(f"http://127.0.0.1:{port}/health", 120)
        base = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
        view = "?workflowType=machine_learning"
        assert printed_url == f"{base}/runs{view}"
        # The page the printed URL opens, in a fresh browser profile (whose stored toggle says GenAI):
        # the Model training view's sidebar (Runs, Models, Model registry), none of GenAI's.
        runs_page = _render(printed_url, tmp_path / "p1")
        assert "e2e-auto" in runs_page
        assert "Model registry" in runs_page
        for genai_only in ("Judges", "Evaluation runs", "Sessions"):
            assert genai_only not in runs_page, genai_only
        run_page = _render(f"{base}/runs/{run.info.run_id}{view}", tmp_path / "p2")
        assert "e2e-auto" in run_page and logged.name in run_page, "the run page lists its logged model"
        assert "batch_size" in run_page and "gns" in run_page
        # The README's picture: the Model metrics tab, tall enough for the alphabetical grid to
        # reach gns (row 3 of 3 charts a row). Its charts draw into the screenshot; the DOM dump of
        # that tab comes back before they do, so the metric names are checked on the overview.
        _render(
            f"{base}/runs/{run.info.run_id}/model-metrics{view}",
            tmp_path / "p3",
            SCREENSHOTS / "mlflow-run.png",
            height=1700,
        )
        artifacts = _render(f"{base}/runs/{run.info.run_id}/artifacts", tmp_path / "p4")
        for name in ("loss_curves.png", "batch_size.png", "batch_size_decisions.json"):
            assert name in artifacts, name
        models = _render(f"http://127.0.0.1:{port}/#/models", tmp_path / "p5")
        assert "e2e-model" in models, "the Models page lists the registered model"
    finally:
        stop_process_tree(server)
    assert (SCREENSHOTS / "mlflow-run.png").stat().st_size > 10_000


@pytest.mark.slow  # CI runs the slow suite after `make test` (.ci/run)
def test_optuna_dashboard_shows_the_study_and_its_trials(workdir: Path, tmp_path: Path):
    _chromium()
    done = subprocess.run(
        [
            sys.executable,
            str(RUN_PY),
            "tune",
            "--data",
            "synthetic-regression",
            "--rows",
            "2000",
            "--epochs",
            "1",
            "--trials",
            "3",
            "--study",
            "e2e-study",
            "--retrain",
            "none",
        ],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    server, port = _serve(workdir, "dashboard")
    try:
        wait_for(f"http://127.0.0.1:{port}/api/studies", 60)
        home = _render(
            f"http://127.0.0.1:{port}/dashboard", tmp_path / "p1", SCREENSHOTS / "optuna-dashboard.png"
        )
        assert "e2e-study" in home
        study = _render(f"http://127.0.0.1:{port}/dashboard/studies/1", tmp_path / "p2")
        assert "e2e-study" in study and "lr" in study and "batch_size" in study
    finally:
        stop_process_tree(server)
