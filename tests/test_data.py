"""Data: sources, cleaning, split, train-only preprocessing, batches by index."""

from __future__ import annotations

import csv
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.tabular.prepare import prepare_data
from lightning_batch.tabular.preprocessing import Preprocessor
from lightning_batch.tabular.sources import _read_csv_columnar
from lightning_batch.tabular.splitting import split_indices
from lightning_batch.tabular.tables import TensorTableDataset


def _cfg(**options) -> RunConfig:
    return RunConfig(**options).validate()


@pytest.mark.parametrize(
    "name, task, n_features, n_outputs",
    [
        ("diabetes", "regression", 10, 1),
        ("digits", "classification", 64, 10),
        ("breast_cancer", "classification", 30, 2),
        ("wine", "classification", 13, 3),
        ("iris", "classification", 4, 3),
    ],
)
def test_bundled_datasets(name, task, n_features, n_outputs):
    data = prepare_data(_cfg(data=name))
    assert (data.task, data.n_features, data.n_outputs) == (task, n_features, n_outputs)
    total = len(data.train) + len(data.val) + len(data.test)
    assert total == len(data.raw_frame)


def test_synthetic_generators_follow_their_parameters():
    data = prepare_data(_cfg(data="synthetic-regression", rows=5000, features=3, noise=0.0, seed=4))
    truth = data.truth
    # with no noise, y is exactly linear in the *raw* features: check against the generating weights
    raw = data.raw_frame
    predicted = raw[["x0", "x1", "x2"]].to_numpy() @ np.array(truth["weights"]) + truth["bias"]
    np.testing.assert_allclose(predicted, raw["target"], atol=1e-9)
    classes = prepare_data(_cfg(data="synthetic-classification", rows=600, features=6, classes=4))
    assert classes.n_outputs == 4 and set(classes.train.targets.tolist()) == {0, 1, 2, 3}


def test_split_is_seeded_stratified_and_disjoint():
    a = prepare_data(_cfg(data="wine", seed=3))
    b = prepare_data(_cfg(data="wine", seed=3))
    c = prepare_data(_cfg(data="wine", seed=4))
    assert torch.equal(a.train.features, b.train.features)
    assert not torch.equal(a.train.features, c.train.features)
    overall = np.bincount(a.train.targets.numpy()) / len(a.train)
    test_share = np.bincount(a.test.targets.numpy(), minlength=3) / len(a.test)
    assert np.abs(overall - test_share).max() < 0.08  # stratified: class shares kept in the test split


def test_scaler_and_imputer_are_fit_on_train_only(tmp_path: Path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(5, 2, 400), "b": rng.normal(-3, 0.5, 400)})
    frame["y"] = frame["a"] * 2 + rng.normal(0, 0.1, 400)
    frame.loc[::7, "b"] = np.nan
    frame.loc[3, "a"] = np.inf
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    data = prepare_data(_cfg(data=str(path), target="y"))
    x = data.train.features
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    assert not torch.allclose(data.val.features.mean(0), torch.zeros(2), atol=1e-5)  # val was not used to fit
    assert torch.isfinite(data.val.features).all() and torch.isfinite(x).all()
    # the medians come from the training rows (finite values only), not from all rows
    train_idx, _, _ = split_indices(len(frame), None, 0.15, 0.15, seed=0)
    train_rows = frame.iloc[train_idx].replace(np.inf, np.nan)
    assert data.preprocessor.medians["b"] == pytest.approx(train_rows["b"].median())
    assert data.preprocessor.medians["a"] == pytest.approx(train_rows["a"].median())
    assert data.preprocessor.medians["b"] != frame["b"].median()


