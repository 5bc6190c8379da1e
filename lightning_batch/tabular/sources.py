"""Step 1 of the tabular pipeline, **read**: a CSV/Parquet file, a scikit-learn bundled set, or a generator.

Every source becomes a :class:`RawTable` (the frame as read, its target column, where it came
from); nothing is cleaned here. Any failure to read is one :class:`~lightning_batch.errors.UserError`
line that names the file and what to do.

Examples:
    >>> table = make_linear_regression(100, 3, 0.1, seed=0)
    >>> table.frame.shape, table.target
    ((100, 4), 'target')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_batch._extras import check, extra_imports
from lightning_batch.config import SKLEARN_DATASETS, SYNTHETIC_DATASETS, RunConfig
from lightning_batch.errors import UserError

with extra_imports("data", "the tabular data path"):
    import pandas as pd
check("sklearn", "data", "the tabular data path")  # imported where used: cheap to find now


TARGET = "target"


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
