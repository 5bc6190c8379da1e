"""Every finished run logs an MLflow Model: loaded with MLflow's own pyfunc loader, it predicts raw rows
as the trained TaskModule does on the same rows prepared independently here, and `run.py predict`
gives the same numbers from the command line.

One regression run (an integer, a float column with empty cells, a text column with empty cells) and
one classification run (string labels, an MLP) are trained once for the whole module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from lightning_batch.cli import main
from lightning_batch.config import RunConfig
from lightning_batch.tabular.networks import build_model
from lightning_batch.tabular.task_module import TaskModule
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
        out = module(torch.from_numpy(x.astype(np.float32))).numpy()
    if pre.get("target_mean") is not None:  # a standardised regression target, back in its units
        out = out.astype(np.float64) * pre["target_scale"] + pre["target_mean"]
    return out


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
        {"type": "any", "name": "rooms", "required": True},  # integers: `any` lets a cell be empty
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


@pytest.mark.parametrize("cache", [False, True], ids=["read", "from-the-data-cache"])
def test_a_float32_parquet_file_logs_a_model_that_takes_any_number_width(tmp_path: Path, cache: bool):
    """Parquet files are often float32 (and int32): the run must end FINISHED with its model, and the
    model must take the same rows as float64/int64 (a CSV, JSON numbers) as well as in the file's
    own widths. MLflow's schema check refuses float64 for a column declared ``float``."""
    import mlflow.pyfunc

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({f"x{i}": rng.normal(size=400).astype(np.float32) for i in range(3)})
    frame["n"] = rng.integers(0, 5, 400).astype(np.int32)
    frame["y"] = (frame["x0"] + 0.5 * frame["n"]).astype(np.float32)
    data = tmp_path / "table.parquet"
    frame.to_parquet(data)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    options = {"data_cache": str(tmp_path / "cache")} if cache else {}
    cfg = RunConfig(data=str(data), target="y", epochs=1, batch_size=64, tracking_uri=uri, **options)
    result = train(cfg)
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.model_uri
    assert (tmp_path / "cache").is_dir() == cache, "the cached variant trained from the data cache"

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(result.model_uri)
        rows = frame.drop(columns="y").head(20)
        narrow = model.predict(rows)["prediction"].to_numpy()
        wide = model.predict(rows.astype({f"x{i}": np.float64 for i in range(3)} | {"n": np.int64}))
    finally:
        mlflow.set_tracking_uri(previous)
    np.testing.assert_array_equal(narrow, wide["prediction"].to_numpy())
    assert np.isfinite(narrow).all()


# -- run.py predict --------------------------------------------------------------------------------


def _pyfunc(trained: Trained, frame: pd.DataFrame) -> pd.DataFrame:
    """MLflow's own loader in this process (the tracking URI pointed at the run's store meanwhile)."""
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(trained.uri)
    try:
        return mlflow.pyfunc.load_model(trained.result.model_uri).predict(frame)
    finally:
        mlflow.set_tracking_uri(None)


def test_predict_matches_the_task_module_imputes_and_names_ignored_columns_once(
    regression: Trained, tmp_path: Path, capsys: pytest.CaptureFixture
):
    frame = _regression_frame(40, seed=3)  # the target column comes along: not an input, ignored
    frame["notes"] = "n/a"
    frame.loc[[1, 5], "rooms"] = np.nan  # empty cells in a column training read as integers
    data, output = tmp_path / "new.csv", tmp_path / "preds.csv"
    frame.to_csv(data, index=False)
    argv = ["predict", regression.result.run_id, "--data", str(data), "--output", str(output)]
    assert main([*argv, "--tracking-uri", regression.uri]) == 0
    said = capsys.readouterr()
    predictions = pd.read_csv(output)
    assert list(predictions.columns) == ["prediction"] and len(predictions) == 40
    np.testing.assert_allclose(
        predictions["prediction"], _reference(regression, frame)[:, 0], rtol=0, atol=1e-6
    )
    # MLflow's own loader, behind its schema check, gives the same numbers: on the rows as read back
    # from the file (empty integer cells included), and on the complete rows typed as integers.
    raw = pd.read_csv(data).drop(columns=["price", "notes"])
    assert raw["rooms"].dtype == np.float64 and raw["rooms"].isna().sum() == 2
    np.testing.assert_allclose(
        predictions["prediction"], _pyfunc(regression, raw)["prediction"], rtol=1e-6, atol=0
    )
    complete = raw.drop(index=[1, 5]).astype({"rooms": np.int64})
    np.testing.assert_allclose(
        predictions.drop(index=[1, 5])["prediction"],
        _pyfunc(regression, complete)["prediction"],
        # float32 networks: rows batched differently may round differently in the last bits
        rtol=1e-6,
        atol=0,
    )
    summary = " ".join(said.out.split())
    assert "ignored (not model inputs) │ 2: price, notes" in summary
    assert summary.count("notes") == 1 and "columns used │ 3: rooms, area, city" in summary
    assert f"output │ {output}" in summary.replace("│ │", "")


