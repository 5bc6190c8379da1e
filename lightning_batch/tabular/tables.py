"""Step 5 of the tabular pipeline, **serve**: the prepared tables as tensors a batch is one index of.

:class:`TensorTableDataset` answers a whole batch with one tensor index (``__getitems__``), so a
step never collates rows one by one; :class:`PreparedData` is what steps 1-4 hand to the
:class:`~lightning_batch.tabular.datamodule.TabularDataModule`.

Examples:
    >>> import torch
    >>> table = TensorTableDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0]))
    >>> x, y = table.__getitems__([2, 0])
    >>> x.tolist(), y.tolist()
    ([[4.0, 5.0], [0.0, 1.0]], [0, 0])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_batch._extras import extra_imports
from lightning_batch.tabular.preprocessing import Preprocessor

with extra_imports("data", "the tabular data path"):
    import pandas as pd


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
