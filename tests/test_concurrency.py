"""Many processes, one fresh ``mlruns/``: nothing lost, the first database creation included."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import RUN_PY, subprocess_env
from .test_tuning import _assert_trials_match_runs

ROWS, EPOCHS, BATCH = 2000, 2, 32


@pytest.mark.slow  # CI runs the slow suite after `make test` (.ci/run)
def test_four_trainings_and_a_two_worker_study_share_a_fresh_store(workdir: Path):
    assert not (workdir / "mlruns").exists()  # every process races to create the database
    common = [
        "--data",
        "synthetic-regression",
        "--rows",
        str(ROWS),
        "--features",
        "4",
        "--epochs",
        str(EPOCHS),
    ]
    trainings = [
        subprocess.Popen(
            [
                sys.executable,
                str(RUN_PY),
                "train",
                *common,
                "--batch-size",
                str(BATCH),
                "--log-every",
                "1",
                "--experiment",
                "concurrent",
                "--run-name",
                f"p{i}",
            ],
            cwd=workdir,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(4)
    ]
    study = subprocess.Popen(
        [
            sys.executable,
            str(RUN_PY),
            "tune",
            *common,
            "--trials",
            "4",
            "--workers",
            "2",
            "--study",
            "concurrent-study",
            "--retrain",
            "none",
        ],
        cwd=workdir,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for process in [*trainings, study]:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]

    uri = f"sqlite:///{workdir}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["p0", "p1", "p2", "p3"]
    n_train = int(runs[0].data.params["n_train"])
    steps = EPOCHS * math.ceil(n_train / BATCH)
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == list(range(1, steps + 1)), "every step's metric, once"
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == EPOCHS
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "loss_curves.png"}
    _assert_trials_match_runs(f"sqlite:///{workdir}/mlruns/optuna.db", uri, "concurrent-study", 4)
