"""The resizable sampler: an epoch is one pass over the rows, whatever the resizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_batch.plugin.sampler import ResizableBatchSampler


def _drain(sampler: ResizableBatchSampler, sizes: list[int]) -> list[torch.Tensor]:
    """Iterate one epoch, setting the next batch size from ``sizes`` before each step."""
    batches = []
    iterator = iter(sampler)
    step = 0
    while True:
        if step < len(sizes):
            sampler.batch_size = sizes[step]
        try:
            batches.append(next(iterator))
        except StopIteration:
            return batches
        step += 1


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 300),
    sizes=st.lists(st.integers(1, 64), min_size=0, max_size=40),
    shuffle=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_every_row_once_per_epoch_whatever_the_resizes(n, sizes, shuffle, seed):
    sampler = ResizableBatchSampler(n, batch_size=7, shuffle=shuffle, seed=seed)
    batches = _drain(sampler, sizes)
    seen = torch.cat(batches).tolist()
    assert sorted(seen) == list(range(n))
    # each step used the batch size in force when it was drawn (the tail may be shorter)
    for step, batch in enumerate(batches[:-1]):
        expected = sizes[step] if step < len(sizes) else (sizes[-1] if sizes else 7)
        assert len(batch) == expected
    # and the length reported at the end is the number of steps actually taken
    assert sampler.batches_yielded == len(batches)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 200),
    world=st.integers(2, 4),
    sizes=st.lists(st.integers(1, 40), min_size=0, max_size=30),
    seed=st.integers(0, 1000),
)
def test_ranks_partition_each_epoch_and_agree_on_step_count(n, world, sizes, seed):
    if n < world:
        return
    per_rank = []
    for rank in range(world):
        sampler = ResizableBatchSampler(n, batch_size=5, seed=seed, rank=rank, world_size=world)
        per_rank.append(_drain(sampler, sizes))
    steps = {len(b) for b in per_rank}
    assert len(steps) == 1, "ranks must take the same number of steps or DDP hangs"
    assert all(len(batch) >= 1 for batches in per_rank for batch in batches)
    union = torch.cat([torch.cat(b) for b in per_rank]).tolist()
    assert sorted(union) == list(range(n))


def test_len_is_honest_before_and_after_a_resize():
    sampler = ResizableBatchSampler(100, batch_size=10, shuffle=False)
    assert len(sampler) == 10
    iterator = iter(sampler)
    for _ in range(3):
        next(iterator)
    sampler.batch_size = 35  # 70 rows left: 2 more steps
    assert len(sampler) == 3 + 2
    assert sum(1 for _ in iterator) == 2


def test_tail_smaller_than_world_joins_the_previous_step():
    sampler = ResizableBatchSampler(11, batch_size=5, shuffle=False, rank=0, world_size=2)
    assert len(sampler) == 2  # 5 + 6, not 5 + 5 + 1 (a 1-row step would starve rank 1)
    assert [len(b) for b in sampler] == [3, 3]


def test_new_epoch_new_permutation_and_state_round_trip():
    sampler = ResizableBatchSampler(50, batch_size=8, seed=3)
    first = torch.cat(list(sampler))
    sampler.set_epoch(1)
    second = torch.cat(list(sampler))
    assert not torch.equal(first, second)
    assert sorted(second.tolist()) == list(range(50))
    # resume mid-epoch from a state_dict: the rest of the epoch is the rest of the same permutation
    sampler.set_epoch(2)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(2)]
    state = sampler.state_dict()
    resumed = ResizableBatchSampler(50, batch_size=1, seed=0)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert sorted(torch.cat(head + tail).tolist()) == list(range(50))
    assert torch.equal(torch.cat(head + tail), sampler.permutation(2))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="positive"):
        ResizableBatchSampler(10, batch_size=0)
    with pytest.raises(ValueError, match="ranks"):
        ResizableBatchSampler(1, batch_size=1, world_size=2)
    sampler = ResizableBatchSampler(10, batch_size=2)
    with pytest.raises(ValueError):
        sampler.batch_size = -3


def test_lightning_reaches_set_epoch_through_the_sampler_attribute():
    """Lightning calls set_epoch on ``batch_sampler.sampler``; the relay must reach the cursor."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = ResizableBatchSampler(20, batch_size=8, seed=1)
    loader = DataLoader(range(20), batch_sampler=sampler)
    list(iter(sampler))
    assert sampler.cursor == 20
    _set_sampler_epoch(loader, 5)
    assert (sampler.epoch, sampler.cursor) == (5, 0)
    assert torch.equal(torch.cat(list(sampler)), sampler.permutation(5))


