"""The plugin: what ``pip install lightning-batch`` brings (torch, Lightning, psutil), and nothing else.

- :class:`DynamicBatchSize` (``callback``): the Lightning callback; its options, declared once, are
  :class:`BatchSizeOptions` (``options``, checked by ``checks``);
- ``clock``, ``cadence``: when to measure and when to decide; ``policy``: which batch and which lr;
- ``noise``: the gradient noise scale; ``memory`` and ``probe``: the largest batch that fits;
- ``sampler`` and ``loader``: a training loader whose batch size can change mid-epoch;
- ``checkpoint_io`` and ``progress``: an atomic checkpoint writer and a progress bar for fits that use it;
- ``_lightning_compat``: every Lightning private the plugin touches, each with its reason.

Nothing here imports the tabular path, MLflow or Optuna (``tests/test_layout.py`` checks it).
Names are imported lazily, so ``import lightning_batch.plugin.options`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DynamicBatchSize": "lightning_batch.plugin.callback",
    "BatchSizeOptions": "lightning_batch.plugin.options",
    "ResizableBatchSampler": "lightning_batch.plugin.sampler",
    "UnsupportedLoaderError": "lightning_batch.plugin.loader",
    "make_resizable": "lightning_batch.plugin.loader",
    "BatchPolicy": "lightning_batch.plugin.policy",
    "PolicyContext": "lightning_batch.plugin.policy",
    "BatchSizeController": "lightning_batch.plugin.policy",
    "AtomicCheckpointIO": "lightning_batch.plugin.checkpoint_io",
    "BatchProgressBar": "lightning_batch.plugin.progress",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_batch.plugin' has no attribute {name!r}")
