"""The Model Registry and the ``champion`` alias, read back with MLflow's own client (the mutation
target ``make mutate-registry``, with the registry tests of tests/test_model_export.py).

Runs with a logged model are made directly through MLflow's client, as training leaves them, in a
copy of conftest's migrated empty sqlite store per test."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.tracking import is_tracking_uri_set

from lightning_batch.errors import UserError
from lightning_batch.tracking.model_registry import (
    Registration,
    check_model_name,
    register_model,
    register_run,
)


@pytest.fixture
def global_uri() -> Iterator[None]:
    """Restores MLflow's process-wide tracking URI after the test."""
    previous = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture
def uri(migrated_store: Path, workdir: Path, global_uri: None) -> str:
    """A fresh store, also MLflow's process-wide tracking URI as a training run leaves it (MLflow
    resolves a new version's ``models:/m-...`` source through it)."""
    db = workdir / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(migrated_store, db)
    store = f"sqlite:///{db}"
    mlflow.set_tracking_uri(store)
    return store


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run(uri: str, best: float | None = 0.5, model: bool = True, experiment: str = "registry") -> str:
    """A finished run as training leaves it: ``best_val_loss`` (unless None) and a READY logged model."""
    from mlflow.entities import LoggedModelOutput

    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id = client.create_run(experiment_id).info.run_id
    if best is not None:
        client.log_metric(run_id, "best_val_loss", best)
    if model:
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
        client.finalize_logged_model(logged.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _champion(uri: str, name: str) -> str:
    return str(_client(uri).get_model_version_by_alias(name, "champion").version)


def test_a_version_records_its_run_experiment_loss_and_model(uri: str):
    run_id = _run(uri, best=0.123456789012345, experiment="wine runs")
    done = register_run(uri, "wine", run_id, tags={"study": "s1"})
    client = _client(uri)
    version = client.get_model_version("wine", done.version)
    model_id = client.get_run(run_id).outputs.model_outputs[0].model_id
    assert version.run_id == run_id and version.source == f"models:/{model_id}"
    assert version.tags == {
        "run_id": run_id,
        "experiment": "wine runs",
        "metric": "val_loss",
        "val_loss": repr(0.123456789012345),
        "metric_source": "run best_val_loss",
        "study": "s1",
    }
    assert float(version.tags["val_loss"]) == 0.123456789012345, "the tag holds the loss exactly"
    assert (
        client.get_registered_model("wine").description
        == "Registered by lightning-batch (run.py --register)."
    )
    assert done == Registration("wine", "1", 0.123456789012345, True, None, None)
    assert _champion(uri, "wine") == "1"


def test_the_champion_moves_only_to_a_strictly_lower_finite_loss(uri: str):
    losses = {"1": 0.5, "2": 0.7, "3": 0.5, "4": 0.25, "5": math.nan, "6": math.inf, "7": 0.1}
    champions = []
    done = []
    for loss in losses.values():
        done.append(register_run(uri, "m", _run(uri), val_loss=loss))
        champions.append(_champion(uri, "m"))
    assert champions == ["1", "1", "1", "4", "4", "4", "7"]
    assert [d.version for d in done] == list(losses)
    assert [d.champion for d in done] == [True, False, False, True, False, False, True]
    assert [d.previous for d in done] == [None, "1", "1", "1", "4", "4", "4"]
    assert [d.previous_loss for d in done] == [None, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    # the loss given wins over the run's best_val_loss (0.5 each), and the tag records it
    assert [float(_client(uri).get_model_version("m", v).tags["val_loss"]) for v in ("2", "4")] == [0.7, 0.25]


def test_a_first_version_without_a_finite_loss_does_not_take_the_alias(uri: str):
    """No best_val_loss (or NaN): registered, no champion; the next version with a loss takes it."""
    first = register_run(uri, "m", _run(uri, best=None))
    assert (first.champion, first.previous, math.isnan(first.val_loss)) == (False, None, True)
    assert _client(uri).get_model_version("m", "1").tags["val_loss"] == "nan"
    with pytest.raises(Exception, match="champion"):
        _champion(uri, "m")
    second = register_run(uri, "m", _run(uri, best=0.9))
    assert second.champion and _champion(uri, "m") == "2"


@pytest.mark.parametrize("held", ["by hand", "", "nan", "inf"])
def test_a_holder_without_a_readable_finite_loss_keeps_the_alias(uri: str, held: str):
    register_run(uri, "m", _run(uri, best=0.5))
    client = _client(uri)
    client.set_model_version_tag("m", "1", "val_loss", held)
    later = register_run(uri, "m", _run(uri, best=0.01))
    assert (later.champion, later.previous, later.previous_loss) == (False, "1", None)
    assert _champion(uri, "m") == "1"
    assert "stays on version 1 (val_loss unknown)" in later.describe()


def test_a_holder_whose_loss_tag_was_removed_keeps_the_alias(uri: str):
    register_run(uri, "m", _run(uri, best=0.5))
    _client(uri).delete_model_version_tag("m", "1", "val_loss")
    later = register_run(uri, "m", _run(uri, best=0.01))
    assert (later.champion, later.previous_loss) == (False, None) and _champion(uri, "m") == "1"


def test_a_run_without_a_model_is_refused(uri: str):
    run_id = _run(uri, model=False)
    with pytest.raises(UserError, match=f"run '{run_id}' has no MLflow model to register"):
        register_run(uri, "m", run_id)
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found"):
        _client(uri).get_registered_model("m")


def test_the_registry_is_the_store_given_not_the_process_wide_one(
    migrated_store: Path, tmp_path: Path, global_uri: None
):
    """register_model writes to the registry of the store it is given, whatever MLflow's process-wide
    tracking URI is (here another store)."""
    stores = []
    for name in ("ours", "elsewhere"):
        (tmp_path / name).mkdir()
        shutil.copyfile(migrated_store, tmp_path / name / "mlflow.db")
        stores.append(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
    ours, elsewhere = stores
    mlflow.set_tracking_uri(elsewhere)
    run_id = _run(ours, model=False)
    done = register_model(ours, "m", run_id, f"runs:/{run_id}/model", 0.5)
    version = _client(ours).get_model_version("m", done.version)
    assert version.source == f"runs:/{run_id}/model" and version.run_id == run_id
    assert _champion(ours, "m") == "1"
    assert _client(elsewhere).search_registered_models() == []


def test_describe_says_where_the_alias_went():
    set_ = Registration("m", "1", 0.5, True).describe()
    moved = Registration("m", "3", 0.25, True, "1", 0.5).describe()
    stays = Registration("m", "2", 0.75, False, "1", 0.5).describe()
    unknown = Registration("m", "2", 0.75, False, "1", None).describe()
    assert set_.startswith("registered 'm' version 1 (val_loss 0.5): ") and "set" in set_
    assert (
        moved.startswith("registered 'm' version 3 (val_loss 0.25): ")
        and "moved from version 1 (val_loss 0.5)" in moved
    )
    assert (
        stays.startswith("registered 'm' version 2 (val_loss 0.75): ")
        and "stays on version 1 (val_loss 0.5)" in stays
    )
    assert "stays on version 1 (val_loss unknown)" in unknown


@pytest.mark.parametrize("name", ["wine-mlp", "XGB model v2", "a.b_c", "Ünïcode", "x\x7f"])
def test_a_model_name_mlflow_accepts_passes(name: str):
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "--register needs a model name"),
        ("   ", "--register needs a model name"),
        ("a/b:c", "cannot contain '/' or ':'; try 'a-b-c'"),
        ("team:model", "try 'team-model'"),
        (" m", "blanks at its ends"),
        ("m ", "blanks at its ends"),
        ("a\tb", "control characters"),
        ("a\x1fb", "control characters"),
    ],
)
def test_a_bad_model_name_is_refused_in_one_line(name: str, fragment: str):
    with pytest.raises(UserError, match=None) as raised:
        check_model_name(name)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)
