"""Turn a user's map-style ``DataLoader`` into one whose batch size can change mid-epoch.

``DynamicBatchSize`` calls :func:`make_resizable` when a fit starts on a loader that does not
already use a :class:`~lightning_batch.plugin.sampler.ResizableBatchSampler`. What the user's loader
says is kept: its order (``shuffle=True`` gives a new seeded permutation each epoch,
``shuffle=False`` the dataset's order), its batch size (per device, as in Lightning: the global
batch is that times the number of ranks), ``drop_last``, and, through Lightning's own
re-instantiation, every other argument and a ``DataLoader`` subclass's own. What cannot keep the
promise of every row once per epoch at any batch size is refused with one line saying what is
supported, rather than trained at a silently fixed size.

Examples:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=4, shuffle=False)
    >>> resizable, sampler = make_resizable(loader, seed=0)
    >>> sampler.batch_size = 3
    >>> [batch[0].tolist() for batch in resizable]
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0], [9.0]]
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from lightning_batch.plugin._lightning_compat import (
    expose_loader_position,
    replace_train_dataloader,
    with_batch_sampler,
)
from lightning_batch.plugin.sampler import ResizableBatchSampler

SUPPORTED = (
    "a map-style dataset with DataLoader(batch_size=N, shuffle=True|False), optionally drop_last, "
    "num_workers, collate_fn, pin_memory, ...; or your own batch_sampler=ResizableBatchSampler(...)"
)


class UnsupportedLoaderError(ValueError):
    """The training loader cannot be resized mid-epoch without breaking its own promise."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"DynamicBatchSize cannot resize a training DataLoader with {what}; it supports {SUPPORTED}"
        )


def make_resizable(
    loader: DataLoader[Any], *, seed: int, rank: int = 0, world_size: int = 1
) -> tuple[DataLoader[Any], ResizableBatchSampler]:
    """The loader rebuilt on a :class:`ResizableBatchSampler` equivalent to its own, and that sampler.

    ``seed`` seeds the shuffled order when the loader's own sampler has no generator (it must be
    the same on every rank); ``rank`` and ``world_size`` shard each global batch across DDP ranks.
    A loader already on a ``ResizableBatchSampler`` comes back as it is.
    """
    sampler = resizable_equivalent(loader, seed=seed, rank=rank, world_size=world_size)
    if sampler is loader.batch_sampler:
        return loader, sampler
    return with_batch_sampler(loader, sampler), sampler


def resizable_equivalent(
    loader: DataLoader[Any], *, seed: int, rank: int = 0, world_size: int = 1
) -> ResizableBatchSampler:
    """The :class:`ResizableBatchSampler` that walks the rows as ``loader`` would, or
    :class:`UnsupportedLoaderError` naming what stands in the way."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if isinstance(batch_sampler, ResizableBatchSampler):
        return batch_sampler
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise UnsupportedLoaderError(f"an iterable-style dataset ({type(dataset).__name__})")
    if batch_sampler is None:
        raise UnsupportedLoaderError("batch_size=None (no automatic batching)")
    if type(batch_sampler) is not BatchSampler:
        raise UnsupportedLoaderError(f"its own batch_sampler ({type(batch_sampler).__name__})")
    order = batch_sampler.sampler
    if isinstance(order, DistributedSampler):  # Lightning's use_distributed_sampler put it there
        shuffle, seed = bool(order.shuffle), int(order.seed)
    elif type(order) is RandomSampler:
        if order.replacement or order._num_samples is not None:
            raise UnsupportedLoaderError(
                "a RandomSampler drawing with replacement or a num_samples of its own"
            )
        shuffle = True
        if order.generator is not None:
            seed = int(order.generator.initial_seed())
    elif type(order) is SequentialSampler:
        shuffle = False
    else:
        raise UnsupportedLoaderError(f"a custom sampler ({type(order).__name__})")
    return ResizableBatchSampler(
        len(cast(Sized, dataset)),  # map-style (the iterable kind was refused above)
        batch_sampler.batch_size * world_size,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=batch_sampler.drop_last,
        # Per-row datasets get plain int indices, as from PyTorch's own samplers.
        index_lists=not callable(getattr(dataset, "__getitems__", None)),
    )


def adopt_train_loader(trainer: pl.Trainer, owner: Any) -> tuple[ResizableBatchSampler, bool]:
    """The fit's training sampler, made resizable, and whether the loader was rebuilt for it.

    The sampler the loader has (``TabularDataModule``'s, or the user's own
    :class:`ResizableBatchSampler`), else the loader rebuilt on one by :func:`make_resizable` and
    put in the Trainer's place (its iterator must then restart: the caller's job). From here on
    ``owner`` reports the trained batches (``sampler.position_owner``), so the sampler's saved
    position is right whatever the loader fetches ahead.
    """
    loader = trainer.train_dataloader
    existing = getattr(loader, "batch_sampler", None)
    if not isinstance(existing, ResizableBatchSampler):
        existing = getattr(getattr(trainer, "datamodule", None), "train_batch_sampler", None)
    rebuilt = False
    if isinstance(existing, ResizableBatchSampler):
        sampler = existing
    else:
        if not isinstance(loader, DataLoader):
            raise UnsupportedLoaderError(f"{type(loader).__name__} instead of one torch DataLoader")
        # One seed for every rank (an unseeded RandomSampler would draw its own on each).
        seed = int(torch.randint(2**31 - 1, ()).item())
        seed = int(trainer.strategy.broadcast(seed, src=0))
        loader, sampler = make_resizable(
            loader, seed=seed, rank=trainer.global_rank, world_size=trainer.world_size
        )
        replace_train_dataloader(trainer, loader)
        rebuilt = True
    sampler.position_owner = owner
    expose_loader_position(loader, sampler)  # Lightning then knows the loader resumes mid-epoch
    return sampler, rebuilt
