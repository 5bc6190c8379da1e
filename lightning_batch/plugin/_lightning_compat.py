"""Every use of Lightning's private attributes and helpers, in one place: the file to check on a
Lightning upgrade (written against Lightning 2.6).

The behaviour each function produces is tested through real fits (every row once per epoch, one
validation per epoch, a user's loader rebuilt with its own arguments), so an upgrade that moves
these attributes fails those tests loudly rather than silently dropping rows.
"""

from __future__ import annotations

import atexit
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.data import _reinstantiate_wrapped_cls, _replace_value_in_saved_args
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.pytorch.utilities.data import _get_dataloader_init_args_and_kwargs
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from lightning_batch.plugin.cadence import epoch_steps
from lightning_batch.plugin.sampler import ResizableBatchSampler


def sync_epoch_length(trainer: pl.Trainer, sampler: ResizableBatchSampler) -> None:
    """Tell the Trainer how many steps the current epoch now has, after a mid-epoch resize.

    Lightning reads the epoch's length when the fit starts (the combined loader's ``limits``, the
    loop's ``max_batches``, the end-of-epoch validation check ``val_check_batch``) and when each
    epoch starts (the data fetcher's stopping count). Call this after every resize and at every
    epoch start. A batch that grows would otherwise skip the epoch-end validation; one that
    shrinks would cut the epoch short and silently drop rows.
    """
    total = epoch_steps(sampler, trainer.limit_train_batches)
    fit_loop = trainer.fit_loop
    limit = trainer.limit_train_batches
    fit_loop.max_batches = total
    loader = getattr(fit_loop, "_combined_loader", None)
    if loader is not None:
        # The combined loader caps every later epoch at the length it had when the fit began.
        loader.limits = [limit if isinstance(limit, int) else (float("inf") if limit >= 1.0 else total)]
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    if fetcher is not None and fetcher.length is not None:
        fetcher.length = total
        fetcher.done = fetcher.fetched >= total
    interval = trainer.val_check_interval
    if isinstance(interval, float) and trainer.check_val_every_n_epoch is not None:
        trainer.val_check_batch = max(1, int(total * interval))


def scale_scheduler_lrs(scheduler: Any, ratio: float) -> None:
    """Multiply a torch lr scheduler's base lrs and its last computed lrs by ``ratio``, so the
    schedule goes on from the rescaled lr (``_last_lr`` is torch's private cache of the last lrs)."""
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [lr * ratio for lr in scheduler._last_lr]


def expose_loader_position(loader: Any, sampler: ResizableBatchSampler) -> None:
    """Give the training loader the ``state_dict``/``load_state_dict`` pair Lightning looks for.

    Lightning calls a training loader resumable when it has that pair (its ``_Stateful`` check),
    and otherwise warns on every mid-epoch resume that the results may be unreliable. The loader's
    position is its sampler's (the trained position: batches fetched ahead are handed out again),
    so the pair is the sampler's. A loader that has its own pair keeps it.
    """
    if not isinstance(loader, DataLoader) or loader.batch_sampler is not sampler:
        return
    if callable(getattr(loader, "state_dict", None)) or callable(getattr(loader, "load_state_dict", None)):
        return
    # Instance attributes: the loader keeps the user's class (a subclass would change what they built).
    loader.state_dict = sampler.state_dict
    loader.load_state_dict = sampler.load_state_dict


def drop_saved_loader_position(checkpoint: dict[str, Any], position: dict[str, Any] | None) -> None:
    """Take the loader position Lightning saved with the fit loop out of ``checkpoint``, where it is
    the callback's own (``position``).

    Lightning would load it into the training loader when the resumed fit sets up its data: the
    user's loader, before the callback puts its own back, and that loader has no state to load, so
    Lightning would refuse ("0 stateful loaders, but found 1 states"). The callback restores the
    same position itself once its loader is in place. Call from ``on_load_checkpoint``, which runs
    before the loops are restored from the same dictionary.
    """
    fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    if position is not None and fit_state.get("combined_loader") == [position]:
        del fit_state["combined_loader"]


def optimizer_step_done(trainer: pl.Trainer) -> bool:
    """Whether the batch that just ended closed an optimizer step (call from ``on_train_batch_end``).

    Always, without gradient accumulation; with ``accumulate_grad_batches = k``, every k-th batch
    and the epoch's last (the epoch loop's own test, which it keeps privately).
    """
    if trainer.accumulate_grad_batches == 1:
        return True
    return not trainer.fit_loop.epoch_loop._should_accumulate()


