"""Step 3 of the tabular pipeline, **split**: seeded train/val/test rows, stratified for classification.

Examples:
    >>> train, val, test = split_indices(100, None, 0.15, 0.15, seed=0)
    >>> len(train), len(val), len(test)
    (70, 15, 15)
"""

from __future__ import annotations

import math

import numpy as np

from lightning_batch.errors import UserError


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