# ---- gaps found by `make mutate` ------------------------------------------------------------------


def _global_steps(n: int, batch: int, world: int) -> list[int]:
    """Rows per global step of one epoch, from the documented rule alone: full batches, and a leftover
    smaller than ``world`` joins the step before it (a leftover of ``world`` rows or more is a step).
    The batch is clamped to at least ``world`` rows."""
    batch = max(batch, world)
    steps, left = [], n
    while left > 0:
        take = min(batch, left)
        if 0 < left - take < world:
            take = left
        steps.append(take)
        left -= take
    return steps


@pytest.mark.parametrize(
    ("n", "batch", "world"),
    [(1, 1, 1), (1, 4, 1), (6, 5, 2), (11, 5, 2), (12, 5, 2), (13, 5, 2), (14, 4, 3), (20, 5, 1), (9, 3, 4)],
)
def test_len_and_step_sizes_match_the_documented_rule(n, batch, world):
    expected = _global_steps(n, batch, world)
    lengths = []
    for rank in range(world):
        sampler = ResizableBatchSampler(n, batch_size=batch, shuffle=False, rank=rank, world_size=world)
        assert len(sampler) == sampler.remaining_batches() == len(expected)
        rows = []
        for step, local in enumerate(sampler):
            rows.append(sampler.last_global_rows)
            # len() stays honest mid-epoch: steps taken plus steps left
            assert len(sampler) == len(expected), (rank, step)
            assert sampler.remaining_batches() == len(expected) - step - 1
            assert len(local) >= 1
        assert rows == expected
        assert sampler.remaining_batches() == 0
        lengths.append(len(rows))
    assert len(set(lengths)) == 1


def test_len_after_the_last_batch_is_the_next_epochs_length():
    sampler = ResizableBatchSampler(100, batch_size=10, shuffle=False)
    assert len(list(sampler)) == 10
    assert len(sampler) == 10
    sampler.batch_size = 25  # resized after the last batch was drawn: next epoch has 4 steps
    assert len(sampler) == 4
    assert sampler.remaining_batches() == 0
    assert len(list(sampler)) == 4


def test_a_second_pass_without_set_epoch_is_the_next_epoch():
    """Plain PyTorch use: iterating again after a full pass starts epoch + 1 with its own order."""
    sampler = ResizableBatchSampler(30, batch_size=7, seed=4)
    later = ResizableBatchSampler(30, batch_size=7, seed=4)
    first = torch.cat(list(sampler))
    second = torch.cat(list(sampler))
    assert sampler.epoch == 1
    assert sorted(second.tolist()) == list(range(30))
    later.set_epoch(1)
    assert torch.equal(second, torch.cat(list(later)))
    assert not torch.equal(first, second)


def test_permutation_of_another_epoch_is_that_epochs_order():
    sampler = ResizableBatchSampler(40, batch_size=8, seed=2)
    ahead = sampler.permutation(5)  # asked for while still in epoch 0
    assert not torch.equal(ahead, sampler.permutation())
    sampler.set_epoch(5)
    assert torch.equal(torch.cat(list(sampler)), ahead)


def test_rewind_restarts_epoch_zero_by_default():
    sampler = ResizableBatchSampler(20, batch_size=5, seed=1)
    sampler.set_epoch(3)
    iterator = iter(sampler)
    next(iterator)
    sampler.rewind()
    assert (sampler.epoch, sampler.cursor, sampler.batches_yielded, len(sampler)) == (0, 0, 0, 4)
    fresh = ResizableBatchSampler(20, batch_size=5, seed=1)
    assert torch.equal(torch.cat(list(sampler)), torch.cat(list(fresh)))


def test_trained_position_is_saved_not_the_fetched_one():
    """A loader fetches ahead; state_dict must resume after the last *trained* batch."""
    sampler = ResizableBatchSampler(30, batch_size=4, seed=7)
    assert sampler.batch_trained() == 0  # nothing handed out yet
    iterator = iter(sampler)
    fetched = [next(iterator) for _ in range(3)]  # 12 rows fetched
    assert sampler.batch_trained() == 4
    assert sampler.last_global_rows == 4
    sampler.batch_size = 6
    next(iterator)  # a 6-row batch fetched, not trained
    assert sampler.batch_trained() == 4  # the oldest in flight: the second 4-row batch
    state = sampler.state_dict()
    assert (state["cursor"], state["batches_yielded"]) == (8, 2)
    resumed = ResizableBatchSampler(30, batch_size=1, seed=0)
    resumed.load_state_dict(state)
    rest = torch.cat(list(resumed))
    assert torch.equal(torch.cat([*fetched[:2], rest]), sampler.permutation())


