"""Steps 1-4 of the tabular pipeline in one call: read, clean, split, and fit the preprocessing on train.

:func:`prepare_data` is what :class:`~lightning_batch.tabular.datamodule.TabularDataModule` calls.
Small tables are prepared in memory (:mod:`~lightning_batch.tabular.in_memory`); large ones, or any
run given ``--data-cache DIR``, are prepared once into memory-mapped files
(:mod:`~lightning_batch.tabular.cache`) that later runs and every trial of a study reuse; a Parquet
file too large for memory is prepared streaming (:mod:`~lightning_batch.tabular.streaming`).

Examples:
    >>> from lightning_batch.config import RunConfig
    >>> data = prepare_data(RunConfig(data="iris").validate())
    >>> data.task, data.n_features, len(data.train) + len(data.val) + len(data.test)
    ('classification', 4, 150)
"""

from __future__ import annotations

from pathlib import Path

from lightning_batch.config import RunConfig
from lightning_batch.tabular import cache as data_cache
from lightning_batch.tabular.in_memory import SourceDescriber, from_cache, prepare_in_memory, write_prepared
from lightning_batch.tabular.streaming import stream_parquet
from lightning_batch.tabular.tables import PreparedData

__all__ = ["SourceDescriber", "prepare_data"]


def prepare_data(cfg: RunConfig, describe_source: SourceDescriber | None = None) -> PreparedData:
    """Steps 1–4 for a validated config: read, clean, split, fit the preprocessing on train.

    With a data cache (``--data-cache DIR``, or tables over ``--data-memory-budget`` of the available
    memory) the tables are memory-mapped files there, written once by the first run that needs them
    (:mod:`lightning_batch.tabular.cache`); a Parquet file over the budget is prepared streaming."""
    cache = data_cache.cache_for(cfg)
    if cache is None:
        data = prepare_in_memory(cfg)
    elif cache.over_budget and cfg.is_file_source and Path(cfg.data).suffix.lower() != ".csv":
        data = from_cache(cache.load_or_build(lambda writer: stream_parquet(cfg, writer, cache.budget)))
    else:
        data = from_cache(
            cache.load_or_build(
                lambda writer: write_prepared(prepare_in_memory(cfg), writer, cfg.data, describe_source)
            )
        )
    if data.task == "regression" and cfg.scale_target:
        # The tables keep the raw target (a cache serves runs with and without scaling); the module
        # standardises it in its loss, and every metric and prediction is in the target's units.
        data.preprocessor.fit_target(data.train.targets.numpy())
    return data
