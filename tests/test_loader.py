"""The resizable loader without a Trainer: what make_resizable keeps of the user's loader and what it
refuses (the mutation target ``make mutate-loader``, with the loader tests of tests/test_plugin.py,
which fit through ``DynamicBatchSize``). The references are PyTorch's own loaders and samplers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from lightning_batch.plugin.loader import (
    UnsupportedLoaderError,
    adopt_train_loader,
    make_resizable,
    resizable_equivalent,
)
from lightning_batch.plugin.sampler import ResizableBatchSampler


def _rows(n: int = 10) -> TensorDataset:
    return TensorDataset(torch.arange(float(n)))


def _epoch(loader: DataLoader) -> list[list[float]]:
    return [batch[0].tolist() for batch in loader]


class _Batched(Dataset):
    """A dataset that gathers a whole batch at once (``__getitems__``), recording the index type."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: list[type] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return float(i)

    def __getitems__(self, indices):
        self.seen.append(type(indices))
        return [float(i) for i in indices]


def test_a_plain_loader_is_kept_in_order_batch_size_and_drop_last():
    for drop_last in (False, True):
        loader = DataLoader(_rows(10), batch_size=4, shuffle=False, drop_last=drop_last)
        resizable, sampler = make_resizable(loader, seed=0)
        assert resizable.batch_sampler is sampler and isinstance(sampler, ResizableBatchSampler)
        assert _epoch(resizable) == _epoch(loader), drop_last
        assert (sampler.rank, sampler.world_size, sampler.batch_size) == (0, 1, 4)


def test_a_loader_already_resizable_comes_back_as_it_is():
    sampler = ResizableBatchSampler(10, 3, shuffle=False)
    loader = DataLoader(_rows(10), batch_sampler=sampler)
    assert make_resizable(loader, seed=5) == (loader, sampler)
    assert resizable_equivalent(loader, seed=5) is sampler


def test_a_shuffled_loader_draws_every_row_once_in_a_seeded_order():
    loader = DataLoader(_rows(20), batch_size=6, shuffle=True)
    orders = []
    for seed in (1, 1, 2):
        resizable, sampler = make_resizable(loader, seed=seed)
        assert sampler.shuffle and sampler.seed == seed
        rows = [x for batch in _epoch(resizable) for x in batch]
        assert sorted(rows) == [float(i) for i in range(20)]
        orders.append(rows)
    assert orders[0] == orders[1] != orders[2]
    assert orders[0] != [float(i) for i in range(20)]


def test_a_random_sampler_with_its_own_generator_keeps_its_seed_over_the_one_given():
    def loader(seed: int) -> DataLoader:
        return DataLoader(
            _rows(20), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )

    samplers = [make_resizable(loader(s), seed=given)[1] for s, given in ((123, 1), (123, 2), (7, 1))]
    assert [s.seed for s in samplers] == [123, 123, 7]
    assert all(s.shuffle for s in samplers)


def test_lightnings_distributed_sampler_gives_its_shuffle_and_seed():
    rows = _rows(12)
    shuffled = DataLoader(rows, batch_size=3, sampler=DistributedSampler(rows, 1, 0, shuffle=True, seed=9))
    ordered = DataLoader(rows, batch_size=3, sampler=DistributedSampler(rows, 1, 0, shuffle=False, seed=9))
    a = resizable_equivalent(shuffled, seed=1)
    b = resizable_equivalent(ordered, seed=1)
    assert (a.shuffle, a.seed, b.shuffle, b.seed) == (True, 9, False, 9)
    assert (a.batch_size, a.rank, a.world_size) == (3, 0, 1), "one process by default"
    assert _epoch(make_resizable(ordered, seed=1)[0]) == _epoch(DataLoader(rows, batch_size=3))


def test_the_per_device_batch_is_one_ranks_share_of_the_global_batch():
    """batch_size=3 on each of two ranks: a global batch of 6, split between the ranks, every row once."""
    loader = DataLoader(_rows(12), batch_size=3, shuffle=False)
    shards = []
    for rank in (0, 1):
        resizable, sampler = make_resizable(loader, seed=0, rank=rank, world_size=2)
        assert (sampler.batch_size, sampler.rank, sampler.world_size) == (6, rank, 2)
        shards.append(_epoch(resizable))
    assert shards == [[[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]], [[1.0, 3.0, 5.0], [7.0, 9.0, 11.0]]]


