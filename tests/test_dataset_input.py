"""The dataset input a run records: what MLflow's ``from_pandas`` records, without a pass per cell.

Timing (not a test): ``python -m tests.test_dataset_input [rows]`` times the old and the new way of
building the input for a ``rows`` x 33 frame (default 10^6) in one process.
"""

from __future__ import annotations

import decimal
import json
import sys
import time
import warnings
from pathlib import Path

import mlflow.data
import mlflow.data.digest_utils
import mlflow.data.pandas_dataset
import mlflow.types.utils
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.entities import DatasetInput, InputTag

from lightning_batch.tracking import store as tracking
from lightning_batch.tracking.datasets import dataset_entity, frame_digest, log_dataset_input

ROWS = 100_000


def _arrow(values, arrow_type) -> pd.Series:
    return pd.Series(pd.arrays.ArrowExtensionArray(pa.chunked_array([pa.array(values, type=arrow_type)])))


def _frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """The dtypes a tabular user has: numpy, pandas nullable and Arrow-backed, with missing values."""
    rng = np.random.default_rng(seed)
    gaps = rng.random(rows) < 0.05
    floats = rng.standard_normal(rows)
    ints = rng.integers(-1000, 1000, rows)
    words = rng.choice(np.array(["red", "green", "blue"], dtype=object), rows)
    words[gaps] = None
    days = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 10**6, rows), unit="s")
    return pd.DataFrame(
        {
            "f64_nan": np.where(gaps, np.nan, floats),
            "f32": floats.astype(np.float32),
            "i64": ints,
            "i32": ints.astype(np.int32),
            "u8": (ints % 200).astype(np.uint8),
            "flag": ints > 0,
            "text": pd.Series(words, dtype=object),
            "str": pd.Series(words, dtype="str"),
            "cat": pd.Series(words).astype("category"),
            "cat_int": pd.Series(ints % 7).astype("category"),
            "when": pd.Series(days).where(~gaps),
            "when_utc": pd.Series(days).dt.tz_localize("UTC"),
            "Int64": pd.Series(ints, dtype="Int64").mask(gaps),
            "Float32": pd.Series(floats, dtype="Float32"),
            "boolean": pd.Series(ints > 0, dtype="boolean").mask(gaps),
            "str_pa": pd.Series(words, dtype="string[pyarrow]"),
            "a_f64": pd.Series(floats, dtype="double[pyarrow]").mask(gaps),
            "a_f32_nan": _arrow(
                np.where(gaps, np.nan, floats).astype(np.float32), pa.float32()
            ),  # NaN, not null
            "a_i64": pd.Series(ints, dtype="int64[pyarrow]"),
            "a_bool": pd.Series(ints > 0, dtype="bool[pyarrow]"),
            "a_str": _arrow(words, pa.large_string()),
            "a_ts": _arrow(days.to_numpy(), pa.timestamp("us")),
            "a_dict": _arrow(words, pa.string()).astype(
                pd.ArrowDtype(pa.dictionary(pa.int32(), pa.string()))
            ),
            "y": floats * 2 + 1,
        }
    )


def _from_pandas(frame: pd.DataFrame, source, name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlflow.data.from_pandas(frame, source=source, targets="y", name=name)._to_mlflow_entity()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowClient, str]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    tracking.ensure_store(uri)
    return MlflowClient(uri), tracking.get_or_create_experiment(uri, "dataset-input")


def _recorded(store: tuple[MlflowClient, str], log) -> tuple:
    """(dataset, tags) of the one input a new run records with ``log(client, run_id)``, read back."""
    client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    log(client, run_id)
    (recorded,) = client.get_run(run_id).inputs.dataset_inputs
    return recorded.dataset, {tag.key: tag.value for tag in recorded.tags}


def _log_mlflow(entity):
    tags = [InputTag(key="mlflow.data.context", value="training")]
    return lambda client, run_id: client.log_inputs(
        run_id, datasets=[DatasetInput(dataset=entity, tags=tags)]
    )


