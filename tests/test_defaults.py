"""A newcomer's first run, with no flags but the data (and ``--model mlp``), is as good as
scikit-learn's defaults on the same split: the regression target standardised, the lr found by a
range test, the length set by early stopping.

The reference is scikit-learn on the run's own train and test splits (features standardised on
train, as a ``StandardScaler`` does): ``LinearRegression`` / ``LogisticRegression(max_iter=2000)``,
or ``MLPRegressor`` / ``MLPClassifier(max_iter=2000)``. Every bundled set and both model columns
run in the slow suite; one case per model runs by default.
"""

from __future__ import annotations

import warnings

import pytest
from mlflow import MlflowClient
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import accuracy_score, r2_score
from sklearn.neural_network import MLPClassifier, MLPRegressor

from lightning_batch.config import RunConfig
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.training import train

#: How far below scikit-learn's a result may be: accuracy, and r² for the regression.
TOLERANCE = {"classification": 0.02, "regression": 0.03}


def scikit_learn_reference(data: str, model: str) -> tuple[str, float]:
    """``(task, test accuracy or r²)`` of scikit-learn's defaults on the run's own split."""
    dm = TabularDataModule(RunConfig(data=data).validate())
    dm.setup()
    prepared = dm.prepared
    x_train, y_train = prepared.train.features.numpy(), prepared.train.targets.numpy().ravel()
    x_test, y_test = prepared.test.features.numpy(), prepared.test.targets.numpy().ravel()
    regression = prepared.task == "regression"
    if model == "linear":
        estimator = LinearRegression() if regression else LogisticRegression(max_iter=2000)
    elif regression:
        estimator = MLPRegressor(max_iter=2000, random_state=0)
    else:
        estimator = MLPClassifier(max_iter=2000, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(x_train, y_train)
    predicted = estimator.predict(x_test)
    score = r2_score(y_test, predicted) if regression else accuracy_score(y_test, predicted)
    return prepared.task, float(score)


def _first_run(tmp_path, data: str, model: str) -> None:
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    options = {"model": "mlp"} if model == "mlp" else {}
    result = train(RunConfig(data=data, tracking_uri=uri, **options))
    task, reference = scikit_learn_reference(data, model)
    ours = result.metrics["test_r2" if task == "regression" else "test_acc"]
    assert ours >= reference - TOLERANCE[task], (
        f"{data} {model}: {ours:.3f} against scikit-learn's {reference:.3f}"
    )
    # The lr was found, and said how; the length was the validation loss's to decide.
    run = MlflowClient(uri).get_run(result.run_id).data
    assert run.tags["lr_search"].startswith("range test") and float(run.params["lr"]) != 0.01
    assert result.epochs <= 200 and ("stopped_early" in run.tags) == (result.epochs < 200)


@pytest.mark.parametrize(("data", "model"), [("iris", "linear"), ("digits", "mlp")])
def test_a_first_run_with_defaults_is_as_good_as_scikit_learn(tmp_path, data: str, model: str):
    _first_run(tmp_path, data, model)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("data", ["diabetes", "wine", "iris", "breast_cancer", "digits"])
def test_every_bundled_set_with_defaults_is_as_good_as_scikit_learn(tmp_path, data: str, model: str):
    _first_run(tmp_path, data, model)


def test_a_time_cap_stops_the_fit_and_the_run_says_so(tmp_path):
    """``max_minutes``: the fit stops at the cap wherever it is (Lightning's Timer), the run still
    tests its best weights and ends FINISHED, tagged with why it stopped; the cap is a param."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train(
        RunConfig(
            data="synthetic-regression", rows=20000, lr=0.01, epochs=200, max_minutes=0.02, tracking_uri=uri
        )
    )
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and "test_loss" in run.data.metrics
    assert "time cap of 0.02 minutes" in run.data.tags["stopped_early"]
    assert result.epochs < 200 and run.data.params["max_minutes"] == "0.02"


def _correlated_regression_csv(path, rows: int = 120_000, features: int = 32) -> None:
    """The issue's CSV: 32 features sharing one common factor (pairwise correlation about 0.5), a
    target near 3 with a spread in the tens' range (std about 7.6), part of it non-linear."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    x = 0.7 * rng.normal(size=(rows, 1)) + 0.7 * rng.normal(size=(rows, features))
    w = rng.normal(size=features)
    y = 3 + 4 * (x @ w) / np.sqrt(features) + 2 * np.sin(x[:, 0]) + rng.normal(size=rows)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(features)])
    frame["y"] = y
    frame.to_csv(path, index=False)


@pytest.mark.slow  # 30 epochs of 84,000 rows at B=32: about 15 minutes on 2 CPU cores
def test_a_120k_row_mlp_with_defaults_trains_30_epochs_and_a_sigkill_resumes_the_same_run(workdir):
    """The run that diverged before the target was scaled: `--model mlp --epochs 30`, nothing else.
    SIGKILLed in its second epoch, `--resume RUN_ID` finishes the same run, a good model."""
    import math
    import subprocess
    import sys

    from .conftest import ROOT, RUN_PY, subprocess_env

    _correlated_regression_csv(workdir / "big.csv")
    flags = ["--data", "big.csv", "--target", "y", "--model", "mlp", "--epochs", "30"]
    killed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "run_py_with_faults.py"),
            "train",
            *flags,
            "--checkpoint-every",
            "1000",
        ],
        cwd=workdir,
        env=subprocess_env(LB_KILL_AT_STEP="4000"),  # epoch 2 of 30 (2,625 steps an epoch)
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("lightning-batch").experiment_id])
    assert run.info.status == "RUNNING"
    resumed = subprocess.run(
        [sys.executable, str(RUN_PY), "train", "--resume", run.info.run_id[:8]],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and tags.get("resumed") == "true"
    assert metrics["epochs_run"] == 30 or "stopped_early" in tags, "30 epochs, or early stopping's own end"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert losses and all(math.isfinite(v) for v in losses), "no step diverged"
    assert "rollback" not in tags and "poor_fit" not in tags
    assert metrics["test_r2"] > 0.95, metrics