def test_per_row_datasets_get_int_lists_and_batched_ones_one_index_tensor():
    """As PyTorch's BatchSampler: a list of ints for a dataset indexed row by row; a dataset with
    ``__getitems__`` gathers a batch at once, from one LongTensor."""
    reference = next(iter(BatchSampler(SequentialSampler(range(10)), 4, False)))
    _, per_row = make_resizable(DataLoader(_rows(10), batch_size=4), seed=0)
    first = next(iter(per_row))  # (the sampler keeps its place: the rest of the epoch follows)
    assert first == reference and all(type(i) is int for i in first)
    batched = _Batched(10)
    resizable, _ = make_resizable(DataLoader(batched, batch_size=4), seed=0)
    assert [b.tolist() for b in resizable] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]
    assert set(batched.seen) == {torch.Tensor}


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(4))


class _OwnBatches(BatchSampler):
    pass


class _OwnRandom(RandomSampler):
    pass


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda ds: DataLoader(_Stream(), batch_size=2), "an iterable-style dataset (_Stream)"),
        (lambda ds: DataLoader(ds, batch_size=None), "batch_size=None (no automatic batching)"),
        (
            lambda ds: DataLoader(ds, batch_sampler=_OwnBatches(SequentialSampler(ds), 2, False)),
            "its own batch_sampler (_OwnBatches)",
        ),
        (lambda ds: DataLoader(ds, batch_size=2, sampler=_OwnRandom(ds)), "a custom sampler (_OwnRandom)"),
        (
            lambda ds: DataLoader(ds, batch_size=2, sampler=RandomSampler(ds, replacement=True)),
            "a RandomSampler drawing with replacement or a num_samples of its own",
        ),
        (
            lambda ds: DataLoader(ds, batch_size=2, sampler=RandomSampler(ds, num_samples=10)),
            "a RandomSampler drawing with replacement or a num_samples of its own",
        ),
    ],
)
def test_a_loader_that_cannot_keep_every_row_once_is_refused_naming_why(make, named):
    with pytest.raises(UnsupportedLoaderError) as raised:
        make_resizable(make(_rows(10)), seed=0)
    message = str(raised.value)
    assert message.startswith(
        f"DynamicBatchSize cannot resize a training DataLoader with {named}; it supports "
    )
    assert "\n" not in message and isinstance(raised.value, ValueError)


class _Strategy:
    def broadcast(self, obj, src=0):
        return obj


class _Trainer:
    """What adopt_train_loader reads of a Trainer: the training loader, the DataModule, the ranks.
    It cannot take a rebuilt loader (no fit loop): a rebuild where none is due fails here."""

    def __init__(self, loader, datamodule=None) -> None:
        self.train_dataloader = loader
        self.datamodule = datamodule
        self.strategy = _Strategy()
        self.global_rank, self.world_size = 0, 1


def test_a_loader_on_the_users_resizable_sampler_is_adopted_as_it_is():
    sampler = ResizableBatchSampler(10, 3, shuffle=False)
    loader = DataLoader(_rows(10), batch_sampler=sampler)
    owner = object()
    assert adopt_train_loader(_Trainer(loader), owner) == (sampler, False)
    assert sampler.position_owner is owner
    assert loader.state_dict == sampler.state_dict, "Lightning sees the loader as resumable"


def test_the_datamodules_sampler_is_adopted_when_the_loader_does_not_show_it():
    """TabularDataModule's resizable sampler, under a loader whose batch_sampler is another object."""
    sampler = ResizableBatchSampler(10, 3, shuffle=False)
    loader = DataLoader(_rows(10), batch_size=3)
    datamodule = type("DataModule", (), {"train_batch_sampler": sampler})()
    owner = object()
    assert adopt_train_loader(_Trainer(loader, datamodule), owner) == (sampler, False)
    assert sampler.position_owner is owner


def test_a_training_loader_that_is_not_one_dataloader_is_refused_naming_its_type():
    with pytest.raises(
        UnsupportedLoaderError, match=r"with list instead of one torch DataLoader; it supports"
    ):
        adopt_train_loader(_Trainer([DataLoader(_rows(4), batch_size=2)]), object())