def test_recorded_input_equals_what_from_pandas_records(store):
    """10^5 rows of 24 dtypes, read back from a sqlite store: name, schema, row count, source, tag."""
    frame = _frame(ROWS)
    ours, our_tags = _recorded(
        store, lambda client, run_id: log_dataset_input(client, run_id, frame, "generated", "y", "synth")
    )
    theirs, their_tags = _recorded(
        store, _log_mlflow(_from_pandas(frame, CodeDatasetSource({"origin": "generated"}), "synth"))
    )
    assert ours.name == theirs.name == "synth"
    assert theirs.schema is not None, "MLflow types every one of these columns"
    assert json.loads(ours.schema) == json.loads(theirs.schema)
    assert ours.schema == theirs.schema, "the same JSON text, key order included"
    assert (
        json.loads(ours.profile)
        == json.loads(theirs.profile)
        == {"num_rows": ROWS, "num_elements": ROWS * 24}
    )
    assert (
        (ours.source_type, ours.source)
        == (theirs.source_type, theirs.source)
        == (
            "code",
            json.dumps({"tags": {"origin": "generated"}}),
        )
    )
    assert our_tags == their_tags == {"mlflow.data.context": "training"}
    assert len(ours.digest) == 8 and ours.digest == frame_digest(frame)


def test_a_file_is_its_own_source(store, tmp_path: Path):
    path = tmp_path / "table.csv"
    frame = _frame(50)
    frame[["f32", "i64", "y"]].to_csv(path, index=False)
    ours, _ = _recorded(
        store, lambda client, run_id: log_dataset_input(client, run_id, frame, str(path), "y", "t")
    )
    theirs, _ = _recorded(store, _log_mlflow(_from_pandas(frame, str(path.resolve()), "t")))
    assert (ours.source_type, ours.source) == (theirs.source_type, theirs.source)
    assert str(path.resolve()) in ours.source


_PARITY = {
    "uint32": pd.Series([1, 2, 3], dtype="uint32"),
    "float16": pd.Series([1, 2, 3], dtype="float16"),
    "all_missing_text": pd.Series([None, None, None], dtype=object),
    "object_ints": pd.Series([1, 2, 3], dtype=object),
    "object_ints_none": pd.Series([1, None, 3], dtype=object),
    "object_bools_none": pd.Series([True, None, False], dtype=object),
    "object_float32": pd.Series([np.float32(1.5)] * 3, dtype=object),
    "object_bytes": pd.Series([b"a", b"b", None], dtype=object),
    "object_dates": pd.Series([pd.Timestamp("2020").date()] * 3, dtype=object),
    "string_python": pd.Series(["a", None, "c"], dtype="string[python]"),
    "str_all_missing": pd.Series([None, None, None], dtype="str"),
    "cat_float": pd.Series([1.5, None, 2.0], dtype="category"),
    "cat_bool": pd.Series([True, False, True], dtype="category"),
    "datetime_s_nat": pd.Series(np.array(["2020-01-01", "NaT", "2021-01-01"], dtype="datetime64[s]")),
    "UInt16_na": pd.Series([1, None, 3], dtype="UInt16"),
    "a_i8_null": _arrow([1, None, 3], pa.int8()),
    "a_u32": _arrow([1, 2, 3], pa.uint32()),
    "a_f16": _arrow(np.array([1, 2, 3], dtype=np.float16), pa.float16()),
    "a_binary": _arrow([b"a", None, b"c"], pa.large_binary()),
    "a_date": _arrow([pd.Timestamp("2020").date()] * 3, pa.date32()),
    "a_ts_utc": _arrow(pd.date_range("2020", periods=3, tz="UTC"), pa.timestamp("us", tz="UTC")),
    "a_dict_int": _arrow([1, 2, 1], pa.int64()).astype(pd.ArrowDtype(pa.dictionary(pa.int8(), pa.int64()))),
    "a_list": _arrow([[1], [2, 3], None], pa.list_(pa.int64())),
    "a_null": _arrow([None, None, None], pa.null()),
}


