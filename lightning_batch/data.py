"""Tabular data: read a source, clean it, split it, scale it on train only, serve it by index.

The seed's steps, in order:

1. **read** a CSV/Parquet file, one of scikit-learn's bundled sets, or a generator
   (:func:`load_frame`);
2. **clean**: rows with a missing target are dropped and counted; a non-numeric target is an
   error for regression and label-encoded for classification (:func:`clean_frame`);
3. **split** train/val/test, seeded, stratified for classification (:func:`split_frame`);
4. **fit the preprocessing on train only**: median imputation, one-hot encoding of text columns
   with few levels, standard scaling (:class:`Preprocessor`), then apply it to every split;
5. **serve** in-memory tensors through a :class:`~lightning_batch.sampler.ResizableBatchSampler`:
   one tensor index a batch, no per-row collate (:class:`TabularDataModule`).

Example:
    >>> dm = TabularDataModule(data="iris", batch_size=16, seed=0)
    >>> dm.setup()
    >>> (dm.task, dm.n_features, dm.n_outputs, len(dm.train_set))
    ('classification', 4, 3, 106)
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), y.dtype
    ((16, 4), torch.int64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_batch import data_cache
from lightning_batch._extras import check, extra_imports
from lightning_batch._lightning_compat import uses_distributed_sampler
from lightning_batch.config import SKLEARN_DATASETS, SYNTHETIC_DATASETS, RunConfig, UserError
from lightning_batch.preprocessing import Preprocessor, _is_numeric_column
from lightning_batch.sampler import ResizableBatchSampler

_FEATURE = "the tabular data path"
with extra_imports("data", _FEATURE):
    import pandas as pd
check("sklearn", "data", _FEATURE)  # imported where used (splits, bundled sets): cheap to find now

TARGET = "target"


# ------------------------------------------------------------------------------------------------
# 1. read


@dataclass
class RawTable:
    """A source as read: the frame, the name of its target column, and where it came from."""

    frame: pd.DataFrame
    target: str
    source: str
    #: For generated data, the truth it was generated from (weights, bias), for tests and reports.
    truth: dict[str, Any] = field(default_factory=dict)


def load_frame(cfg: RunConfig) -> RawTable:
    """Read the configured source into a DataFrame (no cleaning yet)."""
    if cfg.data in SYNTHETIC_DATASETS:
        if cfg.data == "synthetic-regression":
            return make_linear_regression(cfg.rows, cfg.features, cfg.noise, cfg.seed, cfg.correlation)
        return make_classification(cfg.rows, cfg.features, cfg.classes, cfg.seed)
    if cfg.data in SKLEARN_DATASETS:
        return load_sklearn(cfg.data)
    return read_table_file(cfg.data, cfg.target or "")


def make_linear_regression(
    rows: int, features: int, noise: float, seed: int, correlation: float = 0.0
) -> RawTable:
    """The seed's model as data: y = w·x + b + noise·ε, with x ~ N(0, C), C_ij = correlation^|i-j|.

    >>> table = make_linear_regression(100, 3, 0.1, seed=0)
    >>> table.frame.shape, sorted(table.truth)
    ((100, 4), ['bias', 'noise', 'weights'])
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features))
    if correlation > 0:
        lags = np.abs(np.subtract.outer(np.arange(features), np.arange(features)))
        x = x @ np.linalg.cholesky(correlation**lags).T
    weights = rng.normal(0.0, 1.0, size=features)
    bias = float(rng.normal(0.0, 1.0))
    y = x @ weights + bias + noise * rng.standard_normal(rows)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(features)])
    frame[TARGET] = y
    truth = {"weights": weights.tolist(), "bias": bias, "noise": noise}
    return RawTable(
        frame, TARGET, f"synthetic-regression(rows={rows},features={features},noise={noise})", truth
    )


