"""A batch sampler whose batch size may change between any two steps of an epoch.

Why a sampler of our own: Lightning's data loaders fix the batch size when an epoch begins, and
its ``BatchSizeFinder`` can only change it between fits. This sampler reads :attr:`batch_size` at
every ``next()``, so a callback can resize the batches mid-epoch, and it keeps a cursor into the
epoch's permutation, so an epoch is exactly one pass over the data whatever the resizes were:
no row is skipped, none is repeated.

The batch size is *global*: the number of rows in one optimizer step summed over all DDP ranks.
Every rank walks the same seeded permutation and takes its own stride of each global batch, so
the ranks agree on the step count without talking to each other, and the union of what they see
in an epoch is the dataset exactly once.

A loader may fetch ahead of training (Lightning prefetches one batch to know which is the last),
so the sampler's cursor runs ahead of what was trained. The consumer reports each batch it trains
with :meth:`batch_trained`; :meth:`state_dict` then saves the *trained* position, and a fit resumed
from a mid-epoch checkpoint goes on with exactly the rows not yet trained.

Batches are yielded as one ``LongTensor`` of row indices: a tabular dataset answers with one
tensor index (see :class:`lightning_batch.tabular.tables.TensorTableDataset`), never a per-row collate.

Examples:
    >>> sampler = ResizableBatchSampler(10, batch_size=4, shuffle=False)
    >>> batches = iter(sampler)
    >>> next(batches).tolist()
    [0, 1, 2, 3]
    >>> sampler.batch_size = 2
    >>> [b.tolist() for b in batches]
    [[4, 5], [6, 7], [8, 9]]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler


class _EpochRelay:
    """Stands in as the batch sampler's ``.sampler``: Lightning calls ``set_epoch`` on
    ``batch_sampler.sampler``, never on the batch sampler itself, so this passes the call on."""

    def __init__(self, owner: ResizableBatchSampler) -> None:
        self._owner = owner

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._owner.num_samples))

    def __len__(self) -> int:
        return self._owner.num_samples

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class ResizableBatchSampler(BatchSampler):
    """Seeded per-epoch permutation, consumed by a cursor in batches of a changeable size.

    Args:
        num_samples: rows in the dataset.
        batch_size: global rows per step (all ranks together); clamped to at least ``world_size``.
        shuffle: a new seeded permutation each epoch (``seed + epoch``); else sequential order.
        seed: seed of the permutations; equal on all ranks.
        rank: this process's DDP rank.
        world_size: the number of DDP ranks.
        drop_last: end the epoch when fewer rows are left than a full batch (as ``DataLoader``'s
            ``drop_last``), instead of training them as a shorter last batch.
        index_lists: yield each batch as a list of ints (for datasets indexed row by row, which
            may not accept a tensor index) rather than one ``LongTensor``.

    :attr:`index_device` (None: the CPU) is where the yielded index tensors live. A dataset whose
    tables sit on an accelerator sets it to that device: the epoch's permutation crosses over once
    and each batch's index is a slice of it there, instead of a host tensor copied every step (a
    copy from pageable host memory makes the host wait for the device's queued work each step).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        index_lists: bool = False,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} rows cannot feed {world_size} ranks; use fewer devices")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.index_lists = index_lists
        self.index_device: torch.device | None = None
        #: Who reports trained batches (:meth:`batch_trained`); a DynamicBatchSize claims it, and
        #: TabularDataModule then leaves the reporting to it.
        self.position_owner: object | None = None
        # BatchSampler's __init__ validates batch_size and sets drop_last; its sampler only relays set_epoch.
        super().__init__(_EpochRelay(self), int(batch_size), drop_last=bool(drop_last))
        self.epoch = 0
        self.cursor = 0  # rows of this epoch's permutation already handed out (all ranks)
        self.batches_yielded = 0  # steps handed out this epoch
        self.last_global_rows = 0  # rows of the last step over all ranks (the same number on every rank)
        self._in_flight: deque[int] = deque()  # global rows of batches handed out but not yet trained
        self._tracks_training = False  # whether a consumer reports trained batches

    # BatchSampler.__init__ assigns self.batch_size, which goes through this setter.
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {value!r}")
        # Every rank needs at least one row per step, or DDP's collective calls would hang.
        self._batch_size = max(int(value), self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start (through ``.sampler``); a new epoch restarts the cursor."""
        if epoch != self.epoch:
            self.rewind(epoch)

    def rewind(self, epoch: int = 0) -> None:
        """Start ``epoch`` from its first row, keeping the batch size (even if it is the current epoch)."""
        self.epoch = epoch
        self.cursor = 0
        self.batches_yielded = 0
        self._in_flight.clear()

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The order of rows in ``epoch`` (the current one by default), identical on every rank."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def _next_take(self, remaining: int) -> int:
        """Global rows for the next step: a full batch, or the tail if what would be left is too small.

        A leftover smaller than ``world_size`` would leave some rank without a row, so it joins the
        step before it. With ``drop_last`` a tail shorter than a batch is not taken at all (0).
        """
        if self.drop_last:
            return self._batch_size if remaining >= self._batch_size else 0
        take = min(self._batch_size, remaining)
        if 0 < remaining - take < self.world_size:
            take = remaining
        return take

    def _steps_for(self, rows: int) -> int:
        """Steps that ``rows`` rows take at the current batch size (a tail too small for every rank joins
        the step before it, as :meth:`_next_take` does)."""
        if rows <= 0:
            return 0
        full, tail = divmod(rows, self._batch_size)
        if self.drop_last:
            return full
        if tail == 0 or (tail < self.world_size and full > 0):
            return full
        return full + 1

    def untrained_batches(self) -> int:
        """Batches this epoch still trains at the current size, counted from the last batch trained (a
        batch fetched ahead is not trained yet)."""
        return self._steps_for(self.untrained_rows())

    def untrained_rows(self) -> int:
        """Rows (global) this epoch has still to train, counted from the last batch trained (a batch
        fetched ahead is not trained yet)."""
        ahead = sum(self._in_flight) if self._tracks_training else 0
        return self.num_samples - (self.cursor - ahead)

    def remaining_batches(self) -> int:
        """Steps left in this epoch if the batch size stays as it is now."""
        return self._steps_for(self.num_samples - self.cursor)

    def __len__(self) -> int:
        """Steps in the current epoch: those already taken plus those left at the current size.

        Honest at every moment; after a resize the Trainer must be told (see
        :func:`lightning_batch.plugin.callback.sync_epoch_length`).
        """
        if self.cursor >= self.num_samples:  # finished: the next iteration is a fresh epoch
            return self._steps_for(self.num_samples)
        return self.batches_yielded + self.remaining_batches()

    # A LongTensor of indices (one gather by a batched dataset), or a list where index_lists says so.
    def __iter__(self) -> Iterator[torch.Tensor | list[int]]:  # type: ignore[override]
        if self.cursor >= self.num_samples:
            # The previous pass ran to the end without a set_epoch (plain PyTorch use): next epoch.
            self.set_epoch(self.epoch + 1)
        order = self.permutation()
        if self.index_device is not None and not self.index_lists:
            # Once an epoch; each batch is then a slice there. Pinned first on CUDA, so that even
            # this copy does not wait for the device's queued work.
            if self.index_device.type == "cuda":
                order = order.pin_memory()
            order = order.to(self.index_device, non_blocking=True)
        while self.cursor < self.num_samples:
            take = self._next_take(self.num_samples - self.cursor)
            if take == 0:  # drop_last: the rows left make no full batch; the epoch is over
                self.cursor = self.num_samples
                break
            global_batch = order[self.cursor : self.cursor + take]
            self.cursor += take
            self.batches_yielded += 1
            self._in_flight.append(take)
            if not self._tracks_training:
                self.last_global_rows = take
            local = global_batch[self.rank :: self.world_size]
            yield local.tolist() if self.index_lists else local

    def batch_trained(self) -> int:
        """The consumer trained the oldest batch handed out: its global rows (also ``last_global_rows``)."""
        self._tracks_training = True
        if not self._in_flight:
            return 0
        self.last_global_rows = self._in_flight.popleft()
        return self.last_global_rows

    def state_dict(self) -> dict[str, Any]:
        """The position after the last *trained* batch (batches fetched ahead are handed out again)."""
        ahead = list(self._in_flight) if self._tracks_training else []
        return {
            "epoch": self.epoch,
            "cursor": self.cursor - sum(ahead),
            "batches_yielded": self.batches_yielded - len(ahead),
            "batch_size": self._batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.batches_yielded = int(state["batches_yielded"])
        self._in_flight.clear()
        self.batch_size = int(state["batch_size"])
        self.seed = int(state["seed"])
