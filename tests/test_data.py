"""Data: sources, cleaning, split, train-only preprocessing, batches by index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_batch.config import RunConfig, UserError
from lightning_batch.data import TabularDataModule, TensorTableDataset, prepare_data, split_indices


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
