"""What the benchmarks share: a Trainer that does only training (no validation, checkpoints or bars),
the time-to-target clock, and the seed's plain PyTorch loop run against that clock."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

#: One evaluation of a run: (seconds on the clock, training rows seen, validation loss).
Point = tuple[float, int, float]


def training_only_trainer(**options: Any) -> pl.Trainer:
    """A CPU Trainer for timing training steps; ``options`` (max_steps, logger, callbacks...) override."""
    defaults: dict[str, Any] = dict(
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(options)
    return pl.Trainer(**defaults)


@dataclass
class TargetClock:
    """The clock rules every time-to-target run follows, Lightning or plain loop alike.

    After each training step the run reports its rows. Every tenth of an epoch of rows (and after
    the first step) the validation loss is evaluated while the clock is paused, so the benchmark's
    own evaluations cost no run anything. A run stops at the first evaluation at or below
    ``target``, at a non-finite loss, or once the clock passes ``budget_s``. A run that is
    suspended (while others of a race take their turn) keeps its clock still.
    """

    epoch_rows: int
    target: float | None
    budget_s: float
    points: list[Point] = field(default_factory=list)
    rows: int = 0
    paused: float = 0.0
    started: float | None = None
    suspended: float | None = None
    next_eval: int = 0

    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds on the clock: 0 before the start, still while suspended."""
        if self.started is None:
            return 0.0
        now = self.suspended if self.suspended is not None else time.perf_counter()
        return now - self.started - self.paused

    def suspend(self) -> None:
        self.suspended = time.perf_counter()

    def resume(self) -> None:
        if self.suspended is not None:
            self.paused += time.perf_counter() - self.suspended
            self.suspended = None

    def after_step(self, rows: int, val_loss: Callable[[], float]) -> bool:
        """Count a step's ``rows``; evaluate when due. True when the run should stop."""
        self.rows += rows
        if self.rows < self.next_eval:
            return self.elapsed() > self.budget_s
        pause = time.perf_counter()
        seconds = self.elapsed()
        loss = val_loss()
        self.points.append((seconds, self.rows, loss))
        self.next_eval = self.rows + max(1, self.epoch_rows // 10)
        self.paused += time.perf_counter() - pause
        reached = self.target is not None and loss <= self.target
        return reached or seconds > self.budget_s or not math.isfinite(loss)


def plain_step(
    model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    """One step of the seed's loop; returns the loss, read as a user printing it would (a host sync)."""
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def plain_loop(
    model: nn.Module,
    criterion: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    batch_size: int,
    lr: float,
    shuffle_seed: int,
    clock: TargetClock,
) -> Generator[None, None, bool]:
    """The seed's loop (SGD, a fresh permutation each epoch, index slicing of in-memory tensors, the
    loss read each step as a user printing it would) until ``clock`` stops it; returns whether the
    loss diverged (the project's TaskModule fails such a run at the same step).

    A generator: after each evaluation it yields with its clock suspended, so that a race can give
    another run its turn (iterate it to the end to run it alone). Epoch ``e`` uses the permutation
    ``ResizableBatchSampler`` draws (``seed + e``), taken in consecutive slices as it does: at equal
    (B, lr, initial weights) both loops walk the same rows in the same order, so a difference in
    samples to target is the framework's, not shuffling luck.
    """
    x, y = train
    x_val, y_val = val
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(criterion(model(x_val), y_val))
        model.train()
        return loss

    clock.start()
    epoch = 0
    while True:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(shuffle_seed + epoch))
        for i in range(0, len(x), batch_size):
            index = order[i : i + batch_size]
            if not math.isfinite(plain_step(model, criterion, optimizer, x[index], y[index])):
                return True
            evaluations = len(clock.points)
            if clock.after_step(len(index), val_loss):
                return False
            if len(clock.points) > evaluations:
                clock.suspend()
                yield
                clock.resume()
        epoch += 1