def test_mlflow_s_loader_refuses_text_in_an_integer_column_in_one_line(regression: Trained):
    """The signature lets an integer column through as `any` (for its empty cells); the model itself
    refuses a cell that is not a number, saying which column and what to do."""
    from mlflow.exceptions import MlflowException

    frame = _regression_frame(6, seed=5).drop(columns="price").astype({"rooms": object})
    frame.loc[2, "rooms"] = "three"
    with pytest.raises(MlflowException) as raised:
        _pyfunc(regression, frame)
    message = raised.value.message
    assert message.startswith("column 'rooms' must hold numbers (the model was trained on long values)")
    assert "1 cell(s) such as 'three'" in message and "\n" not in message


def test_predict_to_stdout_gives_labels_in_the_training_vocabulary(
    classification: Trained, tmp_path: Path, capsys: pytest.CaptureFixture
):
    frame = _classification_frame(20, seed=4).drop(columns="kind")
    data = tmp_path / "flowers.csv"
    frame.to_csv(data, index=False)
    argv = ["predict", f"runs:/{classification.result.run_id}/model", "--data", str(data)]
    assert main([*argv, "--tracking-uri", classification.uri]) == 0
    said = capsys.readouterr()
    from io import StringIO

    printed = pd.read_csv(StringIO(said.out))  # stdout holds the predictions only; the summary is on stderr
    pd.testing.assert_frame_equal(printed, _pyfunc(classification, frame), check_dtype=False, atol=1e-12)
    assert set(printed["prediction"]) <= {"setosa", "versicolor", "virginica"}
    assert "rows │ 20" in " ".join(said.err.split())


def test_a_true_false_target_is_predicted_in_its_own_labels_as_accurately_as_the_run_tested(
    store: tuple[Path, str], tmp_path: Path
):
    """A target read as booleans (True/False in the CSV): MLflow's loader predicts booleans, False as
    well as True, and on the run's test rows their accuracy against the true labels is the test
    accuracy the run logged (labels mapped from the classes' text would read "False" as True)."""
    from lightning_batch.tabular.splitting import split_indices

    rng = np.random.default_rng(12)
    frame = pd.DataFrame({"x0": rng.normal(size=400), "x1": rng.normal(size=400)})
    frame["spam"] = frame["x0"] - 0.5 * frame["x1"] > 0.1
    csv = tmp_path / "mail.csv"
    frame.to_csv(csv, index=False)
    assert pd.read_csv(csv)["spam"].dtype == bool
    uri = store[1]
    cfg = RunConfig(data=str(csv), target="spam", epochs=5, batch_size=32, lr=0.1, tracking_uri=uri)
    result = train(cfg)
    truth = frame["spam"].to_numpy()
    cfg = cfg.validate()
    _, _, test_rows = split_indices(
        len(frame), truth.astype(int), cfg.val_fraction, cfg.test_fraction, cfg.seed
    )
    predicted = _pyfunc(Trained(csv, "spam", result, uri), frame.drop(columns="spam").iloc[test_rows])
    assert predicted["prediction"].dtype == bool and set(predicted.columns) == {"prediction", "False", "True"}
    accuracy = float((predicted["prediction"].to_numpy() == truth[test_rows]).mean())
    assert accuracy == pytest.approx(result.metrics["test_acc"], abs=1e-6)
    assert accuracy > 0.9 and 0.2 < truth[test_rows].mean() < 0.8, "both labels are predicted right"


