"""lightning-batch: a PyTorch Lightning plugin that works out the batch size during training.

Public API (imported lazily, so ``import lightning_batch`` stays cheap)::

    from lightning_batch import DynamicBatchSize, TaskModule, TabularDataModule, RunConfig, train
    from lightning_batch import TuneConfig, tune

``pip install lightning-batch`` brings what ``DynamicBatchSize`` needs (torch, Lightning, psutil);
the tabular path, MLflow and Optuna come with the extras ``[data]``, ``[tracking]``, ``[tune]``
(``[all]``: everything). A name whose extra is missing raises ``MissingExtraError`` (an
``ImportError``) with one line naming it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "lightning_batch.config",
    "UserError": "lightning_batch.errors",
    "TabularDataModule": "lightning_batch.tabular.datamodule",
    "ResizableBatchSampler": "lightning_batch.plugin.sampler",
    "TaskModule": "lightning_batch.tabular.task_module",
    "DynamicBatchSize": "lightning_batch.plugin.callback",
    "BatchSizeOptions": "lightning_batch.plugin.options",
    "build_model": "lightning_batch.tabular.networks",
    "train": "lightning_batch.training",
    "TuneConfig": "lightning_batch.tune.space",
    "tune": "lightning_batch.tune.study",
    "MissingExtraError": "lightning_batch._extras",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_batch' has no attribute {name!r}")
