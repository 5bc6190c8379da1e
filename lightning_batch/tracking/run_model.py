"""A run's MLflow Model: the trained network with its fitted preprocessing, as one pyfunc.

What ``mlflow.pyfunc.load_model(uri).predict(raw_frame)`` needs, logged once per finished run
with MLflow's own ``Model.log`` (what ``mlflow.pyfunc.log_model`` calls):

- ``artifacts/model_spec.json``: the architecture (what :func:`~lightning_batch.tabular.networks.build_model`
  takes), the fitted :class:`~lightning_batch.tabular.preprocessing.Preprocessor` (medians, one-hot levels,
  mean and scale), the raw input columns and the class labels in the target's own type;
- ``artifacts/weights.pt``: the best validation checkpoint's network weights, a plain state dict
  (loaded with ``weights_only=True``: nothing is unpickled but tensors);
- a signature whose inputs are the *raw* feature columns, named and typed as the training file was
  read (MLflow's own types: ``double``, ``string``, ...; integer columns as ``any``, see
  :func:`build_signature`), and an input example of real raw rows, so MLflow's schema check and
  ``mlflow models serve`` know what to expect;
- ``code/pyfunc_model.py``: MLflow's "models from code" entry point, three lines that build a
  :class:`TabularPyfuncModel` (nothing is pickled): loading needs this package installed, never
  the training data.

Output, one row per input row, in the input's index: regression, a ``prediction`` column in the
target's units; classification, ``prediction`` (the label in the original vocabulary: strings stay
strings, integers integers) and one probability column per class, named after the class.

Example (a spec and weights made by hand; :func:`log_run_model` builds them from a run):
    >>> import pandas as pd, torch
    >>> from lightning_batch.tabular.networks import build_model
    >>> from lightning_batch.tabular.preprocessing import Preprocessor
    >>> pre = Preprocessor.fit(pd.DataFrame({"x": [0.0, 2.0]}))
    >>> spec = ModelSpec(task="classification", architecture={"name": "softmax", "n_features": 1,
    ...     "n_outputs": 2}, preprocessor=pre.to_dict(), classes=["no", "yes"], labels=["no", "yes"])
    >>> network = build_model("softmax", 1, 2)
    >>> with torch.no_grad():
    ...     _ = network.linear.weight.copy_(torch.tensor([[-1.0], [1.0]]))
    ...     _ = network.linear.bias.zero_()
    >>> out = predict_frame(network, spec, pd.DataFrame({"x": [3.0, None, -1.0]}))
    >>> out["prediction"].tolist(), list(out.columns)
    (['yes', 'no', 'no'], ['prediction', 'no', 'yes'])
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_batch._extras import extra_imports

with extra_imports("tracking", "MLflow models"):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModel
with extra_imports("data", "MLflow models"):
    import pandas as pd

#: The logged model's name: ``runs:/RUN_ID/model`` and the run page's "Logged models" show it.
MODEL_NAME = "model"
SPEC_FILE = "model_spec.json"
ENTRY_FILE = "pyfunc_model.py"
#: The model's code (MLflow runs it when it loads the model): this package does the work.
ENTRY_CODE = """\
# lightning-batch: the pyfunc MLflow loads (models from code); the spec and weights are artifacts.
from mlflow.models import set_model

from lightning_batch.model_export import TabularPyfuncModel