def _bad_inputs(regression: Trained, folder: Path) -> dict[str, tuple[str, str, str]]:
    """name -> (model argument, data file, a fragment of the one-line error)."""
    frame = _regression_frame(10, seed=5)
    no_city, text_area = folder / "no_city.csv", folder / "text_area.csv"
    frame.drop(columns="city").to_csv(no_city, index=False)
    frame.astype({"area": object}).assign(area=["big"] + [1.0] * 9).to_csv(text_area, index=False)
    good = folder / "good.csv"
    frame.to_csv(good, index=False)
    client = MlflowClient(regression.uri)
    bare = client.create_run(client.get_experiment_by_name("lightning-batch").experiment_id)
    client.set_terminated(bare.info.run_id, "FINISHED")
    run_id = regression.result.run_id
    return {
        "missing column": (run_id, str(no_city), "lacks the model's input column(s) 'city'"),
        "text in a numeric column": (run_id, str(text_area), "column 'area' of"),
        "unknown run": ("0" * 32, str(good), "no run '00000000000000000000000000000000'"),
        "run without a model": (bare.info.run_id, str(good), "has no MLflow model"),
        "neither a run id nor a URI": ("last-tuesday", str(good), "neither a run id"),
        "unknown registered model": ("models:/no-such-model@champion", str(good), "cannot load model"),
        "missing data file": (run_id, str(folder / "absent.csv"), "data file not found"),
    }


def test_bad_predict_input_is_one_line_exit_2_and_no_output(
    regression: Trained, tmp_path: Path, capsys: pytest.CaptureFixture
):
    for name, (model, data, fragment) in _bad_inputs(regression, tmp_path).items():
        output = tmp_path / f"{name}.csv"
        code = main(
            ["predict", model, "--data", data, "--output", str(output), "--tracking-uri", regression.uri]
        )
        said = capsys.readouterr()
        assert code == 2, (name, said.err)
        lines = said.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (name, said.err)
        assert not output.exists() and not list(tmp_path.glob(f".{output.name}*")), name


# -- the Model Registry ------------------------------------------------------------------------------


def _iris_csv(folder: Path) -> Path:
    from sklearn.datasets import load_iris

    path = folder / "iris.csv"
    load_iris(as_frame=True).frame.to_csv(path, index=False)
    return path


def test_champion_moves_only_to_a_version_with_a_lower_val_loss(
    store: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture
):
    uri = store[1]  # the module's store: a fresh sqlite store costs seconds of schema migrations
    iris = str(_iris_csv(tmp_path))
    common = ["--data", iris, "--target", "target", "--tracking-uri", uri, "--register", "iris-model"]
    assert main(["train", *common, "--epochs", "3", "--optimizer", "adam", "--lr", "0.02"]) == 0
    assert "alias 'champion' set" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    first = client.get_model_version_by_alias("iris-model", "champion")
    run = client.get_run(first.run_id)
    assert str(first.version) == "1" and first.tags["run_id"] == run.info.run_id
    assert first.tags["metric"] == "val_loss" and first.tags["experiment"] == "lightning-batch"
    assert float(first.tags["val_loss"]) == pytest.approx(run.data.metrics["best_val_loss"])

    # Worse: one epoch at a tiny lr. Registered as version 2, but the alias stays.
    assert main(["train", *common, "--epochs", "1", "--lr", "0.0001"]) == 0
    assert "stays on version 1" in capsys.readouterr().out
    second = client.get_model_version("iris-model", "2")
    assert float(second.tags["val_loss"]) > float(first.tags["val_loss"])
    assert str(client.get_model_version_by_alias("iris-model", "champion").version) == "1"

    # Better: more epochs. Version 3 takes the alias.
    assert main(["train", *common, "--epochs", "15", "--optimizer", "adam", "--lr", "0.05"]) == 0
    assert "moved from version 1" in capsys.readouterr().out
    third = client.get_model_version("iris-model", "3")
    assert float(third.tags["val_loss"]) < float(first.tags["val_loss"])
    assert str(client.get_model_version_by_alias("iris-model", "champion").version) == "3"

    # The champion, by its alias, predicts as the run that made it.
    by_alias, by_run = tmp_path / "alias.csv", tmp_path / "run.csv"
    champion = ["predict", "models:/iris-model@champion", "--data", iris, "--output", str(by_alias)]
    assert main([*champion, "--tracking-uri", uri]) == 0
    assert (
        main(["predict", third.run_id, "--data", iris, "--output", str(by_run), "--tracking-uri", uri]) == 0
    )
    pd.testing.assert_frame_equal(pd.read_csv(by_alias), pd.read_csv(by_run))
    assert (pd.read_csv(by_alias)["prediction"] == pd.read_csv(iris)["target"]).mean() > 0.9