def test_missing_targets_dropped_and_counted_and_text_features_one_hot(tmp_path: Path):
    frame = pd.DataFrame(
        {
            "colour": ["red", "green", "blue", None] * 25,
            "size": np.arange(100.0),
            "y": [1.0, 2.0, None, 4.0] * 25,
        }
    )
    path = tmp_path / "c.parquet"
    frame.to_parquet(path)
    data = prepare_data(_cfg(data=str(path), target="y", task="regression"))
    assert data.dropped_rows == 25
    assert data.preprocessor.output_columns[0] == "size"
    assert {c for c in data.preprocessor.output_columns if c.startswith("colour=")} <= {
        "colour=red",
        "colour=green",
        "colour=blue",
    }
    assert len(data.train) + len(data.val) + len(data.test) == 75


def test_too_many_text_levels_is_a_clear_error(tmp_path: Path):
    frame = pd.DataFrame({"id": [f"user{i}" for i in range(100)], "y": np.arange(100.0)})
    path = tmp_path / "ids.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(UserError, match="100 levels"):
        prepare_data(_cfg(data=str(path), target="y"))


def test_classification_labels_from_text_are_encoded(tmp_path: Path):
    frame = pd.DataFrame({"a": np.arange(60.0), "label": ["cat", "dog", "eel"] * 20})
    path = tmp_path / "l.csv"
    frame.to_csv(path, index=False)
    data = prepare_data(_cfg(data=str(path), target="label"))
    assert data.task == "classification" and data.classes == ["cat", "dog", "eel"]


def test_batches_are_one_index_op_and_resizable():
    dm = TabularDataModule(data="iris", batch_size=10, seed=0)
    calls = []

    class Spy(TensorTableDataset):
        def __getitem__(self, index):  # would be called per row by a per-sample collate
            calls.append(index)
            return super().__getitem__(index)

    dm.setup()
    dm.prepared.train = Spy(dm.train_set.features, dm.train_set.targets)
    loader: DataLoader = dm.train_dataloader()
    iterator = iter(loader)
    x, y = next(iterator)
    assert x.shape == (10, 4) and calls == []
    dm.batch_size = 25
    x, _ = next(iterator)
    assert x.shape == (25, 4)
    assert dm.batch_size == 25


def test_full_batch_mode_is_every_training_row():
    dm = TabularDataModule(data="wine", batch_size="full")
    dm.setup()
    assert dm.batch_size == len(dm.train_set)
    batches = list(dm.train_dataloader())
    assert len(batches) == 1 and len(batches[0][0]) == len(dm.train_set)


# -- columnar reading and preparation -------------------------------------------------------------

_CSV_CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64).map(repr),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(
        ["", "NA", "nan", "NaN", "inf", "-Infinity", "1e999", "abc", "red", "x y", "1,5", "  ", " 1", "2 "]
        + ["TRUE", "false", "None", "null", "#N/A", "2020-01-01", "1.", ".5", "+3", "007", "a\nb", '"q"']
    ),
    st.text(max_size=4),
)


@st.composite
def _csv_texts(draw) -> str:
    n_cols = draw(st.integers(1, 4))
    headers = [
        draw(st.one_of(st.sampled_from(["x", "y", "", " ", "列", "a b"]), st.text(max_size=4)))
        for _ in range(n_cols)
    ]
    kinds = [draw(st.sampled_from(["float", "int", "text", "any"])) for _ in range(n_cols)]
    cell = {
        "float": st.one_of(st.floats(width=64).map(repr), st.sampled_from(["", "NA", "inf"])),
        "int": st.integers(-(10**9), 10**9).map(str),
        "text": st.one_of(st.sampled_from(["red", "green", "", "NA", "x y", "ünï", "a\nb"]), _CSV_CELLS),
        "any": _CSV_CELLS,
    }
    rows = [[draw(cell[kind]) for kind in kinds] for _ in range(draw(st.integers(0, 25)))]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(headers)
    writer.writerows(rows)
    return buffer.getvalue()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_csv_texts())
@example(text="a,b\n1.5,red\n2.5,green\n")
def test_pyarrow_reads_a_csv_as_pandas_c_parser_does_or_leaves_it_to_it(text, tmp_path):
    """Differential: whenever the columnar reader answers, its frame is the C parser's, dtypes and all."""
    path = tmp_path / "data.csv"
    path.write_bytes(text.encode("utf-8"))
    columnar = _read_csv_columnar(path)
    if columnar is None:
        return
    pd.testing.assert_frame_equal(columnar, pd.read_csv(path), check_exact=True)


