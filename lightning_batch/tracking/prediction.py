"""Predictions from a run's MLflow Model on a raw table: what ``run.py predict`` does.

``RUN_ID_OR_MODEL_URI`` names the model: a run id (its logged model ``model``), any MLflow model
URI (``models:/NAME@champion``, ``models:/NAME/3``, ``models:/m-...``, ``runs:/RUN_ID/model``) or a
local folder holding an ``MLmodel``. The model is loaded with ``mlflow.pyfunc.load_model``, the file
read as training read it (pandas' CSV parser, or Parquet), checked against the model's raw input
columns and predicted by the model's own code (:func:`~lightning_batch.tracking.run_model.predict_frame`),
so the numbers are those of ``load_model(uri).predict(frame)`` and of ``mlflow models serve``.

Bad input is one :class:`~lightning_batch.errors.UserError` line, raised before anything is
written: a run or model that does not exist, a run without a model, a file that cannot be read, a
missing input column, a numeric column holding text. Columns the model does not read are left out
and named once; empty cells are imputed as in training (medians; unseen or missing text levels
encode as all zeros).

Unlike ``PyFuncModel.predict``, a missing cell in a column the training file held as integers is
accepted here (MLflow's schema check refuses NaN in a ``long`` column); the column is read as
numbers and the cell imputed, as training would have.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_batch._extras import extra_imports
from lightning_batch.errors import UserError
from lightning_batch.store_uri import redact
from lightning_batch.tracking.run_ids import RUN_ID, resolve_run_id

with extra_imports("data", "run.py predict"):
    import numpy as np
    import pandas as pd

#: An MLflow run id: 32 lowercase hex digits.


@dataclass
class Prediction:
    """Predictions for a table, and what was read to make them."""

    frame: pd.DataFrame
    model_uri: str
    task: str
    used: list[str]
    ignored: list[str] = field(default_factory=list)
    #: Cells of the used columns that were empty (or not finite) and imputed.
    imputed: int = 0


def resolve_model_uri(target: str, tracking_uri: str) -> str:
    """The model URI that ``target`` (a run id, model URI or model folder) names; a UserError if none.

    A run id becomes ``models:/<model id>`` of the model it logged: a run that does not exist, or
    that has no model (a tuning trial, a run that failed or was trained before models were logged),
    is named in the error with what to use instead.
    """
    if ":/" in target:
        return target
    folder = Path(target)
    if (folder / "MLmodel").is_file():
        return str(folder.resolve())
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    target = resolve_run_id(client, target, redact(tracking_uri))
    if not RUN_ID.match(target):
        raise UserError(
            f"{target!r} is neither a run id (32 hex digits) nor an MLflow model URI; pass e.g. a run id from "
            "run.py's summary, models:/NAME@champion or runs:/RUN_ID/model"
        )
    from lightning_batch.tracking.run_model import run_model_id

    try:
        run = client.get_run(target)
    except MlflowException:
        raise UserError(
            f"no run {target!r} in the tracking store {redact(tracking_uri)}; check the id, or pass "
            "--tracking-uri of the store it was recorded in"
        ) from None
    model_id = run_model_id(client, run)
    if model_id is None:
        raise UserError(f"run {target!r} has no MLflow model: {_why_no_model(run)}")
    return f"models:/{model_id}"


def _why_no_model(run: Any) -> str:
    tags = run.data.tags
    if "optuna_trial_number" in tags:
        return (
            "tuning trials log none; predict with the study's refit run (best-of-...), or register it with "
            "run.py tune --register NAME"
        )
    if run.info.status != "FINISHED":
        return f"it is {run.info.status}, and only a finished run logs its model"
    if "stopped" in tags:
        return "it was stopped before the end (pruned), and only a run that ends its fit logs its model"
    return "it was recorded before runs logged their model; train it again"


def load_model(model_uri: str, tracking_uri: str) -> tuple[Any, Any]:
    """The MLflow pyfunc at ``model_uri`` (from the store at ``tracking_uri``) and its python model.

    Loaded with ``mlflow.pyfunc.load_model``, which resolves ``models:/`` and ``runs:/`` URIs against
    the process-wide tracking (and registry) URI: it points at ``tracking_uri`` for the load only.
    """
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from lightning_batch.tracking.run_model import TabularPyfuncModel, quiet_mlflow

    with tempfile.TemporaryDirectory() as tmp, quiet_mlflow(), _use_tracking_uri(tracking_uri):
        try:
            # suppress_warnings: the requirement check would scan every installed package's metadata
            # (seconds) to warn about version differences in this package's own environment.
            model = mlflow.pyfunc.load_model(model_uri, suppress_warnings=True, dst_path=tmp)
        except MlflowException as exc:
            raise UserError(f"cannot load model {model_uri!r}: {_first_line(exc)}") from None
        except OSError as exc:
            raise UserError(f"cannot load model {model_uri!r}: {exc}") from None
    python_model = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else None
    if not isinstance(python_model, TabularPyfuncModel):
        raise UserError(
            f"{model_uri!r} is not a lightning-batch model; run.py predict reads the models its runs log "
            "(use mlflow.pyfunc.load_model for others)"
        )
    return model, python_model


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0]


def read_table(path: str) -> pd.DataFrame:
    """A CSV (pandas' parser, as training reads it) or Parquet file; any failure is one UserError."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data file not found: {path!r}")
    try:
        if file.suffix.lower() == ".csv":
            frame = pd.read_csv(file)
        else:
            frame = pd.read_parquet(file)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path!r} is empty; give a file with a header row (and data rows)") from None
    except Exception as exc:  # pandas' and pyarrow's own error types for damaged files
        raise UserError(f"cannot read {path!r}: {_first_line(exc)}; check the file's format") from None
    frame.columns = [str(c) for c in frame.columns]
    return frame