def make_classification(rows: int, features: int, classes: int, seed: int) -> RawTable:
    """A multi-class problem from scikit-learn's ``make_classification`` (Gaussian clusters)."""
    from sklearn.datasets import make_classification as sk_make_classification

    informative = max(2, min(features, int(math.ceil(math.log2(classes))) + 2))
    if features < informative:
        raise UserError(
            f"--features {features} is too few for {classes} classes; use --features {informative}"
        )
    x, y = sk_make_classification(
        n_samples=rows,
        n_features=features,
        n_informative=informative,
        n_redundant=0,
        n_classes=classes,
        n_clusters_per_class=1,
        class_sep=1.5,
        random_state=seed,
    )
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(features)])
    frame[TARGET] = y
    return RawTable(
        frame, TARGET, f"synthetic-classification(rows={rows},features={features},classes={classes})"
    )


def load_sklearn(name: str) -> RawTable:
    """One of scikit-learn's bundled datasets (shipped with the package; nothing is downloaded)."""
    import sklearn.datasets as skd

    bunch = getattr(skd, f"load_{name}")(as_frame=True)
    frame = bunch.frame.copy()
    return RawTable(frame, TARGET, f"sklearn:{name}")


def read_table_file(path: str, target: str) -> RawTable:
    """Read a CSV or Parquet file; any failure is one :class:`UserError` line."""
    file = Path(path)
    if file.suffix.lower() != ".csv":
        check("pyarrow", "data", "reading Parquet files")  # before the try: not a 'cannot read' error
    try:
        if file.suffix.lower() == ".csv":
            frame = _read_csv_columnar(file)
            if frame is None:  # pyarrow could not, or might not, give pandas' frame: pandas' C parser
                frame = pd.read_csv(file)
        else:
            frame = _read_parquet(file)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path!r} is empty; give a file with a header row and data rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read {path!r}: {first}; check the file's format") from None
    except Exception as exc:  # pyarrow raises its own types for damaged Parquet files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read {path!r}: {first}; check the file's format") from None
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        raise UserError(f"{path!r} has duplicated column names {dupes}; rename them")
    frame.columns = columns
    if target not in frame.columns:
        shown = ", ".join(map(repr, columns[:10])) + (", ..." if len(columns) > 10 else "")
        raise UserError(f"target column {target!r} not found in {path!r}; columns are: {shown}")
    if frame.shape[1] < 2:
        raise UserError(f"{path!r} has no feature columns besides the target {target!r}")
    return RawTable(frame, target, str(file))


#: A text value pandas' C parser might have read as something else (a number, a boolean, missing) or
#: whose surrounding blanks it treats differently: a column holding one is read by that parser.
_NOT_PLAIN_TEXT = r"^\s|\s$|^$|^[-+]?(\d|\.\d|inf|nan)|^(true|false)$"