def test_untrained_rows_count_from_the_last_trained_batch_not_the_fetched_one():
    sampler = ResizableBatchSampler(30, batch_size=4, seed=7)
    assert sampler.batch_trained() == 0  # a consumer reports trained batches (the callback does)
    iterator = iter(sampler)
    assert sampler.untrained_rows() == 30
    next(iterator), next(iterator)  # 8 rows fetched, none trained yet
    assert sampler.untrained_rows() == 30
    sampler.batch_trained()
    assert sampler.untrained_rows() == 26  # the second batch is only fetched
    sampler.batch_size = 6
    next(iterator)
    sampler.batch_trained(), sampler.batch_trained()
    assert sampler.untrained_rows() == 30 - 14
    unconsumed = ResizableBatchSampler(30, batch_size=4, seed=7)  # no consumer: fetched is trained
    next(iter(unconsumed))
    assert unconsumed.untrained_rows() == 26


def test_without_a_consumer_the_fetched_position_is_saved():
    sampler = ResizableBatchSampler(30, batch_size=4, seed=7)
    iterator = iter(sampler)
    for _ in range(3):
        next(iterator)
    assert sampler.last_global_rows == 4
    assert (sampler.state_dict()["cursor"], sampler.state_dict()["batches_yielded"]) == (12, 3)


def test_the_relay_sampler_covers_every_row():
    sampler = ResizableBatchSampler(9, batch_size=4)
    assert list(sampler.sampler) == list(range(9))
    assert len(sampler.sampler) == 9


def test_constructor_bounds_and_defaults():
    with pytest.raises(ValueError, match="positive"):
        ResizableBatchSampler(0, batch_size=1)
    with pytest.raises(ValueError, match="rank"):
        ResizableBatchSampler(10, batch_size=2, rank=2, world_size=2)
    sampler = ResizableBatchSampler(10, batch_size=3)
    assert (sampler.last_global_rows, sampler.drop_last) == (0, False)  # Lightning reads drop_last
    assert torch.equal(sampler.permutation(), ResizableBatchSampler(10, batch_size=3, seed=0).permutation())


def test_drop_last_leaves_out_the_short_tail_and_only_it():
    sampler = ResizableBatchSampler(10, batch_size=4, shuffle=False, drop_last=True)
    assert sampler.drop_last is True and len(sampler) == 2
    assert [b.tolist() for b in sampler] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sampler.state_dict()["cursor"] == 10 and len(sampler) == 2  # the epoch is over
    assert [len(b) for b in sampler] == [4, 4], "the next pass is the next epoch, tail dropped again"
    exact = ResizableBatchSampler(12, batch_size=4, shuffle=False, drop_last=True)
    assert [len(b) for b in exact] == [4, 4, 4], "a last batch that is exactly full is kept"
    assert ResizableBatchSampler(10, batch_size=4).drop_last is False


def test_index_lists_yield_plain_ints_and_nobody_owns_the_position_at_first():
    sampler = ResizableBatchSampler(5, batch_size=2, shuffle=False, index_lists=True)
    batches = list(sampler)
    assert batches == [[0, 1], [2, 3], [4]] and all(type(i) is int for b in batches for i in b)
    assert all(isinstance(b, torch.Tensor) for b in ResizableBatchSampler(5, 2))
    assert ResizableBatchSampler(5, 2).position_owner is None


def test_an_index_device_gets_the_same_batches_made_there():
    # The meta device stands in for an accelerator: it records where each index tensor was made
    # and its shape, which is all the sampler changes; the order itself is checked on the CPU.
    plain = ResizableBatchSampler(50, batch_size=8, seed=3, rank=1, world_size=2)
    placed = ResizableBatchSampler(50, batch_size=8, seed=3, rank=1, world_size=2)
    placed.index_device = torch.device("meta")
    expected, got = _drain(plain, [8, 8, 12]), _drain(placed, [8, 8, 12])
    assert [b.device.type for b in got] == ["meta"] * len(expected)
    assert [b.shape for b in got] == [b.shape for b in expected]
    assert placed.state_dict() == plain.state_dict()
    back_on_cpu = ResizableBatchSampler(50, batch_size=8, seed=3, rank=1, world_size=2)
    back_on_cpu.index_device = torch.device("cpu")
    assert all(torch.equal(a, b) for a, b in zip(_drain(back_on_cpu, [8, 8, 12]), expected, strict=True))
    lists = ResizableBatchSampler(5, batch_size=2, shuffle=False, index_lists=True)
    lists.index_device = torch.device("meta")
    assert list(lists) == [[0, 1], [2, 3], [4]], "index lists stay plain ints for row-by-row datasets"
