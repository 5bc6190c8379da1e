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
