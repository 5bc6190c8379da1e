"""Every finished run logs an MLflow Model: loaded with MLflow's own pyfunc loader, it predicts raw rows
as the trained TaskModule does on the same rows prepared independently here, and `run.py predict`
gives the same numbers from the command line.

One regression run (an integer, a float column with empty cells, a text column with empty cells) and
one classification run (string labels, an MLP) are trained once for the whole module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from lightning_batch.config import RunConfig
from lightning_batch.models import build_model
from lightning_batch.module import TaskModule
from lightning_batch.training import RunResult, train

from .conftest import subprocess_env


@dataclass
class Trained:
    csv: Path
    target: str
    result: RunResult
    uri: str


def _regression_frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "rooms": rng.integers(1, 8, rows),
            "area": rng.normal(80.0, 20.0, rows).round(1),
            "city": rng.choice(["paris", "lyon", "nice"], rows),
        }
    )
    frame["price"] = 3.0 * frame["rooms"] + 0.1 * frame["area"] + np.where(frame["city"] == "paris", 5.0, 0.0)
    frame.loc[rng.choice(rows, rows // 10, replace=False), "area"] = np.nan
    frame.loc[rng.choice(rows, rows // 10, replace=False), "city"] = None
    return frame


def _classification_frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"x0": rng.normal(size=rows), "x1": rng.normal(size=rows)})
    frame["kind"] = np.where(
        frame["x0"] > 0.3, "setosa", np.where(frame["x1"] > 0, "versicolor", "virginica")
    )
    frame.loc[rng.choice(rows, rows // 10, replace=False), "x1"] = np.nan
    return frame


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("models")
    return folder, f"sqlite:///{folder}/mlruns/mlflow.db"


@pytest.fixture(scope="module")
def regression(store: tuple[Path, str]) -> Trained:
    folder, uri = store
    csv = folder / "houses.csv"
    _regression_frame(300, seed=0).to_csv(csv, index=False)
    cfg = RunConfig(data=str(csv), target="price", epochs=3, batch_size=32, lr=0.05, tracking_uri=uri)
    return Trained(csv, "price", train(cfg), uri)


@pytest.fixture(scope="module")
def classification(store: tuple[Path, str]) -> Trained:
    folder, uri = store
    csv = folder / "flowers.csv"
    _classification_frame(300, seed=1).to_csv(csv, index=False)
    cfg = RunConfig(
        data=str(csv),
        target="kind",
        model="mlp",
        hidden=[8],
        epochs=3,
        batch_size=32,
        lr=0.05,
        tracking_uri=uri,
    )
    return Trained(csv, "kind", train(cfg), uri)


def _reference(trained: Trained, frame: pd.DataFrame) -> np.ndarray:
    """The TaskModule's outputs on ``frame``, prepared here from the run's own `preprocessing.json`
    and `best.ckpt` artifacts (not through the model's code): median imputation, one-hot levels and
    scaling written out in NumPy."""
    client = MlflowClient(trained.uri)
    run_id = trained.result.run_id
    pre = json.loads(Path(client.download_artifacts(run_id, "preprocessing.json")).read_text())
    columns = []
    for name in pre["numeric_columns"]:
        values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)
        columns.append(np.where(np.isfinite(values), values, pre["medians"][name]))
    for name, levels in pre["categorical_levels"].items():
        text = frame[name].astype(str).where(frame[name].notna(), None)
        columns.extend((text == level).to_numpy(dtype=np.float64) for level in levels)
    x = (np.stack(columns, axis=1) - np.asarray(pre["mean"])) / np.asarray(pre["scale"])
    state = torch.load(client.download_artifacts(run_id, "checkpoints/best.ckpt"), weights_only=True)[
        "state_dict"
    ]
    params = client.get_run(run_id).data.params
    n_outputs = len(pre["classes"]) or 1
    network = build_model(params["model"], x.shape[1], n_outputs, hidden=json.loads(params["hidden"]))
    module = TaskModule(network, task=pre["task"], n_classes=len(pre["classes"]) or None)
    module.load_state_dict(state)
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x.astype(np.float32))).numpy()


_LOAD_AND_PREDICT = """
import sys, mlflow.pyfunc, pandas as pd
for uri, data, out in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    mlflow.pyfunc.load_model(uri).predict(pd.read_csv(data)).to_json(out, orient="split", double_precision=15)
"""


def test_a_fresh_process_loads_each_model_and_predicts_as_the_task_module(
    regression: Trained, classification: Trained, tmp_path: Path
):
    # New rows (other seeds), read by a process that never saw the training files: they are moved away.
    new_houses, new_flowers = tmp_path / "new_houses.csv", tmp_path / "new_flowers.csv"
    _regression_frame(50, seed=7).drop(columns="price").to_csv(new_houses, index=False)
    _classification_frame(50, seed=8).drop(columns="kind").to_csv(new_flowers, index=False)
    hidden = [(t.csv, t.csv.with_suffix(".away")) for t in (regression, classification)]
    for path, away in hidden:
        path.rename(away)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_AND_PREDICT]
            + [regression.result.model_uri, str(new_houses), str(tmp_path / "houses.json")]
            + [classification.result.model_uri, str(new_flowers), str(tmp_path / "flowers.json")],
            cwd=tmp_path,
            env=subprocess_env(MLFLOW_TRACKING_URI=regression.uri),
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        for path, away in hidden:
            away.rename(path)
    assert done.returncode == 0, done.stderr[-3000:]

    houses = pd.read_json(tmp_path / "houses.json", orient="split")
    assert list(houses.columns) == ["prediction"]
    expected = _reference(regression, pd.read_csv(new_houses))[:, 0]
    np.testing.assert_allclose(houses["prediction"].to_numpy(), expected, rtol=0, atol=1e-6)
    assert 5 < houses["prediction"].mean() < 40, "in the target's units (prices of 5-40), not scaled"

    flowers = pd.read_json(tmp_path / "flowers.json", orient="split")
    classes = ["setosa", "versicolor", "virginica"]
    assert list(flowers.columns) == ["prediction", *classes]
    logits = _reference(classification, pd.read_csv(new_flowers))
    assert flowers["prediction"].tolist() == [classes[i] for i in logits.argmax(axis=1)]
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    np.testing.assert_allclose(flowers[classes].to_numpy(), probabilities, rtol=0, atol=1e-6)


def test_the_signature_is_the_raw_columns_and_the_example_real_rows(regression: Trained, tmp_path: Path):
    import mlflow.artifacts
    from mlflow.models import Model

    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=regression.result.model_uri, dst_path=str(tmp_path), tracking_uri=regression.uri
    )
    info = Model.load(folder)
    example = info.load_input_example(folder)
    inputs = info.signature.inputs.to_dict()
    assert inputs == [
        {"type": "long", "name": "rooms", "required": True},
        {"type": "double", "name": "area", "required": True},
        {"type": "string", "name": "city", "required": True},
    ]
    assert info.signature.outputs.to_dict() == [{"type": "double", "name": "prediction", "required": True}]
    raw = pd.read_csv(regression.csv).drop(columns="price").head(len(example))
    assert len(example) == 5
    pd.testing.assert_frame_equal(example.reset_index(drop=True), raw, check_dtype=False)
    # The run page's "Logged models" and the run's outputs name it; the other artifacts stay.
    client = MlflowClient(regression.uri)
    run = client.get_run(regression.result.run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [
        regression.result.model_uri.removeprefix("models:/")
    ]
    logged = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    assert logged.name == "model" and logged.source_run_id == run.info.run_id
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "preprocessing.json", "checkpoints"} <= names