set_model(TabularPyfuncModel())
"""
WEIGHTS_FILE = "weights.pt"
#: The output column holding the prediction (regression value or class label).
PREDICTION = "prediction"
#: Raw rows kept as the model's input example (MLflow stores them as JSON beside the MLmodel).
EXAMPLE_ROWS = 5
#: Rows per forward pass at prediction time: bounds the activations' memory for large inputs.
PREDICT_CHUNK = 65536
#: MLflow column types that hold numbers (the rest are read as text, booleans or left as they are).
NUMERIC_TYPES = ("double", "float", "long", "integer")


@dataclass
class ModelSpec:
    """Everything but the weights that turns raw rows into predictions, as plain JSON."""

    task: str
    #: Keyword arguments of :func:`~lightning_batch.tabular.networks.build_model` (``name``, ``n_features``, ...).
    architecture: dict[str, Any]
    #: :meth:`Preprocessor.to_dict` of the fitted preprocessing.
    preprocessor: dict[str, Any]
    #: Each class's text, in the network's output order (empty for regression).
    classes: list[str] = field(default_factory=list)
    #: The same classes in the target's own type (int, float, bool or str): what ``prediction`` holds.
    labels: list[Any] = field(default_factory=list)
    #: The raw input columns: ``{"name", "type", "required"}`` in MLflow's column-spec form.
    inputs: list[dict[str, Any]] = field(default_factory=list)
    #: The target column's name in the training data (documentation; never read at predict time).
    target: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls(**json.loads(text))

    def probability_columns(self) -> list[str]:
        """One column per class, named after it (a class named ``prediction`` gets a suffix)."""
        return [name if name != PREDICTION else f"{name}_probability" for name in self.classes]


def predict_frame(network: torch.nn.Module, spec: ModelSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """Predictions for raw rows: the training preprocessing, the network, then labels or values.

    ``frame`` holds the raw feature columns (extra columns are not read); missing and non-finite
    numbers are imputed with the training medians, unseen or missing text levels encode as all
    zeros, exactly as the training and test splits were prepared.
    """
    from lightning_batch.tabular.preprocessing import Preprocessor

    preprocessor = Preprocessor.from_dict(spec.preprocessor)
    features = torch.from_numpy(preprocessor.transform(frame))
    network.eval()
    with torch.inference_mode():
        parts = [network(features[i : i + PREDICT_CHUNK]) for i in range(0, len(features), PREDICT_CHUNK)]
        n_outputs = int(spec.architecture["n_outputs"])
        output = torch.cat(parts) if parts else torch.zeros((0, n_outputs))
    if spec.task == "regression":
        # float32 from the network, widened exactly, then in the target's units (a standardised target).
        values = preprocessor.unscale_target(output[:, 0].double().numpy())
        return pd.DataFrame({PREDICTION: values}, index=frame.index)
    probabilities = torch.softmax(output, dim=1).double().numpy()
    chosen = output.argmax(dim=1).numpy()  # the TaskModule's own rule (argmax of the logits)
    labels = pd.Series(np.asarray(spec.labels, dtype=object)[chosen], index=frame.index)
    if spec.labels and not isinstance(spec.labels[0], str):
        labels = labels.astype(type(spec.labels[0]))  # ints stay int64, floats float64, bools bool
    out = pd.DataFrame({PREDICTION: labels}, index=frame.index)
    for position, name in enumerate(spec.probability_columns()):
        out[name] = probabilities[:, position]
    return out


class NotNumbersError(ValueError):
    """A numeric input column holds cells that are not numbers (text other than empty)."""

    def __init__(self, name: Any, kind: str, count: int, example: Any) -> None:
        self.name, self.kind, self.count, self.example = name, kind, count, str(example)[:30]
        super().__init__(self.message())

    def message(self, source: str | None = None) -> str:
        """One line saying what is wrong and what to do; ``source`` names the file it came from."""
        where = f"column {self.name!r}" + (f" of {source!r}" if source else "")
        return (
            f"{where} must hold numbers (the model was trained on {self.kind} values), but {self.count} "
            f"cell(s) such as {self.example!r} are not; fix them or leave them empty (empty cells are imputed)"
        )


def numbers_of(column: pd.Series, kind: str) -> pd.Series:
    """A numeric input column as float64, NaN where empty; :class:`NotNumbersError` where a cell
    holds something else (e.g. text in a column the model was trained on as numbers).

    >>> numbers_of(pd.Series([1, None, "2.5"], dtype=object), "long").tolist()
    [1.0, nan, 2.5]
    >>> numbers_of(pd.Series(["1", "one"], name="rooms"), "long")
    Traceback (most recent call last):
    ...
    lightning_batch.tracking.run_model.NotNumbersError: column 'rooms' must hold numbers (the model was trained on long values), but 1 cell(s) such as 'one' are not; fix them or leave them empty (empty cells are imputed)
    """
    numbers = pd.to_numeric(column, errors="coerce").astype(np.float64)
    bad = numbers.isna() & column.notna()
    if bad.any():
        raise NotNumbersError(column.name, kind, int(bad.sum()), column[bad].iloc[0])
    return numbers


def numeric_inputs_as_numbers(frame: pd.DataFrame, inputs: list[dict[str, Any]]) -> pd.DataFrame:
    """``frame`` with each numeric input column as float64 (NaN where empty), checked by
    :func:`numbers_of`; other columns as they are. A copy only when a column had to change."""
    changed = {
        spec["name"]: numbers_of(frame[spec["name"]], spec["type"])
        for spec in inputs
        if spec["type"] in NUMERIC_TYPES
        and spec["name"] in frame.columns
        and frame[spec["name"]].dtype != np.float64
    }
    return frame.assign(**changed) if changed else frame


class TabularPyfuncModel(PythonModel):
    """The pyfunc of a lightning-batch run: reads its spec and weights from the model's artifacts."""

    def load_context(self, context: Any) -> None:
        self.spec = ModelSpec.from_json(Path(context.artifacts["spec"]).read_text())
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.network = _network(self.spec, state)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        # A DataFrame hint is one MLflow 3 infers no schema from: the signature stays the raw
        # columns the run was trained on (MLflow's schema check has run before this is called).
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            # Integer columns are `any` in the signature (so an empty cell passes MLflow's check):
            # this is where a cell that is not a number is refused, with what to do.
            frame = numeric_inputs_as_numbers(frame, self.spec.inputs)
        except NotNumbersError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return predict_frame(self.network, self.spec, frame)


