"""Steps 1-4 for a Parquet file too large for memory: prepared column by column, written into the data cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lightning_batch._extras import check, extra_imports
from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.tabular import cache as data_cache
from lightning_batch.tabular.cleaning import check_feature_columns, clean_frame
from lightning_batch.tabular.in_memory import SPLITS, cache_facts, prepare_in_memory, write_prepared
from lightning_batch.tabular.preprocessing import Preprocessor
from lightning_batch.tabular.sources import RawTable
from lightning_batch.tabular.splitting import split_indices

with extra_imports("data", "the tabular data path"):
    import pandas as pd


def stream_parquet(cfg: RunConfig, writer: data_cache.CacheWriter, budget: int) -> dict[str, Any]:
    """Steps 1–4 for a Parquet file too large to prepare in memory, written straight into the cache.

    Column by column first: the target is cleaned and the rows split exactly as in memory; each
    feature column is read alone, checked, and its preprocessing fit on the train rows (exact
    medians and levels; mean and scale of one column at a time, equal to the in-memory fit's up to
    float rounding). Then the file is read again in row chunks sized to ``budget``, transformed by
    the merged preprocessing and written in place. It holds one column and the row indices (about
    20 bytes a row), never the table.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    check("pyarrow", "data", "reading Parquet files")
    source, target = str(Path(cfg.data)), cfg.target or ""
    try:
        # Unbuffered by default, pyarrow reads ahead whole row groups of every column while iterating.
        file = pq.ParquetFile(cfg.data, pre_buffer=False, buffer_size=1 << 20)
    except Exception as exc:  # pyarrow raises its own types for damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read {cfg.data!r}: {first}; check the file's format") from None
    # A pandas index stored in the file is the frame's index when read whole, not a column.
    stored_index = (file.schema_arrow.pandas_metadata or {}).get("index_columns", [])
    names = [str(name) for name in file.schema_arrow.names if name not in stored_index]
    if len(set(names)) != len(names) or target not in names or len(names) < 2:
        return write_prepared(
            prepare_in_memory(cfg), writer, cfg.data
        )  # the in-memory reader says what is wrong
    features = [name for name in names if name != target]

    def column(name: str) -> pd.DataFrame:  # rows by position, as iter_batches yields them
        values = pd.read_parquet(cfg.data, columns=[name]).reset_index(drop=True)
        pa.default_memory_pool().release_unused()  # Arrow's read buffers back to the OS
        return values

    head = column(features[0])
    head[target] = column(target)[target]
    clean = clean_frame(RawTable(head, target, source), cfg.task, cfg.max_categories)
    kept = clean.features.index.to_numpy()  # file rows with a usable target, ascending
    clean.features, head = clean.features.iloc[:0], None
    labels = clean.target if clean.task == "classification" else None
    train_idx, val_idx, test_idx = split_indices(
        len(clean.target), labels, cfg.val_fraction, cfg.test_fraction, cfg.seed
    )
    if cfg.train_on_val:
        train_idx = np.concatenate([train_idx, val_idx])
    # The targets are written now; each split keeps its file rows in ascending order (4 bytes a row
    # where they fit) and, when that is not its order (train+val: two ascending runs), where each
    # row goes in its table. About 10 bytes a row stay in memory while the columns are fit.
    position = np.int32 if len(kept) == 0 or kept[-1] < 2**31 else np.int64
    rows: dict[str, np.ndarray] = {}
    where: dict[str, np.ndarray | None] = {}
    for split, idx in zip(SPLITS, (train_idx, val_idx, test_idx), strict=True):
        y = clean.target[idx]
        writer.save(f"{split}_y", y[:, None] if clean.task == "regression" else y)
        file_rows = kept[idx].astype(position)
        ordered = bool(np.all(file_rows[1:] > file_rows[:-1]))
        where[split] = None if ordered else np.argsort(file_rows, kind="stable").astype(position)
        rows[split] = file_rows if ordered else file_rows[where[split]]
    task, classes, dropped_rows = clean.task, clean.classes, clean.dropped_rows
    del clean, labels, kept, train_idx, val_idx, test_idx, file_rows, y

    fits: list[Preprocessor] = []
    dropped: list[str] = []
    empty: UserError | None = None
    for name in features:
        values = column(name)
        check_feature_columns(values, source, cfg.max_categories)
        try:  # the train rows in file order: the same median and levels, mean and scale up to rounding
            fits.append(Preprocessor.fit(values.iloc[rows["train"]]))
        except UserError as exc:  # the column is empty in the train rows: dropped, as in memory
            dropped.append(name)
            empty = exc
        del values
    if not fits:
        assert empty is not None
        raise empty
    pre = merge_column_fits(fits, dropped)

    width = len(pre.output_columns)
    # A chunk's frame, encoding and scaled copies (~6 float64 copies of its columns): a quarter of the
    # budget, and at least 2^16 rows (smaller chunks cost more in pandas' per-call overhead than they save).
    chunk = int(min(1 << 20, max(1 << 16, budget // (4 * 6 * 8 * (len(features) + width)))))
    tables = {split: writer.create(f"{split}_x", np.float32, (len(rows[split]), width)) for split in SPLITS}
    start = 0
    for batch in file.iter_batches(batch_size=chunk, columns=features):
        scaled, stop = pre.transform(batch.to_pandas()), start + batch.num_rows
        for split in SPLITS:
            lo, hi = np.searchsorted(rows[split], [start, stop])
            if hi > lo:
                order = where[split]
                into = slice(lo, hi) if order is None else order[lo:hi]
                tables[split][into] = scaled[rows[split][lo:hi] - start]
        start = stop
    for table in tables.values():
        table.flush()
    return cache_facts(task, classes, pre, dropped_rows, source, {}, target)


def merge_column_fits(fits: list[Preprocessor], dropped: list[str]) -> Preprocessor:
    """One preprocessing from one-column fits, in the whole-table fit's order (numbers, then one-hot)."""
    numeric = [fit for fit in fits if fit.numeric_columns]
    categorical = [fit for fit in fits if not fit.numeric_columns]
    ordered = numeric + categorical
    return Preprocessor(
        numeric_columns=[name for fit in numeric for name in fit.numeric_columns],
        medians={name: value for fit in numeric for name, value in fit.medians.items()},
        categorical_levels={name: lv for fit in categorical for name, lv in fit.categorical_levels.items()},
        dropped_columns=dropped,
        output_columns=[name for fit in ordered for name in fit.output_columns],
        mean=[value for fit in ordered for value in fit.mean],
        scale=[value for fit in ordered for value in fit.scale],
    )