def test_a_plain_csv_takes_the_columnar_path(tmp_path: Path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=500), "n": rng.integers(0, 9, 500), "y": rng.normal(size=500)})
    frame["colour"] = rng.choice(["red", "green", "dark blue"], 500)
    frame.loc[::9, "a"] = np.nan
    frame.loc[::11, "colour"] = None
    path = tmp_path / "plain.csv"
    frame.to_csv(path, index=False)
    columnar = _read_csv_columnar(path)
    assert columnar is not None
    pd.testing.assert_frame_equal(columnar, pd.read_csv(path), check_exact=True)


def _mixed_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "f32": rng.normal(5, 2, rows).astype(np.float32),
            "f64": rng.normal(-3, 0.5, rows),
            "int": rng.integers(0, 100, rows),
            "nullable": pd.array(
                np.where(rng.random(rows) < 0.2, None, rng.integers(0, 9, rows)), dtype="Int64"
            ),
            "text": pd.Series(rng.choice(["red", "green", "blue", None], rows)).astype("str"),
            "mixed": pd.Series(rng.choice([1, "1", "x", None, 2.5, True], rows), dtype=object),
            "flag": rng.random(rows) < 0.3,
            "constant": 3.0,
            "empty": np.nan,
        }
    )
    frame.loc[::7, "f64"] = np.nan
    frame.loc[3, "f64"] = np.inf
    frame.loc[4, "f32"] = -np.inf
    return frame


def test_transform_matches_a_float64_pass_over_the_whole_table():
    """By rows or on a copy, block by block: the numbers of the plain float64 computation, to the bit."""
    frame = _mixed_frame(3000)
    rows = np.sort(np.random.default_rng(1).choice(len(frame), 2000, replace=False))
    pre = Preprocessor.fit(frame, rows=rows)
    assert pre.to_dict() == Preprocessor.fit(frame.iloc[rows]).to_dict()
    assert pre.dropped_columns == ["empty"]
    assert "mixed=True" in pre.output_columns and "mixed=1" in pre.output_columns  # 1 and True: two texts
    parts = []  # the reference: every output column in float64, then scaled, clipped and cast once
    for name in pre.numeric_columns:
        values = pd.to_numeric(frame[name]).astype(float)
        parts.append(values.where(np.isfinite(values)).fillna(pre.medians[name]).to_numpy())
    for name, levels in pre.categorical_levels.items():
        text = frame[name].astype(str).where(frame[name].notna(), None)
        parts += [(text == level).to_numpy(dtype=np.float64) for level in levels]
    scaled = (np.stack(parts, axis=1) - np.asarray(pre.mean)) / np.asarray(pre.scale)
    expected = np.clip(scaled, -1e6, 1e6).astype(np.float32)
    np.testing.assert_array_equal(pre.transform(frame), expected)
    np.testing.assert_array_equal(pre.transform(frame, rows=rows), expected[rows])
    np.testing.assert_array_equal(pre.transform(frame.iloc[rows]), expected[rows])
    train = expected[rows]
    np.testing.assert_allclose(train.mean(0)[train.std(0) > 0], 0, atol=1e-5)


def test_preparing_makes_no_float64_copy_of_the_table():
    """Fit and transform hold a few float64 columns at most, never the table (tracemalloc sees NumPy)."""
    rows, cols = 200_000, 16
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        rng.standard_normal((rows, cols), dtype=np.float32), columns=[f"x{i}" for i in range(cols)]
    )
    train = np.arange(0, rows, 2)
    tracemalloc.start()
    try:
        pre = Preprocessor.fit(frame, rows=train)
        x = pre.transform(frame, rows=train)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float64_table = len(train) * cols * 8
    assert x.dtype == np.float32 and x.shape == (len(train), cols)
    assert peak < x.nbytes + float64_table / 2, (peak, x.nbytes, float64_table)
