"""The fitted preprocessing of the tabular path: median imputation, one-hot encoding, scaling.

Fit on the training split only (:meth:`Preprocessor.fit`) and applied to every split and, later, to
new rows by the logged MLflow model (:mod:`lightning_batch.tracking.run_model`). It needs NumPy and pandas
only, not Lightning, so a process that only predicts imports it in a fraction of the time the
training path takes.

Examples:
    >>> import pandas as pd
    >>> pre = Preprocessor.fit(pd.DataFrame({"x": [1.0, None, 3.0], "c": ["a", "b", "a"]}))
    >>> pre.output_columns, pre.medians
    (['x', 'c=a', 'c=b'], {'x': 2.0})
    >>> [round(float(v), 3) for v in pre.transform(pd.DataFrame({"x": [None], "c": ["b"]}))[0]]
    [0.0, -1.414, 1.414]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_batch._extras import extra_imports
from lightning_batch.errors import UserError

with extra_imports("data", "the tabular data path"):
    import pandas as pd


#: Largest |standardised feature| kept (values beyond are clipped: they would overflow float32 math).
MAX_SCALED = 1e6


@dataclass
class Preprocessor:
    """Median imputation, one-hot encoding of text columns and standard scaling, fit on train.

    Stored as plain JSON (:meth:`to_dict`) with the run, so the numbers that turned a raw row into
    model input are readable and reproducible without unpickling anything.
    """

    numeric_columns: list[str] = field(default_factory=list)
    medians: dict[str, float] = field(default_factory=dict)
    categorical_levels: dict[str, list[str]] = field(default_factory=dict)
    dropped_columns: list[str] = field(default_factory=list)
    output_columns: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    #: A regression target's mean and standard deviation on train (None: not standardised): the
    #: network learns ``(y - target_mean) / target_scale``, and predictions are mapped back.
    target_mean: float | None = None
    target_scale: float | None = None

    @classmethod
    def fit(cls, train: pd.DataFrame, rows: np.ndarray | None = None) -> Preprocessor:
        """Fit on ``train``, or on its rows at positions ``rows`` (then no copy of them is made).

        A column at a time: its statistics come from that column alone, in float64, so the memory
        needed is a column's, never a float64 copy of the table.
        """
        pre = cls()
        numeric_stats: list[tuple[float, float]] = []
        level_stats: list[np.ndarray] = []
        for name in train.columns:
            column = train[name]
            if is_numeric_column(column):
                values = _numbers(column, rows)  # float64, NaN where missing or ±inf
                missing = np.isnan(values)
                if missing.all():
                    pre.dropped_columns.append(name)  # all missing in train: nothing to learn from it
                    continue
                pre.numeric_columns.append(name)
                # The median of the finite values, found in place: their order is not needed after.
                median = float(np.median(values[~missing] if missing.any() else values, overwrite_input=True))
                pre.medians[name] = median
                values[missing] = median
                numeric_stats.append((float(values.mean()), float(values.std())))
            else:
                codes, texts = _text_codes(column if rows is None else column.iloc[rows])
                levels = sorted(set(texts))
                if not levels:
                    pre.dropped_columns.append(name)
                    continue
                pre.categorical_levels[name] = levels
                # Each one-hot column is 0/1: its mean is the level's share p, its std sqrt(p(1-p)).
                codes = _level_codes(codes, texts, levels)
                share = np.bincount(codes[codes >= 0], minlength=len(levels)) / len(codes)
                level_stats.append(share)
        if not pre.numeric_columns and not pre.categorical_levels:
            raise UserError("every feature column is empty in the training split; nothing to train on")
        pre.output_columns = list(pre.numeric_columns) + [
            f"{name}={level}" for name, levels in pre.categorical_levels.items() for level in levels
        ]
        shares = np.concatenate(level_stats) if level_stats else np.zeros(0)
        mean = np.concatenate([[m for m, _ in numeric_stats], shares])
        std = np.concatenate([[s for _, s in numeric_stats], np.sqrt(shares * (1.0 - shares))])
        # A constant column keeps scale 1: dividing by ~0 would blow its noise up to unit variance.
        std = np.where(std < 1e-12, 1.0, std)
        pre.mean, pre.scale = mean.tolist(), std.tolist()
        return pre

    def transform(self, frame: pd.DataFrame, rows: np.ndarray | None = None) -> np.ndarray:
        """Model input for ``frame``, or for its rows at positions ``rows``: one float32 matrix.

        Filled in place a block of rows at a time (:data:`BLOCK_CELLS` cells): per block the numeric
        columns are imputed and scaled in float64 and the text columns one-hot encoded from integer
        level codes, so the float64 data alive at once is one block's, not the table's, and nothing
        is done per row in Python. The numbers are those of a float64 pass over the whole table.
        """
        n = len(frame) if rows is None else len(rows)
        width = len(self.output_columns)
        out = np.empty((n, width), dtype=np.float32)
        mean = np.asarray(self.mean, dtype=np.float64)
        scale = np.asarray(self.scale, dtype=np.float64)
        numeric = [_number_source(frame[name]) for name in self.numeric_columns]
        medians = np.asarray([self.medians[name] for name in self.numeric_columns], dtype=np.float64)
        k = len(numeric)
        one_hot = []  # (first output column, level codes of the rows, number of levels)
        at = k
        for name, levels in self.categorical_levels.items():
            column = frame[name] if rows is None else frame[name].iloc[rows]
            one_hot.append((at, _level_codes(*_text_codes(column), levels), len(levels)))
            at += len(levels)
        step = max(1, BLOCK_CELLS // max(1, width))
        block = np.empty((min(step, n), k), dtype=np.float64)
        for start in range(0, n, step):
            stop = min(n, start + step)
            part = slice(start, stop) if rows is None else rows[start:stop]
            values = block[: stop - start]
            for j, source in enumerate(numeric):
                values[:, j] = _float64(source[part])
            np.copyto(values, medians, where=~np.isfinite(values))
            _scale_into(out[start:stop, :k], values, mean[:k], scale[:k])
            for first, codes, count in one_hot:
                # A level unseen in train (code -1) or a missing value encodes as all zeros.
                hot = (codes[start:stop, None] == np.arange(count)).astype(np.float64)
                stop_col = first + count
                _scale_into(out[start:stop, first:stop_col], hot, mean[first:stop_col], scale[first:stop_col])
        return out

    def fit_target(self, train_targets: np.ndarray) -> None:
        """Standardise a regression target: its mean and standard deviation on the train rows
        (float64; a constant target keeps scale 1).

        >>> pre = Preprocessor()
        >>> pre.fit_target(np.array([1.0, 3.0, 5.0]))
        >>> pre.target_mean, round(pre.target_scale, 4), pre.unscale_target(np.array([0.0, 1.0])).tolist()
        (3.0, 1.633, [3.0, 4.6329931618554525])
        """
        values = np.asarray(train_targets, dtype=np.float64).reshape(-1)
        std = float(values.std())
        self.target_mean, self.target_scale = float(values.mean()), std if std >= 1e-12 else 1.0

    @property
    def target_scaling(self) -> tuple[float, float] | None:
        """``(mean, scale)`` of a standardised target, else None."""
        if self.target_mean is None or self.target_scale is None:
            return None
        return self.target_mean, self.target_scale

    def unscale_target(self, values: np.ndarray) -> np.ndarray:
        """The network's regression output in the target's own units (as it is without scaling)."""
        scaling = self.target_scaling
        if scaling is None:
            return values
        mean, scale = scaling
        return values * scale + mean

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessor:
        return cls(**values)


#: Cells per block of :meth:`Preprocessor.transform` (512 KiB of float64 working memory: fastest here).
BLOCK_CELLS = 1 << 16


def _number_source(column: pd.Series) -> Any:
    """A numeric column's values to index by rows: its own NumPy buffer (no copy) for NumPy dtypes,
    else its extension array (nullable and Arrow dtypes, converted a block at a time)."""
    return column.to_numpy(copy=False) if isinstance(column.dtype, np.dtype) else column.array


def _float64(values: Any) -> np.ndarray:
    """Numbers as float64, NaN where missing (a pandas NA cannot be a float)."""
    if isinstance(values, np.ndarray):
        return values.astype(np.float64, copy=False)
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _numbers(column: pd.Series, rows: np.ndarray | None = None) -> np.ndarray:
    """A numeric column (at ``rows``) as a new float64 array, ±inf treated as missing (NaN): they
    would poison the mean and the scaler."""
    source = _number_source(column)
    values = _float64(source if rows is None else source[rows])
    if not (values.flags.owndata and values.flags.writeable):  # the frame's own buffer: not ours to change
        values = values.copy()
    values[~np.isfinite(values)] = np.nan
    return values


def _text_codes(column: pd.Series) -> tuple[np.ndarray, list[str]]:
    """A text column factorized: a code per value (-1 where missing) and each code's text, as
    ``astype(str)`` writes it (one-hot levels are text; 1 and "1" are the same level). Only the
    distinct values of text and boolean columns are turned into text, not every row."""
    if not (isinstance(column.dtype, pd.StringDtype) or pd.api.types.is_bool_dtype(column)):
        # Text first: 1 and True are one key to factorize (they compare equal) but two texts.
        column = column.astype(str).where(column.notna(), None)
    codes, uniques = pd.factorize(column)
    return codes, pd.Series(uniques).astype(str).tolist()


def _level_codes(codes: np.ndarray, texts: list[str], levels: list[str]) -> np.ndarray:
    """Each value's position in ``levels`` from :func:`_text_codes`' output; -1 for a missing value
    or a level not in the list."""
    lookup = np.append(pd.Index(levels, dtype=object).get_indexer(texts), -1)  # code -1 -> -1
    return lookup[codes].astype(np.int16 if len(levels) < 2**15 else np.int64)


def _scale_into(out: np.ndarray, values: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> None:
    """``out[...] = clip((values - mean) / scale)`` in float32, ``values`` (float64) overwritten."""
    values -= mean
    values /= scale
    # A val/test outlier far outside the train range (1e38 where train was constant) would be
    # inf in float32 and poison every loss; a million standard deviations is extreme enough.
    np.clip(values, -MAX_SCALED, MAX_SCALED, out=values)
    out[...] = values


def is_numeric_column(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