def _read_csv_columnar(file: Path) -> pd.DataFrame | None:
    """The CSV as pandas' C parser would read it, parsed by pyarrow instead; None where they might differ.

    pyarrow's streaming reader parses a block at a time into columns (each numeric column straight
    into its final buffer), so the peak is about the frame plus a few blocks where the C parser's is
    ~3x the frame. Everything pandas' parser does on its own is left to it (the caller falls back to
    ``pd.read_csv``, whose errors and edge cases the messages of :func:`read_table_file` were
    written for): any pyarrow error (a ragged row, bad UTF-8, a type that changes after the first
    block, an empty file), a header pandas would rename (empty, blank or repeated names), no data
    rows, or a column pyarrow typed otherwise than int64, float64 or plain text (booleans, dates,
    all-missing columns), integers past int64, and text columns holding a value matched by
    :data:`_NOT_PLAIN_TEXT`. What is left, numbers and plain text with pandas' own missing-value
    markers, reads the same with both (checked by a differential fuzz in tests/test_data.py).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    from pandas._libs.parsers import STR_NA_VALUES  # the C parser's missing-value markers

    try:
        table = pacsv.open_csv(
            file,
            # Quoted line breaks are values, as for pandas (off by default in pyarrow).
            parse_options=pacsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(null_values=sorted(STR_NA_VALUES), strings_can_be_null=True),
        ).read_all()  # the reader goes with its buffers (release_unused below can return them)
    except Exception:  # pyarrow's own error types: the C parser says what is wrong, in its words
        return None
    names = table.column_names
    if table.num_rows == 0 or len(set(names)) != len(names) or any(not n.strip() for n in names):
        return None
    plain = all(
        pa.types.is_int64(kind)
        or pa.types.is_float64(kind)
        or (
            pa.types.is_string(kind)
            and not pc.any(pc.match_substring_regex(column, _NOT_PLAIN_TEXT, ignore_case=True)).as_py()
        )
        for column, kind in zip(table.columns, table.schema.types, strict=True)
    )
    if not plain:
        return None
    frame = table.to_pandas(split_blocks=True, self_destruct=True)  # no copy of numeric columns
    del table
    for name in frame.columns:  # in NumPy: Arrow's kernels here kept ~0.7x the frame allocated
        if frame[name].dtype == np.float64:
            values = frame[name].to_numpy()
            if not -(2.0**63) < np.nanmin(values, initial=0.0) <= np.nanmax(values, initial=0.0) < 2.0**63:
                # Maybe an integer past int64, which pandas reads as uint64 (or ±inf: look closer).
                finite = values[np.isfinite(values)]
                if finite.size and np.abs(finite).max() >= 2.0**63:
                    return None
    pa.default_memory_pool().release_unused()  # the parse buffers, back to the OS
    return frame


def _read_parquet(file: Path) -> pd.DataFrame:
    """A Parquet file through pyarrow, a column chunk at a time, into one block per column.

    Arrow's buffers become the frame's (no copy for columns without missing values, and none of the
    consolidation into one 2-D block pandas does by default), so the peak is about the frame plus a
    column chunk instead of twice the frame.
    """
    import pyarrow as pa

    frame = pd.read_parquet(
        file, pre_buffer=False, to_pandas_kwargs={"split_blocks": True, "self_destruct": True}
    )
    pa.default_memory_pool().release_unused()
    return frame


# ------------------------------------------------------------------------------------------------
# 2. clean


@dataclass
class CleanTable:
    """Features (still raw values) and an encoded target, with what cleaning did."""

    features: pd.DataFrame
    target: np.ndarray
    task: str
    classes: list[str]
    dropped_rows: int
    source: str
    truth: dict[str, Any]


def infer_task(target: pd.Series) -> str:
    """A file's task when ``--task`` is not given: text or few integer levels → classification."""
    values = target.dropna()
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return "classification"
    integral = bool(np.all(np.isfinite(values)) and np.all(np.asarray(values) == np.round(values)))
    return "classification" if integral and values.nunique() <= 20 else "regression"