class StepBoundaries:
    """Where optimizer steps start once ``accumulate_grad_batches`` changes in the middle of an epoch.

    Lightning counts passes per epoch and closes a step when ``ready % k == 0`` (and zeroes the
    gradients when ``batch_idx % k == 0``): a new k set after, say, 6 passes would close the next
    step after 2 passes, not k, and start it without zeroing. The callback changes k only at a step
    boundary and records the epoch's pass count there (:meth:`restart`); steps then count from it.

    >>> boundaries = StepBoundaries()
    >>> boundaries.restart(epoch=0, passes_done=6)
    >>> [boundaries.passes_into_step(0, done) for done in (6, 7, 9)], boundaries.passes_into_step(1, 3)
    ([0, 1, 3], 3)
    """

    def __init__(self) -> None:
        self.epoch = -1
        self.offset = 0

    def restart(self, epoch: int, passes_done: int) -> None:
        """Steps of ``epoch`` start again after its first ``passes_done`` passes."""
        self.epoch, self.offset = epoch, passes_done

    def passes_into_step(self, epoch: int, passes_done: int) -> int:
        """Passes since the epoch's step boundaries restarted (all of them, in a later epoch)."""
        return passes_done - self.offset if epoch == self.epoch else passes_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def count_steps_from(trainer: pl.Trainer, boundaries: StepBoundaries) -> None:
    """Make the fit's loops close and open optimizer steps by ``boundaries`` (instance wrappers).

    Two private tests of the loops are replaced on this fit's loop instances: the epoch loop's
    "accumulated enough passes" and the automatic optimization's "first pass of a step, zero the
    gradients". Both read ``trainer.accumulate_grad_batches`` as it is now. Lightning still closes
    a step on the epoch's last pass, and still divides each pass's loss by k (equal passes: the
    mean over the step's rows).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    automatic = epoch_loop.automatic_optimization

    def passes_into_step(passes_done: int) -> int:
        return boundaries.passes_into_step(trainer.current_epoch, passes_done)

    def accumulated_batches_reached() -> bool:
        ready = epoch_loop.batch_progress.current.ready
        return passes_into_step(ready) % trainer.accumulate_grad_batches == 0

    def make_zero_grad_fn(batch_idx: int, optimizer: Any) -> Any:
        if automatic._skip_backward or passes_into_step(batch_idx) % trainer.accumulate_grad_batches:
            return None

        def zero_grad_fn() -> None:
            automatic._on_before_zero_grad(optimizer)
            automatic._optimizer_zero_grad(batch_idx, optimizer)

        return zero_grad_fn

    epoch_loop.__dict__["_accumulated_batches_reached"] = accumulated_batches_reached
    automatic.__dict__["_make_zero_grad_fn"] = make_zero_grad_fn


def passes_done_in_epoch(trainer: pl.Trainer) -> int:
    """The passes (batches) the epoch loop has run so far in this epoch."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


def release_step_counting(trainer: pl.Trainer) -> None:
    """Give the loops their own step tests back."""
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop.__dict__.pop("_accumulated_batches_reached", None)
    epoch_loop.automatic_optimization.__dict__.pop("_make_zero_grad_fn", None)


def uses_distributed_sampler(trainer: pl.Trainer) -> bool:
    """Whether the Trainer replaces samplers with a ``DistributedSampler`` (its
    ``use_distributed_sampler`` option, which it keeps privately)."""
    return bool(trainer._accelerator_connector.use_distributed_sampler)


def with_batch_sampler(loader: DataLoader[Any], batch_sampler: BatchSampler) -> DataLoader[Any]:
    """A copy of ``loader`` that draws its batches from ``batch_sampler``; every other argument the
    user gave (``collate_fn``, ``num_workers``, ``pin_memory``, ``worker_init_fn``, ``generator``...,
    and a ``DataLoader`` subclass's own arguments) is kept.

    It uses the re-instantiation Lightning uses to inject a ``DistributedSampler``: arguments saved
    when the loader was built inside a ``*_dataloader`` hook, else its attributes.
    """
    placeholder = SequentialSampler(range(0))  # replaced below; Lightning's helper wants a sampler
    args, kwargs = _get_dataloader_init_args_and_kwargs(loader, placeholder)
    arg_names = getattr(loader, "__pl_saved_arg_names", ())
    default_kwargs = getattr(loader, "__pl_saved_default_kwargs", {})
    # batch_sampler excludes batch_size, shuffle, sampler and drop_last: DataLoader's own rule.
    for key, value in (
        ("batch_sampler", batch_sampler),
        ("batch_size", 1),
        ("shuffle", False),
        ("sampler", None),
        ("drop_last", False),
    ):
        replaced, args, kwargs = _replace_value_in_saved_args(
            key, value, args, kwargs, default_kwargs, arg_names
        )
        if not replaced:
            kwargs[key] = value
    rebuilt: DataLoader[Any] = _reinstantiate_wrapped_cls(loader, *args, **kwargs)
    return rebuilt


def replace_train_dataloader(trainer: pl.Trainer, loader: DataLoader[Any]) -> None:
    """Make ``loader`` the fit's training loader (call from ``on_train_start``, then
    :func:`restart_train_iterator`)."""
    combined = trainer.fit_loop._combined_loader
    if combined is None or len(combined.flattened) != 1:
        raise RuntimeError("DynamicBatchSize supports exactly one training DataLoader")
    combined.flattened = [loader]


def restart_train_iterator(trainer: pl.Trainer) -> None:
    """Start the first epoch's iterator afresh from the current training loader and sampler state.

    The fit loop creates that iterator when it sets up the data, before ``on_train_start``: from
    the user's original loader, and, with worker processes, already fetching from a sampler whose
    resumed position was not yet restored. Dropping it shuts its workers down.
    """
    fit_loop = trainer.fit_loop
    fetcher = fit_loop._data_fetcher
    if fetcher is None or fit_loop._combined_loader is None:
        return
    fetcher.setup(fit_loop._combined_loader)
    iter(fetcher)


_teardown_registered = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group while the interpreter is still whole, whatever the backend.

    Lightning registers this for NCCL only. A gloo process group left for the interpreter's own
    finalisation can abort the process (``terminate called without an active exception``, exit
    status -6) after the fit has succeeded: its C++ worker threads still hold objects whose
    destructors need the interpreter (pytorch/pytorch#190489). Safe to call on every rank, any
    number of times; a no-op where no process group is left at exit.
    """
    global _teardown_registered
    if not _teardown_registered:
        atexit.register(_destroy_dist_connection)
        _teardown_registered = True
