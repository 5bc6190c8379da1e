"""A regression target standardised on train: the loss in standard units, everything a user reads in
the target's own units, and a result worse than the training mean never presented as a result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from lightning_batch.config import RunConfig
from lightning_batch.tabular.task_module import TaskModule
from lightning_batch.training import train


def _prices(path, rows: int = 400, seed: int = 0) -> None:
    """A target far from 0 and wide (mean ~500, spread ~100): raw, it is a hard start for SGD."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame["price"] = 500.0 + 100.0 * (x @ np.array([0.6, -0.3, 0.2])) + rng.normal(0, 10.0, rows)
    frame.to_csv(path, index=False)


def test_the_loss_is_in_standard_units_and_the_metrics_in_the_targets():
    module = TaskModule(torch.nn.Linear(2, 1), target_scaling=(500.0, 100.0))
    prediction, target = torch.tensor([[0.5], [-1.0]]), torch.tensor([[560.0], [400.0]])
    # (560 - 500) / 100 = 0.6 and (400 - 500) / 100 = -1.0: squared errors 0.01 and 0.
    assert float(module.loss(prediction, target)) == pytest.approx(0.005)
    assert module.in_target_units(prediction).tolist() == [[550.0], [400.0]]
    plain = TaskModule(torch.nn.Linear(2, 1))
    assert float(plain.loss(prediction, target)) == pytest.approx(((559.5**2) + 401.0**2) / 2)


def test_a_regression_worse_than_the_mean_is_tagged_and_said_so(tmp_path, caplog):
    """Raw prices and an lr too small to move: the test r² is far below 0; the run finishes, but with a
    poor_fit tag and a warning, and the result says why."""
    csv = tmp_path / "prices.csv"
    _prices(csv)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cfg = RunConfig(data=str(csv), target="price", epochs=1, lr=1e-6, scale_target=False, tracking_uri=uri)
    result = train(cfg)
    assert result.metrics["test_r2"] < -10 and not result.target_scaled
    assert result.poor_fit.startswith("test r² is -")
    tags = MlflowClient(uri).get_run(result.run_id).data.tags
    assert tags["poor_fit"] == result.poor_fit
    assert any("worse than predicting the training mean" in r.getMessage() for r in caplog.records)


def test_standardised_the_same_short_run_fits(tmp_path):
    """The same data and epochs with the default target scaling: a real fit, and no poor_fit."""
    csv = tmp_path / "prices.csv"
    _prices(csv)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    result = train(RunConfig(data=str(csv), target="price", epochs=5, lr=0.05, tracking_uri=uri))
    assert result.target_scaled and not result.poor_fit
    assert result.metrics["test_r2"] > 0.9
    assert 5.0 < result.metrics["test_rmse"] < 30.0, "in the target's units (noise of 10), not standard ones"
    assert "poor_fit" not in MlflowClient(uri).get_run(result.run_id).data.tags