@pytest.fixture
def registry_uri(store: tuple[Path, str], tmp_path: Path) -> Iterator[str]:
    """The module's store, while MLflow's process-wide tracking URI points at another one (as in a
    process that trained against another store, or never trained): registering must use the store
    it is given, not that URI (MLflow resolves a new version's ``models:/m-...`` source through it)."""
    import mlflow
    from mlflow.tracking import is_tracking_uri_set

    previous = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/another-store.db")
    try:
        yield store[1]
    finally:
        mlflow.set_tracking_uri(previous)


def _run_with_a_model(client: MlflowClient, val_losses: list[float]) -> str:
    """A finished run as training leaves it for the registry: its ``val_loss`` per epoch, its
    ``best_val_loss`` (the lowest) and a READY logged model named ``model`` among its outputs."""
    from mlflow.entities import LoggedModelOutput

    experiment = client.get_experiment_by_name("registry-runs")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("registry-runs")
    run_id = client.create_run(experiment_id).info.run_id
    for epoch, loss in enumerate(val_losses):
        client.log_metric(run_id, "val_loss", loss, step=epoch)
    client.log_metric(run_id, "best_val_loss", min(val_losses))
    model = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_an_equal_val_loss_leaves_the_champion_where_it_is(registry_uri: str):
    from lightning_batch.tracking.model_registry import register_run

    uri = registry_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    first, second = (_run_with_a_model(client, [0.7, 0.25, 0.4]) for _ in range(2))
    assert register_run(uri, "tied-model", first).champion
    tied = register_run(uri, "tied-model", second)
    champion = client.get_model_version_by_alias("tied-model", "champion")
    assert (str(champion.version), champion.run_id) == ("1", first)
    assert (tied.version, tied.champion, str(tied.previous)) == ("2", False, "1")
    assert "stays on version 1" in tied.describe()


def test_a_version_is_judged_by_its_runs_best_val_loss_not_its_last(registry_uri: str):
    """The registered model holds the best epoch's weights: the run whose best epoch is better
    keeps the alias, even when its last epoch was worse than the other run's last."""
    from lightning_batch.tracking.model_registry import register_run

    uri = registry_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    overfit = _run_with_a_model(client, [0.6, 0.3, 0.9])  # best 0.3, last 0.9
    steady = _run_with_a_model(client, [0.8, 0.5])  # best 0.5, last 0.5
    assert register_run(uri, "judged-model", overfit).champion
    later = register_run(uri, "judged-model", steady)
    champion = client.get_model_version_by_alias("judged-model", "champion")
    assert (str(champion.version), champion.run_id) == ("1", overfit)
    assert float(champion.tags["val_loss"]) == pytest.approx(0.3)
    assert not later.champion and later.val_loss == pytest.approx(0.5)


@pytest.mark.slow
def test_a_studys_refit_is_registered_with_the_study_named(
    store: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture
):
    uri = store[1]
    iris = str(_iris_csv(tmp_path))
    study = ["tune", "--data", iris, "--target", "target", "--tracking-uri", uri, "--register", "iris-study"]
    study += ["--study", "iris", "--trials", "2", "--epochs", "2", "--pruner", "none"]
    assert main([*study, "--storage", f"sqlite:///{tmp_path}/optuna.db"]) == 0
    assert "alias 'champion' set" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    first = client.get_model_version_by_alias("iris-study", "champion")
    refit = client.get_run(first.run_id)
    assert str(first.version) == "1" and refit.info.run_name == "best-of-iris"
    assert first.tags["study"] == "iris" and first.tags["run_id"] == refit.info.run_id
    assert first.tags["study_run_id"] == refit.data.tags["study_parent_run_id"]
    assert float(first.tags["val_loss"]) == pytest.approx(refit.data.metrics["best_val_loss"])
    # The refit read the study's data cache, not the file: its model still has the file's raw columns.
    assert refit.data.params["data_cache"] not in ("", "None")
    inputs = _model_inputs(first.source, uri, tmp_path)
    assert [c["name"] for c in inputs] == list(pd.read_csv(iris).columns.drop("target"))


def _model_inputs(model_uri: str, uri: str, folder: Path) -> list[dict]:
    import mlflow.artifacts
    from mlflow.models import Model

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=model_uri, dst_path=str(folder), tracking_uri=uri
    )
    return Model.load(local).signature.inputs.to_dict()