def conform(
    frame: pd.DataFrame, inputs: list[dict[str, Any]], source: str
) -> tuple[pd.DataFrame, list[str], int]:
    """``frame``'s model input columns, typed as the model's inputs are; the ignored columns and the
    count of empty cells (to be imputed).

    A required column that is missing, or a numeric one holding text, is a UserError. Then the columns
    are cast as the input example was (:func:`~lightning_batch.tracking.run_model.cast_to_inputs`): numbers
    as float64 (NaN where empty), text as Python strings (None where empty).
    """
    from lightning_batch.tracking.run_model import (
        NUMERIC_TYPES,
        NotNumbersError,
        cast_to_inputs,
        numeric_inputs_as_numbers,
    )

    missing = [spec["name"] for spec in inputs if spec["required"] and spec["name"] not in frame.columns]
    if missing:
        shown = ", ".join(map(repr, missing[:10])) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise UserError(
            f"{source!r} lacks the model's input column(s) {shown}; add them (their cells may be empty: "
            "empty cells are imputed as in training)"
        )
    try:
        checked = numeric_inputs_as_numbers(frame, inputs)  # numeric inputs as float64; text refused
    except NotNumbersError as exc:
        raise UserError(exc.message(source)) from None
    empty = 0
    for spec in inputs:
        if spec["name"] not in checked.columns:
            continue
        column = checked[spec["name"]]
        # ±inf is imputed in a numeric column, as in training: it counts as empty.
        numeric = spec["type"] in NUMERIC_TYPES
        empty += int((~np.isfinite(column.to_numpy())).sum() if numeric else column.isna().sum())
    names = {spec["name"] for spec in inputs}
    ignored = [name for name in frame.columns if name not in names]
    return cast_to_inputs(checked, inputs), ignored, empty


def predict_file(target: str, data: str, tracking_uri: str) -> Prediction:
    """Predict every row of the file ``data`` with the model ``target`` names (see the module doc)."""
    from lightning_batch.store_uri import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file() and not (Path(target) / "MLmodel").is_file():
        # Reading must not create a store: MLflow would make an empty database at that path.
        raise UserError(f"no tracking store at {str(db)!r}; pass --tracking-uri of the store the run is in")
    uri = resolve_model_uri(target, tracking_uri)
    _, python_model = load_model(uri, tracking_uri)
    spec = python_model.spec
    frame = read_table(data)
    inputs, ignored, empty = conform(frame, spec.inputs, data)
    # The model's own predict, behind MLflow's schema check: this module's check came first and, unlike
    # MLflow's, lets an integer column have empty cells (they are imputed, as in training).
    predictions = python_model.predict(None, inputs)
    used = [spec_["name"] for spec_ in spec.inputs if spec_["name"] in inputs.columns]
    return Prediction(predictions, uri, spec.task, used, ignored, empty)


def write_predictions(frame: pd.DataFrame, path: str) -> None:
    """Write ``frame`` to ``path`` (CSV, or Parquet for ``.parquet``) all at once: a temporary file
    beside it renamed over it, so a failure never leaves half a file."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    os.close(handle)
    try:
        if target.suffix.lower() == ".parquet":
            frame.to_parquet(temporary, index=False)
        else:
            frame.to_csv(temporary, index=False)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_output_path(path: str | None) -> None:
    """Refuse an output whose folder does not exist, before the model is loaded."""
    if path is None:
        return
    folder = Path(path).parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path!r}: folder {str(folder)!r} does not exist")
    if Path(path).is_dir():
        raise UserError(f"cannot write {path!r}: it is a folder; give a file name such as preds.csv")
