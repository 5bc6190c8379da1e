"""A training loss computed outside Lightning's loop: the memory probe's trial steps and the noise
measurement's micro-batches.

:class:`~lightning_batch.plugin.callback.DynamicBatchSize` needs, twice, the loss the fit trains on
for a batch it builds itself: the memory probe times and weighs a few trial steps before training,
and the micro-batch fall-back of the noise measurement computes the gradients of parts of a batch.
:class:`StepLoss` gives that loss one of two ways:

- the module's ``loss(self(inputs), targets)`` (:class:`LossModule`), on batches of the form
  ``(inputs, targets, ...)``: cheap, and nothing in ``training_step`` runs;
- else the module's own ``training_step``, as Lightning's ``BatchSizeFinder`` does: any batch the
  loader makes (dicts, HuggingFace's ``BatchEncoding``, tuples), under the precision plugin's
  train-step context, with ``self.log`` silenced so the trial steps leave no metrics. Only under
  automatic optimization: a manual ``training_step`` steps the optimizers itself.

Trial batches come through the user's own dataset, collate and batch transfer hooks, so they are
what the loader would make. :meth:`StepLoss.for_fit` says in one line why neither way works, when
neither does.

Examples:
    >>> import lightning.pytorch as pl
    >>> from lightning.pytorch.demos.boring_classes import BoringModel
    >>> from torch.utils.data import DataLoader
    >>> from lightning.pytorch.demos.boring_classes import RandomDataset
    >>> class Probe(pl.Callback):
    ...     def on_train_start(self, trainer, pl_module):
    ...         self.step_loss = StepLoss.for_fit(trainer, pl_module)
    ...         self.loss = self.step_loss.trial_loss(torch.arange(4))
    >>> probe = Probe()
    >>> trainer = pl.Trainer(max_steps=1, callbacks=[probe], logger=False, enable_progress_bar=False,
    ...                      enable_model_summary=False, enable_checkpointing=False)
    >>> trainer.fit(BoringModel(), DataLoader(RandomDataset(32, 64), batch_size=2))
    >>> probe.step_loss.kind, probe.loss.dim()
    ('training_step', 0)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["LossModule", "StepLoss"]


@runtime_checkable
class LossModule(Protocol):
    """A LightningModule that offers a cheaper loss than its ``training_step``.

    ``loss(prediction, target)``: the training loss of ``self(inputs)`` on a batch ``(inputs,
    targets, ...)``, a mean over its rows. With it the memory probe's trial steps and the noise
    measurement's micro-batches skip ``training_step``; without it (or on batches of another form,
    such as dicts) they run ``training_step`` instead.
    """

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor: ...


class StepLoss:
    """The training loss of batches the callback builds: ``kind`` is ``"loss"`` or ``"training_step"``.

    Build it with :meth:`for_fit`, once the fit's training loader exists.
    """

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, kind: str) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self.kind = kind
        #: One line for the user when ``loss()`` was passed over (None when there is nothing to say).
        self.note: str | None = None

    @classmethod
    def for_fit(cls, trainer: pl.Trainer, pl_module: pl.LightningModule) -> StepLoss | str:
        """The way this fit's batches get a loss, or one line saying why there is none."""
        example = cls(trainer, pl_module, "loss").trial_batch(torch.arange(min(2, _rows(trainer))))
        has_loss = isinstance(pl_module, LossModule)
        has_forward = type(pl_module).forward is not pl.LightningModule.forward
        pair = _is_pair(example)
        if has_loss and has_forward and pair:
            return cls(trainer, pl_module, "loss")
        if not pl_module.automatic_optimization:
            why = "manual optimization (its training_step steps the optimizers itself)"
            if has_loss:
                return f"{why}, and loss() takes (inputs, targets, ...) batches, not {_describe(example)}"
            return f"{why}, and no loss(prediction, target) method to run on (inputs, targets) batches"
        step_loss = cls(trainer, pl_module, "training_step")
        if has_loss and not has_forward:
            step_loss.note = (
                f"{type(pl_module).__name__}.loss() is applied to the module's forward(), which it does not "
                "define: the memory probe and the micro-batches run training_step instead"
            )
        elif has_loss:
            step_loss.note = (
                f"{type(pl_module).__name__}.loss() takes (inputs, targets, ...) batches and this loader makes "
                f"{_describe(example)}: the memory probe and the micro-batches run training_step instead"
            )
        return step_loss

    # -- batches --------------------------------------------------------------------------------------

    def trial_batch(self, index: Tensor) -> Any:
        """The rows ``index`` of this rank's training data, as the loader makes them: the dataset's
        batched read (``__getitems__``) or its rows, the loader's collate, the module's transfer hooks."""
        loader = self.trainer.train_dataloader
        assert loader is not None
        dataset = loader.dataset
        if callable(getattr(dataset, "__getitems__", None)):
            rows = dataset.__getitems__(index.tolist())
        else:
            rows = [dataset[int(i)] for i in index]
        batch = loader.collate_fn(rows)
        return self.trainer.strategy.batch_to_device(batch)

    def trial_loss(self, index: Tensor) -> Tensor:
        """The loss of the trial batch of rows ``index`` (a memory probe's step)."""
        return self(self.trial_batch(index))

    # -- the loss -------------------------------------------------------------------------------------

    def __call__(self, batch: Any) -> Tensor:
        """The training loss of ``batch`` (on the module's device), with a graph to differentiate."""
        module = self.pl_module
        if self.kind == "loss":
            assert isinstance(module, LossModule)
            with self.trainer.precision_plugin.forward_context():
                return module.loss(module(batch[0]), batch[1])
        with self.trainer.precision_plugin.train_step_context(), _logging_silenced(module):
            output = module.training_step(batch, 0)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor):
            raise ValueError(
                f"{type(module).__name__}.training_step returned {type(output).__name__}, not a loss tensor "
                "(or a dict with 'loss'): the callback cannot build a trial step from it"
            )
        return loss


@contextlib.contextmanager
def _logging_silenced(module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing inside: trial steps are not training steps."""

    def ignore(*args: Any, **kwargs: Any) -> None:
        return None

    module.__dict__["log"] = ignore
    module.__dict__["log_dict"] = ignore
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


def _rows(trainer: pl.Trainer) -> int:
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    return max(1, len(dataset)) if dataset is not None and hasattr(dataset, "__len__") else 1


def _is_pair(batch: Any) -> bool:
    """``(inputs, targets, ...)``: a tuple or list whose first two items are tensors."""
    return (
        isinstance(batch, Sequence)
        and not isinstance(batch, str)
        and len(batch) >= 2
        and all(isinstance(item, Tensor) for item in batch[:2])
    )


def _describe(batch: Any) -> str:
    """A batch's form in a few words (for one-line messages)."""
    if isinstance(batch, Mapping):
        keys = ", ".join(repr(k) for k in list(batch)[:4])
        return f"{type(batch).__name__} batches ({keys}{', ...' if len(batch) > 4 else ''})"
    return f"{type(batch).__name__} batches"