def test_register_refuses_a_bad_name_before_training(tmp_path: Path, capsys: pytest.CaptureFixture):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert main(["train", "--data", "iris", "--tracking-uri", uri, "--register", "team/model"]) == 2
    assert "cannot contain '/' or ':'" in capsys.readouterr().err
    assert (
        main(["tune", "--data", "iris", "--retrain", "none", "--tracking-uri", uri, "--register", "m"]) == 2
    )
    assert "--retrain none skips it" in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists(), "nothing trained, no store created"


# -- serving ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_models_serve_answers_as_predict_does(regression: Trained, tmp_path: Path):
    """`mlflow models serve` (the README's command) on 127.0.0.1: real rows with empty cells, POSTed as
    JSON dataframe_split, come back with `run.py predict`'s numbers."""
    import json as json_module
    import urllib.error
    import urllib.request

    from .conftest import free_port, stop_process_tree, wait_for

    frame = _regression_frame(30, seed=9).drop(columns="price")
    # An integer column's empty cells: JSON nulls the signature must let in.
    frame.loc[[2, 7], "rooms"] = np.nan
    data, expected = tmp_path / "rows.csv", tmp_path / "expected.csv"
    frame.to_csv(data, index=False)
    argv = ["predict", regression.result.run_id, "--data", str(data), "--output", str(expected)]
    assert main([*argv, "--tracking-uri", regression.uri]) == 0

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", regression.result.model_uri]
        + ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        # MLflow starts the server as `uvicorn` from PATH: the environment's bin folder, as when activated.
        env=subprocess_env(
            MLFLOW_TRACKING_URI=regression.uri,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", 180)
        rows = pd.read_csv(data)  # as a client would send them: empty cells become JSON nulls

        def invocation(frame: pd.DataFrame) -> urllib.request.Request:
            payload = {"dataframe_split": json_module.loads(frame.to_json(orient="split", index=False))}
            return urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json_module.dumps(payload).encode(),
                headers={"Content-Type": "application/json"},
            )

        with urllib.request.urlopen(invocation(rows), timeout=60) as response:
            answer = json_module.loads(response.read())
        # Text where the model was trained on integers: a 400 that says which column and what to do.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(
                invocation(rows.astype({"rooms": object}).assign(rooms="three")), timeout=60
            )
        assert refused.value.code == 400
        assert "column 'rooms' must hold numbers" in json_module.loads(refused.value.read())["message"]
    finally:
        stop_process_tree(server)
        log.close()
    served = pd.DataFrame(answer["predictions"])
    np.testing.assert_allclose(served["prediction"], pd.read_csv(expected)["prediction"], rtol=0, atol=1e-9)
    assert rows[["rooms", "area", "city"]].isna().any().all(), "the rows had empty cells in every column"


def test_the_logged_test_rmse_is_that_of_run_py_predict_on_the_raw_test_rows(regression: Trained, tmp_path):
    """The target is standardised for training; the test RMSE the run logs is in the target's own
    units: the RMSE of `run.py predict`'s prices against the raw CSV's, on the test split's rows."""
    from lightning_batch.tabular.splitting import split_indices

    frame = pd.read_csv(regression.csv)
    cfg = RunConfig(data=str(regression.csv), target="price").validate()
    _, _, test_rows = split_indices(len(frame), None, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    data, output = tmp_path / "test_rows.csv", tmp_path / "predicted.csv"
    frame.iloc[test_rows].to_csv(data, index=False)
    assert main(["predict", regression.result.run_id, "--data", str(data), "--output", str(output)]) == 0
    predicted = pd.read_csv(output)["prediction"].to_numpy()
    rmse = float(np.sqrt(np.mean((predicted - frame["price"].to_numpy()[test_rows]) ** 2)))
    logged = MlflowClient(regression.uri).get_run(regression.result.run_id).data.metrics
    assert logged["test_rmse"] == pytest.approx(rmse, rel=1e-5)
    pre = json.loads(
        Path(
            MlflowClient(regression.uri).download_artifacts(regression.result.run_id, "preprocessing.json")
        ).read_text()
    )
    train_rows = frame.drop(index=frame.index[test_rows])  # the train split is among these rows
    assert pre["target_scale"] > 1.0 and abs(pre["target_mean"] - train_rows["price"].mean()) < 2.0