def clean_frame(raw: RawTable, task: str | None, max_categories: int) -> CleanTable:
    """Drop rows without a target, encode the target, check there is something to learn from."""
    frame = raw.frame
    if len(frame) == 0:
        raise UserError(f"{raw.source!r} has no data rows")
    target = frame[raw.target]
    if isinstance(target, pd.DataFrame):  # duplicated target name in a frame built by hand
        raise UserError(f"{raw.source!r} has several columns named {raw.target!r}; rename them")
    task = task or infer_task(target)
    if task == "regression":
        numeric = pd.to_numeric(target, errors="coerce")
        bad_text = int((numeric.isna() & target.notna()).sum())
        if bad_text and bad_text == int(target.notna().sum()):
            raise UserError(
                f"target {raw.target!r} is not numeric, so it cannot be regressed; "
                "pass --task classification or pick a numeric column"
            )
        if bad_text:
            example = target[numeric.isna() & target.notna()].iloc[0]
            raise UserError(
                f"target {raw.target!r} has {bad_text} non-numeric value(s) such as {str(example)[:30]!r}; "
                "fix them or pass --task classification"
            )
        keep = numeric.notna() & np.isfinite(numeric.astype(float))
    else:
        keep = target.notna()
    dropped = int((~keep).sum())
    if dropped:  # a copy of the kept rows; with none dropped the frame is used as read (no copy)
        frame = frame.loc[keep]
    if len(frame) == 0:
        raise UserError(
            f"every row of {raw.source!r} lacks a usable target {raw.target!r}; nothing to train on"
        )
    features = frame.drop(columns=[raw.target])
    if features.shape[1] == 0:
        raise UserError(f"{raw.source!r} has no feature columns besides the target {raw.target!r}")
    if task == "regression":
        values = pd.to_numeric(frame[raw.target]).astype(float)
        largest = float(values.abs().max())
        if largest > MAX_TARGET:
            # Squared errors of such targets overflow float32 (the training dtype) at the first step.
            raise UserError(
                f"target {raw.target!r} has values up to {largest:.3g}, too large to train on in float32; "
                f"rescale it (e.g. divide by {10 ** int(math.log10(largest) - 3):.0e}) or take its log"
            )
        y = values.to_numpy(dtype=np.float32)
        classes: list[str] = []
    else:
        labels = (
            frame[raw.target].astype(str)
            if not pd.api.types.is_numeric_dtype(frame[raw.target])
            else frame[raw.target]
        )
        classes_raw = sorted(pd.unique(labels), key=lambda v: (str(type(v)), v))
        if len(classes_raw) < 2:
            raise UserError(
                f"target {raw.target!r} has a single class ({classes_raw[0]!r}); classification needs at least 2"
            )
        index = {value: i for i, value in enumerate(classes_raw)}
        y = labels.map(index).to_numpy(dtype=np.int64)
        classes = [str(c) for c in classes_raw]
    _check_feature_columns(features, raw.source, max_categories)
    return CleanTable(features, y, task, classes, dropped, raw.source, raw.truth)


def _check_feature_columns(features: pd.DataFrame, source: str, max_categories: int) -> None:
    for name in features.columns:
        column = features[name]
        if _is_numeric_column(column):
            continue
        levels = column.dropna().nunique()
        if levels > max_categories:
            raise UserError(
                f"feature {name!r} in {source!r} is text with {levels} levels (> --max-categories "
                f"{max_categories}); drop it, encode it, or raise --max-categories"
            )


# ------------------------------------------------------------------------------------------------
# 3. split


