"""Steps 1-4 of the tabular pipeline in memory, and the data cache's format of their result.

:func:`prepare_in_memory` reads the whole source, then cleans, splits and scales it;
:func:`write_prepared` and :func:`from_cache` turn a :class:`~lightning_batch.tabular.tables.PreparedData`
into the data cache's arrays and facts, and back (memory-mapped, nothing copied into memory).

Examples:
    >>> from lightning_batch.config import RunConfig
    >>> data = prepare_in_memory(RunConfig(data="iris").validate())
    >>> data.task, data.n_features, len(data.train) + len(data.val) + len(data.test)
    ('classification', 4, 150)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lightning_batch._extras import extra_imports
from lightning_batch.config import RunConfig
from lightning_batch.tabular import cache as data_cache
from lightning_batch.tabular.cleaning import clean_frame
from lightning_batch.tabular.preprocessing import Preprocessor
from lightning_batch.tabular.sources import load_frame
from lightning_batch.tabular.splitting import split_indices
from lightning_batch.tabular.tables import PreparedData, TensorTableDataset

with extra_imports("data", "the tabular data path"):
    import pandas as pd


#: ``(frame, source, name) -> dict``: what the data cache keeps about the source it read, so that a run
#: reading the cache can still record its dataset input (the tracking path passes its own).
SourceDescriber = Callable[[Any, str, str], "dict[str, Any] | None"]


def prepare_in_memory(cfg: RunConfig) -> PreparedData:
    """Steps 1–4 in memory: the whole source is read, then cleaned, split and scaled."""
    raw = load_frame(cfg)
    clean = clean_frame(raw, cfg.task, cfg.max_categories)
    labels = clean.target if clean.task == "classification" else None
    train_idx, val_idx, test_idx = split_indices(
        len(clean.target), labels, cfg.val_fraction, cfg.test_fraction, cfg.seed
    )
    features = clean.features.reset_index(drop=True)
    if cfg.train_on_val:  # a tuned configuration's final fit: every row but the test split
        train_idx = np.concatenate([train_idx, val_idx])
    pre = Preprocessor.fit(features, rows=train_idx)  # no copy of the train rows

    def _dataset(idx: np.ndarray) -> TensorTableDataset:
        x = torch.from_numpy(pre.transform(features, rows=idx))  # written once, as float32
        y = torch.from_numpy(clean.target[idx])
        if clean.task == "regression":
            y = y.unsqueeze(1)
        return TensorTableDataset(x, y)

    return PreparedData(
        train=_dataset(train_idx),
        val=_dataset(val_idx),
        test=_dataset(test_idx),
        task=clean.task,
        classes=clean.classes,
        preprocessor=pre,
        dropped_rows=clean.dropped_rows,
        source=clean.source,
        truth=clean.truth,
        raw_frame=raw.frame,
        target_column=raw.target,
    )


SPLITS = ("train", "val", "test")


def cache_facts(
    task: str,
    classes: list[str],
    preprocessor: Preprocessor,
    dropped_rows: int,
    source: str,
    truth: dict[str, Any],
    target_column: str,
) -> dict[str, Any]:
    """What meta.json keeps besides the arrays: the rest of a :class:`PreparedData`."""
    return {
        "task": task,
        "classes": classes,
        "preprocessor": preprocessor.to_dict(),
        "dropped_rows": dropped_rows,
        "source": source,
        "truth": truth,
        "target_column": target_column,
    }


def write_prepared(
    data: PreparedData,
    writer: data_cache.CacheWriter,
    name: str,
    describe_source: SourceDescriber | None = None,
) -> dict[str, Any]:
    """The in-memory preparation's tables into the cache, byte for byte."""
    for split in SPLITS:
        table = getattr(data, split)
        writer.save(f"{split}_x", table.features.numpy())
        writer.save(f"{split}_y", table.targets.numpy())
    facts = (data.dropped_rows, data.source, data.truth, data.target_column)
    return {
        **cache_facts(data.task, data.classes, data.preprocessor, *facts),
        "dataset_input": _describe(describe_source, data.raw_frame, data.source, name),
    }


def from_cache(tables: data_cache.CachedTables) -> PreparedData:
    """Datasets over the memory-mapped arrays (nothing is copied into memory)."""
    arrays, meta = tables.arrays, tables.meta

    def _dataset(split: str) -> TensorTableDataset:
        dataset = TensorTableDataset(
            torch.from_numpy(arrays[f"{split}_x"]), torch.from_numpy(arrays[f"{split}_y"])
        )
        dataset.host_tables = (dataset.features, dataset.targets)
        return dataset

    return PreparedData(
        train=_dataset("train"),
        val=_dataset("val"),
        test=_dataset("test"),
        task=meta["task"],
        classes=meta["classes"],
        preprocessor=Preprocessor.from_dict(meta["preprocessor"]),
        dropped_rows=meta["dropped_rows"],
        source=meta["source"],
        truth=meta["truth"],
        raw_frame=None,
        target_column=meta["target_column"],
        dataset_input=meta.get("dataset_input"),
    )


def _describe(
    describe: SourceDescriber | None, frame: pd.DataFrame | None, source: str, name: str
) -> dict[str, Any] | None:
    """What ``describe`` says of the source as read (None without a frame or a describer, or when it fails:
    a dataset profile is nice to have, never worth a failed cache)."""
    if describe is None or frame is None:
        return None
    try:
        return describe(frame, source, name)
    except Exception:  # noqa: BLE001
        return None