# -- building the spec, the signature and the example from a run ----------------------------------


def network_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own weights from a TaskModule state dict (its ``model.`` entries, prefix removed)."""
    return {
        key.removeprefix("model."): value.detach().cpu()
        for key, value in state_dict.items()
        if key.startswith("model.")
    }


#: The signature declares numbers at their widest: MLflow's schema check upcasts a float32 column to
#: ``double`` and an int32 one to ``long``, but refuses the other way (float64 to ``float``). A model
#: trained on a float32 Parquet file must still take the float64 columns of a CSV, or JSON numbers.
WIDEST_TYPE = {"float": "double", "integer": "long"}


def raw_column_specs(frame: pd.DataFrame | None, dataset_schema: str | None) -> list[dict[str, Any]]:
    """Name and MLflow type of every raw column, the target included, as the source was read.

    From the frame itself when the run read it (typed by dtype, as the run's dataset input is), else
    from the schema the data cache kept of the source (a run that trained from prepared tables).
    Narrow numeric types are widened (:data:`WIDEST_TYPE`).
    """
    if frame is not None:
        from lightning_batch.tracking.datasets import column_type  # the dataset input's own typing

        specs = []
        for name in frame.columns:
            column = frame[name]
            kind = column_type(column, bool(column.isna().any()))
            specs.append({"name": str(name), "type": _type_name(kind)})
    elif dataset_schema:
        columns = json.loads(dataset_schema).get("mlflow_colspec", [])
        specs = [{"name": str(c["name"]), "type": str(c.get("type", "any"))} for c in columns]
    else:
        return []
    return [{**spec, "type": WIDEST_TYPE.get(spec["type"], spec["type"])} for spec in specs]


def _type_name(kind: Any) -> str:
    from mlflow.types.schema import ColSpec

    return str(ColSpec(type=kind, name="column").to_dict()["type"])


def input_specs(
    columns: list[dict[str, Any]], target: str, preprocessor: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The model's input columns: every raw column but the target, in the file's order.

    ``required`` is false only for columns the preprocessing dropped (missing in every training row):
    the model reads nothing from them, so leaving them out is no error. Missing *cells* are allowed in
    every column and imputed.
    """
    dropped = set(preprocessor.get("dropped_columns", []))
    return [
        {"name": c["name"], "type": c["type"], "required": c["name"] not in dropped}
        for c in columns
        if c["name"] != target
    ]


def typed_labels(classes: list[str], target_type: str | None) -> list[Any]:
    """The classes (kept as text in ``preprocessing.json``) back in the target's own type.

    >>> typed_labels(["0", "1"], "long"), typed_labels(["False", "True"], "boolean"), typed_labels(["a"], "string")
    ([0, 1], [False, True], ['a'])
    """
    if target_type in ("long", "integer"):
        return [int(c) for c in classes]
    if target_type in ("double", "float"):
        return [float(c) for c in classes]
    if target_type == "boolean":
        return [c == "True" for c in classes]
    return list(classes)


def cast_to_inputs(frame: pd.DataFrame, inputs: list[dict[str, Any]]) -> pd.DataFrame:
    """``frame``'s input columns in the dtypes MLflow's schema check expects for ``inputs``.

    Numbers as float64 (``double``/``float``) or int64 (``long``/``integer``, when no cell is
    missing), text as Python strings with None where missing. Used on the input example (rows read
    from the head of a file can be typed narrower than the whole file).
    """
    out = {}
    for spec in inputs:
        name, kind = spec["name"], spec["type"]
        if name not in frame.columns:
            continue
        column = frame[name]
        if kind in NUMERIC_TYPES:
            column = pd.to_numeric(column, errors="coerce").astype(np.float64)
            if kind in ("long", "integer") and not column.isna().any():
                column = column.astype(np.int64)
        elif kind == "string":
            column = column.astype(str).where(column.notna(), None).astype(object)
        out[name] = column
    return pd.DataFrame(out, index=frame.index)


def example_rows(data: Any, cfg: Any, rows: int = EXAMPLE_ROWS) -> pd.DataFrame | None:
    """Up to ``rows`` real raw rows of the training source (features and target), or None.

    The rows the run read, when it read the source; else (tables from the data cache) the head of
    the file, or the bundled or generated set made again (a generator's first rows, cheaply).
    """
    if data.raw_frame is not None:
        return data.raw_frame.head(rows)
    with contextlib.suppress(Exception):  # an example is documentation: never worth a failed run
        if cfg.is_file_source:
            path = Path(cfg.data)
            if path.suffix.lower() == ".csv":
                return pd.read_csv(path, nrows=rows)
            import pyarrow.parquet as pq

            batch = next(pq.ParquetFile(path).iter_batches(batch_size=rows))
            return batch.to_pandas().head(rows)
        from dataclasses import replace

        from lightning_batch.tabular.sources import load_frame

        small = replace(cfg, rows=min(int(cfg.rows), 256)) if hasattr(cfg, "rows") else cfg
        return load_frame(small).frame.head(rows)
    return None


def _signature_type(kind: str) -> Any:
    """The MLflow type a raw input column is declared with in the signature.

    An integer column is declared ``any``, not ``long``: pandas holds an integer column with an
    empty cell as float64, and MLflow's check refuses float64 for ``long`` ("Can not safely
    convert"), in ``load_model(...).predict`` and in ``mlflow models serve`` alike (a JSON null).
    The model imputes empty cells, as training did, so it takes such rows; it refuses a cell that
    is not a number itself (:meth:`TabularPyfuncModel.predict`). The column's own type stays in
    ``model_spec.json``. ``double`` takes int64 input after the server's parse, but not in
    ``load_model(...).predict`` of a frame read from a file of integers, so it is no alternative.
    """
    if kind == "long":  # raw_column_specs has widened `integer` to `long` already
        from mlflow.types.schema import AnyType

        return AnyType()
    return kind


def build_signature(spec: ModelSpec) -> Any:
    """MLflow's signature: the raw input columns in, the prediction (and probabilities) out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs = Schema(
        [
            ColSpec(type=_signature_type(c["type"]), name=c["name"], required=c["required"])
            for c in spec.inputs
        ]
    )
    if spec.task == "regression":
        outputs: list[ColSpec | TensorSpec] = [ColSpec("double", PREDICTION)]
    else:
        first = spec.labels[0] if spec.labels else ""
        label_type = {bool: "boolean", int: "long", float: "double"}.get(type(first), "string")
        outputs = [
            ColSpec(label_type, PREDICTION),
            *(ColSpec("double", n) for n in spec.probability_columns()),
        ]
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


@functools.lru_cache(maxsize=1)
def pip_requirements() -> tuple[str, ...]:
    """What loading the model imports, pinned to the versions that trained it.

    Given explicitly: MLflow would otherwise load the model in a subprocess to infer them (seconds
    per run). ``lightning-batch`` itself is listed first; with ``--env-manager local`` nothing is
    installed and the current environment must hold it.
    """
    from importlib.metadata import PackageNotFoundError, version

    pins = ["lightning-batch"]
    for name in ("mlflow", "torch", "pandas", "numpy", "lightning"):
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{name}=={version(name).split('+')[0]}")
    return tuple(pins)


def log_model(
    tracking_uri: str,
    run_id: str,
    spec: ModelSpec,
    weights: Mapping[str, torch.Tensor],
    input_example: pd.DataFrame | None,
) -> Any:
    """Log ``spec`` and ``weights`` as the pyfunc model ``model`` of run ``run_id``; MLflow's ModelInfo.

    The steps of MLflow's ``Model.log`` (what ``mlflow.pyfunc.log_model`` calls), through the public
    client of the run's own store: create the LoggedModel (with the run's params), link it to the run
    as an output, ``mlflow.pyfunc.save_model`` into a temporary folder, upload it and finalize it
    READY. Two of ``Model.log``'s steps are left out because they can cost more than the fit of a
    small run: loading the saved model back to check the input example (seconds the first time in a
    process: it scans every installed package's metadata) -- the example is checked here
    by predicting it directly instead -- and reading back the whole history of every metric to link
    its step-0 values to the model (seconds for a long run; the run keeps its metrics, the registry
    versions carry the val loss as a tag). No process-wide tracking URI is set and no fluent run is
    started or ended.
    """
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    signature = build_signature(spec)
    example = cast_to_inputs(input_example, spec.inputs) if input_example is not None else None
    if example is not None:
        # What MLflow's serving check would do, minus the reload: the example goes through the
        # network and comes out with the signature's columns.
        network = _network(spec, weights)
        out = predict_frame(network, spec, example)
        assert list(out.columns) == signature.outputs.input_names(), (list(out.columns), signature)
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=MODEL_NAME,
        source_run_id=run_id,
        params={key: str(value) for key, value in run.data.params.items()},
        tags={"task": spec.task, "model": str(spec.architecture.get("name"))},
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / SPEC_FILE).write_text(spec.to_json())
            torch.save(dict(weights), folder / WEIGHTS_FILE)
            meta = Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
            )
            (folder / ENTRY_FILE).write_text(ENTRY_CODE)
            with quiet_mlflow():
                mlflow.pyfunc.save_model(
                    path=folder / "model",
                    python_model=str(folder / ENTRY_FILE),  # models from code: nothing is pickled
                    artifacts={"spec": str(folder / SPEC_FILE), "weights": str(folder / WEIGHTS_FILE)},
                    signature=signature,
                    input_example=example,
                    pip_requirements=list(pip_requirements()),
                    mlflow_model=meta,
                )
            client.log_model_artifacts(logged.model_id, str(folder / "model"))
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return meta.get_model_info(client.get_logged_model(logged.model_id))


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """No progress bars for copying two local files, and no hint about ``predict``'s type hints
    (left out on purpose, see :class:`TabularPyfuncModel`): a run's output stays its own."""
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def _network(spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    from lightning_batch.tabular.networks import build_model

    network = build_model(**spec.architecture)
    network.load_state_dict(dict(weights))
    return network.eval()


def log_run_model(
    tracking_uri: str,
    run_id: str,
    cfg: Any,
    data: Any,
    n_features: int,
    n_outputs: int,
    weights: Mapping[str, torch.Tensor],
) -> Any:
    """Build the spec of a finished tabular run and log its model (see :func:`log_model`).

    ``data`` is the run's :class:`~lightning_batch.tabular.tables.PreparedData`; ``weights`` the network's
    (:func:`network_weights` of the best checkpoint's state dict).
    """
    raw = raw_column_specs(
        data.raw_frame, (data.dataset_input or {}).get("schema") if data.raw_frame is None else None
    )
    example = example_rows(data, cfg)
    if not raw and example is not None:  # no schema kept anywhere: type the example's columns
        raw = raw_column_specs(example, None)
    preprocessor = data.preprocessor.to_dict()
    target_type = next((c["type"] for c in raw if c["name"] == data.target_column), None)
    spec = ModelSpec(
        task=data.task,
        architecture={
            "name": cfg.model or "linear",
            "n_features": int(n_features),
            "n_outputs": int(n_outputs),
            "hidden": list(cfg.hidden),
            "activation": cfg.activation,
            "dropout": float(cfg.dropout),
            "init": cfg.init,
            "channels": list(cfg.channels),
        },
        preprocessor=preprocessor,
        classes=list(data.classes),
        labels=typed_labels(list(data.classes), target_type) if data.task == "classification" else [],
        inputs=input_specs(raw, data.target_column, preprocessor),
        target=data.target_column,
    )
    if example is not None:
        example = example.drop(columns=[data.target_column], errors="ignore")
    return log_model(tracking_uri, run_id, spec, weights, example)


def run_model_id(client: Any, run: Any) -> str | None:
    """The id of the READY model named :data:`MODEL_NAME` that ``run`` logged, or None."""
    from mlflow.entities import LoggedModelStatus

    outputs = run.outputs.model_outputs if run.outputs is not None else []
    for output in outputs:
        with contextlib.suppress(Exception):  # a model deleted since: as if there were none
            model = client.get_logged_model(output.model_id)
            if model.name == MODEL_NAME and model.status == LoggedModelStatus.READY:
                return str(model.model_id)
    return None