def split_indices(
    n_rows: int, labels: np.ndarray | None, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/val/test row indices; stratified by ``labels`` when every class allows it."""
    from sklearn.model_selection import train_test_split

    n_test = int(round(n_rows * test_fraction))
    n_val = int(round(n_rows * val_fraction))
    # Two rows at least per evaluation split: R², F1 and a mean loss need more than one row.
    if n_test < 2 or n_val < 2 or n_rows - n_test - n_val < 1:
        need = int(math.ceil(2 / min(val_fraction, test_fraction))) + 1
        raise UserError(
            f"{n_rows} usable rows are too few to split into train/val/test; "
            f"give at least {need} rows or raise --val-fraction/--test-fraction"
        )
    rows = np.arange(n_rows)

    def _split(idx: np.ndarray, size: int, strat: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if strat is not None:
            try:
                return train_test_split(idx, test_size=size, random_state=seed, stratify=strat)
            except ValueError:  # a class too small to stratify: fall back to a plain seeded split
                pass
        return train_test_split(idx, test_size=size, random_state=seed)

    rest, test = _split(rows, n_test, labels)
    rest_labels = labels[rest] if labels is not None else None
    train, val = _split(rest, n_val, rest_labels)
    return np.sort(train), np.sort(val), np.sort(test)


# ------------------------------------------------------------------------------------------------
# 4. preprocessing, fit on train only: lightning_batch.preprocessing (no Lightning there, so a
#    logged model loads it quickly)


#: Largest |regression target| accepted: its square must stay far below float32's 3.4e38.
MAX_TARGET = 1e15


# ------------------------------------------------------------------------------------------------
# 5. serve


class TensorTableDataset(Dataset):
    """Rows of two in-memory tensors; ``__getitems__`` answers a whole batch with one index op."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        if len(features) != len(targets):
            raise ValueError(f"{len(features)} feature rows but {len(targets)} targets")
        self.features = features
        self.targets = targets
        #: Tables memory-mapped from the data cache: what :meth:`to_` returns to on the CPU.
        self.host_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.targets[index]

    def __getitems__(self, indices: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # DataLoader calls this instead of one __getitem__ per row when it exists. With the tables on
        # an accelerator the batch is gathered there: only the index (8 bytes a row) crosses over.
        index = torch.as_tensor(indices, dtype=torch.long).to(self.features.device, non_blocking=True)
        return self.features[index], self.targets[index]

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + self.targets.nbytes

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to_(self, device: torch.device | str) -> None:
        """Move both tables to ``device`` in place (loaders over this dataset follow). Memory-mapped
        tables come back to the CPU as the same file-backed tensors, never as a copy in RAM."""
        if torch.device(device).type == "cpu" and self.host_tables is not None:
            self.features, self.targets = self.host_tables
            return
        self.features = self.features.to(device)
        self.targets = self.targets.to(device)


def keep_batch(batch: Any) -> Any:
    """Collate that does nothing: ``__getitems__`` already returned the batch tensors."""
    return batch


@dataclass
class PreparedData:
    """What :func:`prepare_data` made: tensors per split and the facts a run records."""

    train: TensorTableDataset
    val: TensorTableDataset
    test: TensorTableDataset
    task: str
    classes: list[str]
    preprocessor: Preprocessor
    dropped_rows: int
    source: str
    truth: dict[str, Any]
    #: The source as read; None when the tables came from the data cache (nothing was read).
    raw_frame: pd.DataFrame | None
    target_column: str
    #: From the data cache: the MLflow dataset input recorded when the cache was written (name,
    #: digest, source_type, source, schema, profile), so a run that read nothing still records it.
    dataset_input: dict[str, Any] | None = None

    @property
    def n_features(self) -> int:
        return self.train.features.shape[1]

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Steps 1–4 for a validated config: read, clean, split, fit the preprocessing on train.

    With a data cache (``--data-cache DIR``, or tables over ``--data-memory-budget`` of the available
    memory) the tables are memory-mapped files there, written once by the first run that needs them
    (:mod:`lightning_batch.data_cache`); a Parquet file over the budget is prepared streaming."""
    cache = data_cache.cache_for(cfg)
    if cache is None:
        return prepare_in_memory(cfg)
    if cache.over_budget and cfg.is_file_source and Path(cfg.data).suffix.lower() != ".csv":
        tables = cache.load_or_build(lambda writer: _stream_parquet(cfg, writer, cache.budget))
    else:
        tables = cache.load_or_build(
            lambda writer: _write_prepared(prepare_in_memory(cfg), writer, name=cfg.data)
        )
    return _from_cache(tables)


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


# ------------------------------------------------------------------------------------------------
# 4b. the data cache: prepared tables as memory-mapped files (see lightning_batch.data_cache)

SPLITS = ("train", "val", "test")


def _facts(
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


def _write_prepared(data: PreparedData, writer: data_cache.CacheWriter, name: str) -> dict[str, Any]:
    """The in-memory preparation's tables into the cache, byte for byte."""
    for split in SPLITS:
        table = getattr(data, split)
        writer.save(f"{split}_x", table.features.numpy())
        writer.save(f"{split}_y", table.targets.numpy())
    facts = (data.dropped_rows, data.source, data.truth, data.target_column)
    return {
        **_facts(data.task, data.classes, data.preprocessor, *facts),
        "dataset_input": _dataset_input_fields(data.raw_frame, data.source, name),
    }


def _dataset_input_fields(frame: pd.DataFrame | None, source: str, name: str) -> dict[str, Any] | None:
    """The MLflow dataset input of the source as read, kept in meta.json for the runs that read the
    cache instead (None without MLflow: the data path runs without it, e.g. on a bare GPU box)."""
    if frame is None:
        return None
    try:
        from lightning_batch.tracking import dataset_input_fields
    except ImportError:
        return None
    try:
        return dataset_input_fields(frame, source, name)
    except Exception:  # noqa: BLE001 -- a dataset profile is nice to have, never worth a failed cache
        return None


def _from_cache(tables: data_cache.CachedTables) -> PreparedData:
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


def _stream_parquet(cfg: RunConfig, writer: data_cache.CacheWriter, budget: int) -> dict[str, Any]:
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
        return _write_prepared(prepare_in_memory(cfg), writer)  # the in-memory reader says what is wrong
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
        _check_feature_columns(values, source, cfg.max_categories)
        try:  # the train rows in file order: the same median and levels, mean and scale up to rounding
            fits.append(Preprocessor.fit(values.iloc[rows["train"]]))
        except UserError as exc:  # the column is empty in the train rows: dropped, as in memory
            dropped.append(name)
            empty = exc
        del values
    if not fits:
        assert empty is not None
        raise empty
    pre = _merge_column_fits(fits, dropped)

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
    return _facts(task, classes, pre, dropped_rows, source, {}, target)


def _merge_column_fits(fits: list[Preprocessor], dropped: list[str]) -> Preprocessor:
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


def _nothing_trained(sampler_state: dict[str, Any]) -> bool:
    """Whether a saved sampler position is the start of training (epoch 0, no batch trained)."""
    return int(sampler_state["epoch"]) == 0 and int(sampler_state["cursor"]) == 0


class TabularDataModule(pl.LightningDataModule):
    """Tabular data for a Lightning fit, with a training batch size that may change between steps.

    ``batch_size`` is global (all DDP ranks together); setting it takes effect at the next step.
    Under DDP, build the Trainer with ``use_distributed_sampler=False``: the sampler shards the
    batches itself (Lightning's replacement would freeze the size).

    Args:
        config: a :class:`RunConfig`; keyword arguments override its fields.
        eval_batch_size: rows per validation/test batch (they never change the model).
    """

    def __init__(
        self, config: RunConfig | None = None, *, eval_batch_size: int = 4096, **options: Any
    ) -> None:
        super().__init__()
        base = config.to_dict() if config is not None else {}
        self.config = RunConfig.from_mapping({**base, **options}, origin="TabularDataModule").validate()
        self.eval_batch_size = eval_batch_size
        self.prepared: PreparedData | None = None
        #: Where the tables are: ``host`` (CPU training), ``device`` (moved to the accelerator once) or
        #: ``pinned`` (host memory, each batch pinned and copied asynchronously); see place_tables.
        self.data_placement = "host"
        self._train_sampler: ResizableBatchSampler | None = None
        self._pending_sampler_state: dict[str, Any] | None = None

    # -- data ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.prepared is None:  # idempotent: Lightning calls setup per stage
            self.prepared = prepare_data(self.config)
            self.config.task = self.prepared.task
        if self.trainer is not None:
            self.place_tables(self.trainer.strategy.root_device)

    def teardown(self, stage: str | None = None) -> None:
        # Give the accelerator's memory back once a fit or test is over (the next stage's setup
        # moves the tables again: one copy, not one per step).
        if self.prepared is not None and self.data_placement == "device":
            self.place_tables(torch.device("cpu"))

    def place_tables(self, device: torch.device) -> str:
        """Put the tables where the model trains: on ``device`` when they fit the budget
        (``device_data_budget`` of its free memory), so a batch is an index there and no step copies
        rows from the host; else in host memory, batches pinned for asynchronous copies (CUDA).
        Returns and records the choice in :attr:`data_placement` (``device``, ``pinned`` or ``host``)."""
        data = self._data()
        tables = (data.train, data.val, data.test)
        placement = "host"
        if device.type == "cuda":
            need = sum(t.nbytes for t in tables if t.device != device)
            free, _ = torch.cuda.mem_get_info(device)
            placement = "device" if need <= self.config.device_data_budget * free else "pinned"
        elif device.type == "mps" and self.config.device_data_budget > 0:
            placement = "device"
        target = device if placement == "device" else torch.device("cpu")
        for table in tables:
            if table.device != target:
                table.to_(target)
        self.data_placement = placement
        return placement

    def _data(self) -> PreparedData:
        if self.prepared is None:
            self.setup()
        assert self.prepared is not None
        return self.prepared

    @property
    def task(self) -> str:
        return self._data().task

    @property
    def n_features(self) -> int:
        return self._data().n_features

    @property
    def n_outputs(self) -> int:
        return self._data().n_outputs

    @property
    def train_set(self) -> TensorTableDataset:
        return self._data().train

    @property
    def val_set(self) -> TensorTableDataset:
        return self._data().val

    @property
    def test_set(self) -> TensorTableDataset:
        return self._data().test

    # -- batch size ------------------------------------------------------------------------------
    def initial_batch_size(self) -> int:
        """The configured batch size as a number (``full`` is every training row; ``auto`` starts at base_batch)."""
        size = self.config.batch_size
        if size == "full":
            return len(self.train_set)
        if size == "auto":
            size = self.config.base_batch
        return min(int(size), len(self.train_set))

    @property
    def batch_size(self) -> int:
        """Global training rows per step; changeable between steps."""
        if self._train_sampler is not None:
            return self._train_sampler.batch_size
        return self.initial_batch_size()

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.train_batch_sampler.batch_size = int(value)

    @property
    def train_batch_sampler(self) -> ResizableBatchSampler:
        if self._train_sampler is None:
            rank, world = self._rank_and_world()
            self._train_sampler = ResizableBatchSampler(
                len(self.train_set),
                self.initial_batch_size(),
                shuffle=self.config.shuffle,
                seed=self.config.seed,
                rank=rank,
                world_size=world,
            )
            if self._pending_sampler_state is not None:
                self._train_sampler.load_state_dict(self._pending_sampler_state)
                self._pending_sampler_state = None
        return self._train_sampler

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        if trainer.world_size > 1 and uses_distributed_sampler(trainer):
            raise UserError(
                "TabularDataModule shards batches itself under DDP; build the Trainer with "
                "use_distributed_sampler=False"
            )
        return trainer.global_rank, trainer.world_size

    # -- loaders ---------------------------------------------------------------------------------
    def _index_device(self, dataset: TensorTableDataset) -> torch.device | None:
        # Tables on the accelerator: the batches' indices are made there too (see the sampler's
        # index_device), so a step copies nothing from the host.
        return dataset.device if self.data_placement == "device" else None

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_batch_sampler
        sampler.index_device = self._index_device(self.train_set)
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            collate_fn=keep_batch,
            pin_memory=self.data_placement == "pinned",
        )

    def _eval_loader(self, dataset: TensorTableDataset) -> DataLoader:
        # Every rank evaluates the whole split: the numbers agree across ranks without a sampler.
        sampler = ResizableBatchSampler(len(dataset), min(self.eval_batch_size, len(dataset)), shuffle=False)
        sampler.index_device = self._index_device(dataset)
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=keep_batch, pin_memory=self.data_placement == "pinned"
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this once per batch it is about to train, in order, after fetching ahead:
        # the sampler learns which of its batches were really trained (for exact mid-epoch resume).
        trainer = self.trainer
        sampler = self._train_sampler
        if (
            trainer is not None
            and trainer.training
            and sampler is not None
            and sampler.position_owner is None
        ):
            sampler.batch_trained()
        return batch

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"train_sampler": self._train_sampler.state_dict() if self._train_sampler else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sampler_state = state_dict.get("train_sampler")
        if sampler_state is None or _nothing_trained(sampler_state):
            # A checkpoint from before the first training batch (Lightning's BatchSizeFinder saves
            # one, runs trial steps, then restores it): training restarts at the first row of
            # epoch 0, at the batch size chosen meanwhile (the finder's), not the one saved.
            self._pending_sampler_state = None
            if self._train_sampler is not None:
                self._train_sampler.rewind()
            return
        if self._train_sampler is not None:
            self._train_sampler.load_state_dict(sampler_state)
        else:
            self._pending_sampler_state = sampler_state
