"""Step 2 of the tabular pipeline, **clean**: drop rows without a target, encode it, check the features.

A regression target must be numbers (and small enough for float32); a classification target is
label-encoded in a stable order. A text feature with more levels than ``--max-categories`` is
refused in one line, before any preprocessing is fitted.

Examples:
    >>> import pandas as pd
    >>> from lightning_batch.tabular.sources import RawTable
    >>> raw = RawTable(pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": ["a", None, "b"]}), "y", "inline")
    >>> clean = clean_frame(raw, None, max_categories=20)
    >>> clean.task, clean.classes, clean.dropped_rows
    ('classification', ['a', 'b'], 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_batch._extras import extra_imports
from lightning_batch.errors import UserError
from lightning_batch.tabular.preprocessing import is_numeric_column
from lightning_batch.tabular.sources import RawTable

with extra_imports("data", "the tabular data path"):
    import pandas as pd


#: Largest |regression target| accepted: its square must stay far below float32's 3.4e38.
MAX_TARGET = 1e15


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
    check_feature_columns(features, raw.source, max_categories)
    return CleanTable(features, y, task, classes, dropped, raw.source, raw.truth)


def check_feature_columns(features: pd.DataFrame, source: str, max_categories: int) -> None:
    for name in features.columns:
        column = features[name]
        if is_numeric_column(column):
            continue
        levels = column.dropna().nunique()
        if levels > max_categories:
            raise UserError(
                f"feature {name!r} in {source!r} is text with {levels} levels (> --max-categories "
                f"{max_categories}); drop it, encode it, or raise --max-categories"
            )
