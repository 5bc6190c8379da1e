"""The tabular path, ``[data]``: the project's showcase and test bed for the plugin.

The pipeline, one module a step: ``sources`` (read) -> ``cleaning`` -> ``splitting`` ->
``preprocessing`` (fit on train only) -> ``tables`` (serve by index), run by ``prepare`` (and
``streaming`` for a Parquet file too large for memory), cached by ``cache``, and served by
:class:`TabularDataModule` (``datamodule``). The model side: :class:`TaskModule` (``task_module``)
over the networks of ``networks`` (linear, softmax, MLP, CNN), with ``augment`` and
``gradient_health``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TabularDataModule": "lightning_batch.tabular.datamodule",
    "TaskModule": "lightning_batch.tabular.task_module",
    "build_model": "lightning_batch.tabular.networks",
    "prepare_data": "lightning_batch.tabular.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_batch.tabular' has no attribute {name!r}")
