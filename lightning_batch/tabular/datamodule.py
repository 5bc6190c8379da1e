"""``TabularDataModule``: the tabular pipeline as a Lightning DataModule whose training batch may change size.

The steps (:mod:`~lightning_batch.tabular.sources` read, :mod:`~lightning_batch.tabular.cleaning`
clean, :mod:`~lightning_batch.tabular.splitting` split, :mod:`~lightning_batch.tabular.preprocessing`
scale on train only, :mod:`~lightning_batch.tabular.tables` serve) run once in :meth:`setup`; the
training loader draws its batches from a :class:`~lightning_batch.plugin.sampler.ResizableBatchSampler`.

Examples:
    >>> dm = TabularDataModule(data="iris", batch_size=16, seed=0)
    >>> dm.setup()
    >>> (dm.task, dm.n_features, dm.n_outputs, len(dm.train_set))
    ('classification', 4, 3, 106)
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), y.dtype
    ((16, 4), torch.int64)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.plugin._lightning_compat import uses_distributed_sampler
from lightning_batch.plugin.sampler import ResizableBatchSampler
from lightning_batch.tabular.prepare import SourceDescriber, prepare_data
from lightning_batch.tabular.tables import PreparedData, TensorTableDataset, keep_batch


def _nothing_trained(sampler_state: dict[str, Any]) -> bool:
    """Whether a saved sampler position is the start of training (epoch 0, no batch trained)."""
    return int(sampler_state["epoch"]) == 0 and int(sampler_state["cursor"]) == 0


class TabularDataModule(pl.LightningDataModule):
    """Tabular data for a Lightning fit, with a training batch size that may change between steps.

    ``batch_size`` is global (all DDP ranks together); setting it takes effect at the next step.
    Under DDP, build the Trainer with ``use_distributed_sampler=False``: the sampler shards the
    batches itself (Lightning's replacement would freeze the size).

    Args:
        config: a :class:`RunConfig`; keyword arguments override its fields.
        eval_batch_size: rows per validation/test batch (they never change the model).
        describe_source: what the data cache records of the source it read (the training path
            passes the MLflow dataset input's fields, so a run reading the cache still records it).
    """

    def __init__(
        self,
        config: RunConfig | None = None,
        *,
        eval_batch_size: int = 4096,
        describe_source: SourceDescriber | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.describe_source = describe_source
        base = config.to_dict() if config is not None else {}
        self.config = RunConfig.from_mapping({**base, **options}, origin="TabularDataModule").validate()
        self.eval_batch_size = eval_batch_size
        self.prepared: PreparedData | None = None
        #: Where the tables are: ``host`` (CPU training), ``device`` (moved to the accelerator once) or
        #: ``pinned`` (host memory, each batch pinned and copied asynchronously); see place_tables.
        self.data_placement = "host"
        self._train_sampler: ResizableBatchSampler | None = None
        self._pending_sampler_state: dict[str, Any] | None = None

    # -- data ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.prepared is None:  # idempotent: Lightning calls setup per stage
            self.prepared = prepare_data(self.config, self.describe_source)
            self.config = self.config.replace(task=self.prepared.task)
        if self.trainer is not None:
            self.place_tables(self.trainer.strategy.root_device)

    def teardown(self, stage: str | None = None) -> None:
        # Give the accelerator's memory back once a fit or test is over (the next stage's setup
        # moves the tables again: one copy, not one per step).
        if self.prepared is not None and self.data_placement == "device":
            self.place_tables(torch.device("cpu"))

    def place_tables(self, device: torch.device) -> str:
        """Put the tables where the model trains: on ``device`` when they fit the budget
        (``device_data_budget`` of its free memory), so a batch is an index there and no step copies
        rows from the host; else in host memory, batches pinned for asynchronous copies (CUDA).
        Returns and records the choice in :attr:`data_placement` (``device``, ``pinned`` or ``host``)."""
        data = self._data()
        tables = (data.train, data.val, data.test)
        placement = "host"
        if device.type == "cuda":
            need = sum(t.nbytes for t in tables if t.device != device)
            free, _ = torch.cuda.mem_get_info(device)
            placement = "device" if need <= self.config.device_data_budget * free else "pinned"
        elif device.type == "mps" and self.config.device_data_budget > 0:
            placement = "device"
        target = device if placement == "device" else torch.device("cpu")
        for table in tables:
            if table.device != target:
                table.to_(target)
        self.data_placement = placement
        return placement

    def _data(self) -> PreparedData:
        if self.prepared is None:
            self.setup()
        assert self.prepared is not None
        return self.prepared

    @property
    def task(self) -> str:
        return self._data().task

    @property
    def n_features(self) -> int:
        return self._data().n_features

    @property
    def n_outputs(self) -> int:
        return self._data().n_outputs

    @property
    def target_scaling(self) -> tuple[float, float] | None:
        """A regression target's ``(mean, scale)`` on train when it is standardised (``scale_target``)."""
        return self._data().preprocessor.target_scaling

    @property
    def train_set(self) -> TensorTableDataset:
        return self._data().train

    @property
    def val_set(self) -> TensorTableDataset:
        return self._data().val

    @property
    def test_set(self) -> TensorTableDataset:
        return self._data().test

    # -- batch size ------------------------------------------------------------------------------
    def initial_batch_size(self) -> int:
        """The configured batch size as a number (``full`` is every training row; ``auto`` starts at base_batch)."""
        size = self.config.batch_size
        if size == "full":
            return len(self.train_set)
        if size == "auto":
            size = self.config.base_batch
        return min(int(size), len(self.train_set))

    @property
    def batch_size(self) -> int:
        """Global training rows per step; changeable between steps."""
        if self._train_sampler is not None:
            return self._train_sampler.batch_size
        return self.initial_batch_size()

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.train_batch_sampler.batch_size = int(value)

    @property
    def train_batch_sampler(self) -> ResizableBatchSampler:
        if self._train_sampler is None:
            rank, world = self._rank_and_world()
            self._train_sampler = ResizableBatchSampler(
                len(self.train_set),
                self.initial_batch_size(),
                shuffle=self.config.shuffle,
                seed=self.config.seed,
                rank=rank,
                world_size=world,
            )
            if self._pending_sampler_state is not None:
                self._train_sampler.load_state_dict(self._pending_sampler_state)
                self._pending_sampler_state = None
        return self._train_sampler

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        if trainer.world_size > 1 and uses_distributed_sampler(trainer):
            raise UserError(
                "TabularDataModule shards batches itself under DDP; build the Trainer with "
                "use_distributed_sampler=False"
            )
        return trainer.global_rank, trainer.world_size

    # -- loaders ---------------------------------------------------------------------------------
    def _index_device(self, dataset: TensorTableDataset) -> torch.device | None:
        # Tables on the accelerator: the batches' indices are made there too (see the sampler's
        # index_device), so a step copies nothing from the host.
        return dataset.device if self.data_placement == "device" else None

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_batch_sampler
        sampler.index_device = self._index_device(self.train_set)
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            collate_fn=keep_batch,
            pin_memory=self.data_placement == "pinned",
        )

    def _eval_loader(self, dataset: TensorTableDataset) -> DataLoader:
        # Every rank evaluates the whole split: the numbers agree across ranks without a sampler.
        sampler = ResizableBatchSampler(len(dataset), min(self.eval_batch_size, len(dataset)), shuffle=False)
        sampler.index_device = self._index_device(dataset)
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=keep_batch, pin_memory=self.data_placement == "pinned"
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this once per batch it is about to train, in order, after fetching ahead:
        # the sampler learns which of its batches were really trained (for exact mid-epoch resume).
        trainer = self.trainer
        sampler = self._train_sampler
        if (
            trainer is not None
            and trainer.training
            and sampler is not None
            and sampler.position_owner is None
        ):
            sampler.batch_trained()
        return batch

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"train_sampler": self._train_sampler.state_dict() if self._train_sampler else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sampler_state = state_dict.get("train_sampler")
        if sampler_state is None or _nothing_trained(sampler_state):
            # A checkpoint from before the first training batch (Lightning's BatchSizeFinder saves
            # one, runs trial steps, then restores it): training restarts at the first row of
            # epoch 0, at the batch size chosen meanwhile (the finder's), not the one saved.
            self._pending_sampler_state = None
            if self._train_sampler is not None:
                self._train_sampler.rewind()
            return
        if self._train_sampler is not None:
            self._train_sampler.load_state_dict(sampler_state)
        else:
            self._pending_sampler_state = sampler_state