@pytest.mark.parametrize("name", sorted(_PARITY))
def test_each_dtype_is_typed_as_mlflow_types_it(name):
    frame = pd.DataFrame({name: _PARITY[name], "y": [0.0, 1.0, 2.0]})
    source = CodeDatasetSource({"origin": "x"})
    assert dataset_entity(frame, source, "d").schema == _from_pandas(frame, source, "d").schema


@pytest.mark.parametrize(
    "column, expected",
    [
        (pd.Series([1, 2, 3], dtype="uint64"), "any"),
        (pd.Series([1, 2, 3], dtype="uint64[pyarrow]"), "any"),
        (pd.Series(pd.to_timedelta([1, 2, 3], unit="s")), "any"),
        (pd.Series(["a", 1, "c"], dtype=object), "any"),
        (pd.Series(pd.period_range("2020", periods=3)), "any"),
        (pd.Series([decimal.Decimal("1.5")] * 3, dtype=object), "double"),
        (pd.Series(pd.array([1, 2, 3], dtype=pd.ArrowDtype(pa.decimal128(10, 2)))), "double"),
    ],
)
def test_a_column_mlflow_cannot_type_keeps_the_rest_of_the_schema(column, expected):
    """MLflow records no schema at all for these frames; this records the one column as any/double."""
    frame = pd.DataFrame({"odd": column, "y": [0.0, 1.0, 2.0]})
    source = CodeDatasetSource({"origin": "x"})
    assert _from_pandas(frame, source, "d").schema is None
    specs = json.loads(dataset_entity(frame, source, "d").schema)["mlflow_colspec"]
    assert specs == [
        {"type": expected, "name": "odd", "required": True},
        {"type": "double", "name": "y", "required": True},
    ]


def test_digest_is_a_fixed_function_of_the_values():
    """Pinned for numbers (numpy only): the same data gives the same digest in every process."""
    frame = pd.DataFrame(
        {"x": np.arange(70_001) / 7, "n": np.arange(70_001, dtype=np.int32), "b": np.arange(70_001) % 3 == 0}
    )
    assert frame_digest(frame) == "4b1a0e5b"
    mixed = _frame(2000)
    assert frame_digest(mixed) == frame_digest(mixed.copy()) == frame_digest(_frame(2000))
    assert frame_digest(pa.Table.from_pandas(mixed, preserve_index=False)) == frame_digest(mixed)


def test_digest_changes_when_one_value_changes():
    frame = _frame(ROWS)
    base = frame_digest(frame)
    rng = np.random.default_rng(1)
    for name in frame.columns:
        for row in (int(rng.integers(ROWS)), ROWS - 1):  # ROWS - 1: the last, partial 64-bit word
            changed = frame.copy()
            value = changed[name].iloc[row]
            if isinstance(changed[name].dtype, pd.CategoricalDtype):
                changed[name] = changed[name].cat.add_categories(["new"] if name == "cat" else [99])
                replacement = "new" if name == "cat" else 99
            elif pd.isna(value):
                replacement = changed[name].dropna().iloc[0]
            elif isinstance(value, str):
                replacement = value + "!"
            elif isinstance(value, (bool, np.bool_)):
                replacement = not value
            elif isinstance(value, pd.Timestamp):
                replacement = value + pd.Timedelta(seconds=1)
            else:
                replacement = value + 1
            changed.iloc[row, changed.columns.get_loc(name)] = replacement
            assert frame_digest(changed) != base, (name, row)
    assert frame_digest(frame.iloc[::-1]) != base, "row order counts"
    assert frame_digest(frame.rename(columns={"y": "target"})) != base
    assert frame_digest(frame.iloc[:-1]) != base


