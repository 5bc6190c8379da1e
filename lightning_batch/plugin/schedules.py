"""Step-interval lr schedules that advance by progress, so they end where their author planned.

A schedule stepped once per optimizer step (``CosineAnnealingLR`` with ``T_max =
trainer.estimated_stepping_batches``, a HuggingFace warm-up and decay) is written for the starting
batch: Lightning computed that number of steps at B0. When the batch grows, each optimizer step
trains more rows, and a schedule counted in steps ends late (the fit runs out of data with the lr
still high) or, when the batch shrinks, early.

:class:`ScheduleProgress` counts in *progress* instead: each optimizer step is worth its rows ÷ B0
starting-batch steps (``linear``, ``sqrt`` and ``none`` rules), or AdaScale's gain (its
"scale-invariant iterations"), and the scheduler is stepped once per whole step of progress, the
fractions carried over. At a fixed batch that is one scheduler step per optimizer step, as
without it. :func:`drive_step_schedulers` puts it between Lightning and the user's schedulers:
the user's scheduler objects stay as they are, only how many times they are stepped changes.

Examples:
    Twice the starting batch: two schedule steps per optimizer step; half: one every other step.

    >>> progress = ScheduleProgress()
    >>> [progress.steps(0, 2.0) for _ in range(3)], [progress.steps(1, 0.5) for _ in range(4)]
    ([2, 2, 2], [0, 1, 0, 1])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

__all__ = ["ScheduleProgress", "drive_step_schedulers", "release_step_schedulers", "rows_worth"]

#: A fraction this close below a whole step counts as the step (float sums of rows / B0).
_ROUNDING = 1e-9


class ScheduleProgress:
    """Per scheduler (by its index among the fit's schedulers): the progress not yet stepped."""

    def __init__(self) -> None:
        self.carry: dict[int, float] = {}

    def steps(self, index: int, progress: float) -> int:
        """How many scheduler steps an optimizer step worth ``progress`` starting-batch steps takes."""
        carry = self.carry.get(index, 0.0) + max(progress, 0.0)
        whole = math.floor(carry + _ROUNDING)
        self.carry[index] = max(carry - whole, 0.0)
        return whole

    def state_dict(self) -> dict[str, Any]:
        return {"carry": {str(i): c for i, c in self.carry.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carry = {int(i): float(c) for i, c in state.get("carry", {}).items()}


def rows_worth(rows: int, base_batch: int, epoch_rows: int, drop_last: bool = False) -> float:
    """The starting-batch steps a step of ``rows`` rows is worth, as the schedule's author counted them.

    An epoch had ``ceil(epoch_rows / base_batch)`` steps at the starting batch (a short last batch is
    a step too; with ``drop_last`` the short tail is not trained), and a schedule planned with that
    count must have taken exactly those steps when the epoch's rows are done, whatever the batch.

    >>> rows_worth(64, 16, 640), rows_worth(16, 16, 600), rows_worth(8, 16, 600)
    (4.0, 1.013..., 0.506...)
    """
    if base_batch <= 0 or epoch_rows <= 0:
        return 1.0
    steps = epoch_rows // base_batch if drop_last else -(-epoch_rows // base_batch)
    rows_in_steps = steps * base_batch if drop_last else epoch_rows
    return rows * steps / rows_in_steps if rows_in_steps else 1.0


def drive_step_schedulers(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    progress: ScheduleProgress,
    step_worth: Callable[[], float],
) -> bool:
    """Step the fit's step-interval schedulers by progress from now on; False where there are none.

    Lightning steps them through the module's ``lr_scheduler_step`` hook, once per optimizer step;
    the module gets an instance-level wrapper of that hook (its own, or Lightning's default) that
    calls it ``progress.steps(i, step_worth())`` times instead. Epoch-interval and plateau
    schedulers are left alone. Undo with :func:`release_step_schedulers`.
    """
    configs = [c for c in trainer.lr_scheduler_configs if c.interval == "step" and not c.reduce_on_plateau]
    if not configs or not pl_module.automatic_optimization:
        return False
    index = {id(c.scheduler): i for i, c in enumerate(trainer.lr_scheduler_configs)}
    driven = {id(c.scheduler) for c in configs}
    hook = pl_module.lr_scheduler_step  # bound: the user's override or Lightning's default

    def lr_scheduler_step(scheduler: Any, metric: Any) -> None:
        if id(scheduler) not in driven:
            hook(scheduler, metric)
            return
        for _ in range(progress.steps(index[id(scheduler)], step_worth())):
            hook(scheduler, metric)

    pl_module.__dict__["lr_scheduler_step"] = lr_scheduler_step  # this instance only, not its class
    return True


def release_step_schedulers(pl_module: pl.LightningModule) -> None:
    """Give the module its own ``lr_scheduler_step`` back."""
    pl_module.__dict__.pop("lr_scheduler_step", None)