def test_digest_follows_values_not_storage():
    """The same values as numpy, pandas nullable or Arrow-backed columns: one digest."""
    frame = pd.DataFrame(
        {
            "x": [1.5, np.nan, 3.0],
            "n": [1, 2, 3],
            "m": [1.0, np.nan, 3.0],  # how numpy pandas holds integers with a gap
            "s": ["a", None, "c"],
        },
    )
    arrow = frame.astype({"x": "double[pyarrow]", "n": "int64[pyarrow]", "s": "string[pyarrow]"})
    arrow["m"] = pd.Series([1, None, 3], dtype="int64[pyarrow]")
    nullable = frame.astype({"x": "Float64", "n": "Int64", "s": "string"})
    nullable["m"] = pd.Series([1, None, 3], dtype="Int64")
    assert frame_digest(frame) == frame_digest(arrow) == frame_digest(nullable)
    assert frame_digest(frame) != frame_digest(frame.astype({"x": "float32"}))


_PER_CELL = [
    (mlflow.types.utils, "_infer_schema"),
    (mlflow.types.utils, "_infer_pandas_column"),
    (mlflow.types.utils, "_infer_required"),
    (mlflow.types.utils, "_infer_colspec_type"),
    (mlflow.data.pandas_dataset, "_infer_schema"),
    (mlflow.data.pandas_dataset, "compute_pandas_digest"),
    (mlflow.data.digest_utils, "compute_pandas_digest"),
    (pd.Series, "__iter__"),
    (pd.Series, "tolist"),
    (pd.Series, "to_list"),
    (pd.Series, "map"),
    (pd.Series, "apply"),
    (pd.DataFrame, "map"),
    (pd.DataFrame, "apply"),
    (pd.DataFrame, "iterrows"),
    (pd.DataFrame, "itertuples"),
    *(
        (cls, "__iter__")
        for cls in (
            pd.arrays.ArrowExtensionArray,
            pd.arrays.ArrowStringArray,
            pd.arrays.StringArray,
            pd.arrays.IntegerArray,
            pd.arrays.FloatingArray,
            pd.arrays.BooleanArray,
            pd.arrays.DatetimeArray,
            pd.Categorical,
        )
    ),
]


def test_no_pass_per_cell(store, monkeypatch: pytest.MonkeyPatch):
    """MLflow's per-value inference and digest, and every Python iteration over a column, raise."""
    frame = _frame(1000)

    def per_cell(*args, **kwargs):
        raise AssertionError("a Python pass over the cells")

    for owner, attribute in _PER_CELL:
        monkeypatch.setattr(owner, attribute, per_cell)
    with pytest.raises(AssertionError, match="a Python pass over the cells"):
        _from_pandas(frame, CodeDatasetSource({"origin": "x"}), "d")  # the trap catches MLflow's way
    ours, _ = _recorded(
        store, lambda client, run_id: log_dataset_input(client, run_id, frame, "generated", "y", "synth")
    )
    assert len(json.loads(ours.schema)["mlflow_colspec"]) == frame.shape[1]


def _time_old_and_new(rows: int) -> None:
    """Build the input of a rows x 33 frame (32 float32 features and a float64 target) both ways."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({f"x{i}": rng.standard_normal(rows, dtype=np.float32) for i in range(32)})
    frame["y"] = rng.standard_normal(rows)
    arrow = frame.astype({**{f"x{i}": "float[pyarrow]" for i in range(32)}, "y": "double[pyarrow]"})
    source = CodeDatasetSource({"origin": "generated"})
    dataset_entity(frame.head(10), source, "warm-up")  # imports
    for label, data in (("numpy float32", frame), ("Arrow-backed", arrow)):
        times = []
        for _ in range(3):
            started = time.perf_counter()
            dataset_entity(data, source, "bench")
            times.append(time.perf_counter() - started)
        print(f"new, {label:14}: {min(times) * 1000:9.1f} ms (best of 3)", flush=True)
    started = time.perf_counter()
    _from_pandas(frame, source, "bench")
    print(f"old, from_pandas   : {(time.perf_counter() - started) * 1000:9.1f} ms", flush=True)


if __name__ == "__main__":
    _time_old_and_new(int(float(sys.argv[1])) if len(sys.argv) > 1 else 10**6)
