"""The passes of an optimizer step: how a batch beyond the memory ceiling still trains as one step.

A policy chooses the rows of an optimizer step. Memory bounds the rows of one forward/backward pass.
When the step is larger than what fits, it runs as several equal passes whose gradients add up
before one optimizer step. That is Lightning's own gradient accumulation, so any module with
automatic optimization gets it: :class:`StepPasses` raises the loop's ``accumulate_grad_batches``
and the sampler serves the smaller passes. Lightning divides each pass's loss by the number of
passes, so equal passes give the gradient of the mean over the step's rows, as one big pass would.

A module with manual optimization runs its own backward passes, and Lightning's accumulation does
not reach it. Such a module can still go beyond the ceiling by splitting its steps itself, as
``TaskModule`` does: it declares a public ``max_rows_per_pass`` attribute (:class:`SplitsItsPasses`),
which the callback sets to a rank's share of the ceiling.

Examples:
    A step of 512 rows where one pass holds at most 128 rows, on a Trainer with
    ``accumulate_grad_batches=2`` (the user's own): 2 x 2 passes of 128.

    >>> passes = StepPasses(user_passes=2)
    >>> passes.split(512, ceiling=128), passes.split(200, ceiling=128), passes.split(96, ceiling=None)
    ((128, 4), (100, 2), (48, 2))
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl

from lightning_batch.plugin._lightning_compat import (
    StepBoundaries,
    count_steps_from,
    passes_done_in_epoch,
    release_step_counting,
)

__all__ = ["SplitsItsPasses", "StepPasses"]


@runtime_checkable
class SplitsItsPasses(Protocol):
    """A manual-optimization module that runs each step's rows in passes of at most
    ``max_rows_per_pass`` rows (None: one pass), as ``TaskModule`` does."""

    max_rows_per_pass: int | None


class StepPasses:
    """The passes per optimizer step: the user's ``accumulate_grad_batches``, times as many as the
    memory ceiling needs (only ever changed at an optimizer step's boundary)."""

    def __init__(self, user_passes: int = 1) -> None:
        #: The Trainer's ``accumulate_grad_batches`` as the user set it: the policy's unit is their step.
        self.user_passes = user_passes
        #: Passes per optimizer step now (``user_passes`` times the passes the ceiling needs).
        self.passes = user_passes
        self.boundaries = StepBoundaries()
        self._trainer: pl.Trainer | None = None

    def split(self, step_rows: int, ceiling: int | None) -> tuple[int, int]:
        """``(rows of one pass, passes)`` for a step of ``step_rows`` global rows, when one pass holds
        at most ``ceiling`` global rows (None: no bound).

        The passes are equal, so the step's rows are ``pass rows x passes`` (within rounding of
        ``step_rows``), and Lightning's division of each pass's loss by the passes gives the mean.
        """
        splits = 1 if not ceiling else max(1, math.ceil(step_rows / (self.user_passes * ceiling)))
        passes = self.user_passes * splits
        return max(1, round(step_rows / passes)), passes

    @property
    def in_charge(self) -> bool:
        """Whether this fit's optimizer steps follow :meth:`set` (Lightning's accumulation is ours)."""
        return self._trainer is not None

    def take_over(self, trainer: pl.Trainer) -> None:
        """From now on this fit's optimizer steps open and close where :meth:`set` says."""
        self._trainer = trainer
        count_steps_from(trainer, self.boundaries)

    def set(self, trainer: pl.Trainer, passes: int) -> None:
        """``passes`` per optimizer step from the next step on (call at a step's boundary)."""
        if passes == self.passes and trainer.accumulate_grad_batches == passes:
            return
        self.passes = passes
        trainer.accumulate_grad_batches = passes
        self.boundaries.restart(trainer.current_epoch, passes_done_in_epoch(trainer))

    def last_step_of_epoch(self, trainer: pl.Trainer, passes_left: int, passes_done: int) -> None:
        """At a step's first pass, ``passes_left`` passes (this one included) left in the epoch after
        its first ``passes_done``: if they are fewer than a step's, the epoch's last step has just
        those, so Lightning divides their losses by their own number (the mean over the step's rows,
        not a fraction of it). :meth:`epoch_starts` undoes it."""
        if 0 < passes_left < self.passes:
            trainer.accumulate_grad_batches = passes_left
            self.boundaries.restart(trainer.current_epoch, passes_done)

    def epoch_starts(self, trainer: pl.Trainer) -> None:
        """A new epoch: full steps again."""
        trainer.accumulate_grad_batches = self.passes

    def release(self) -> None:
        """The fit is over: the loops' own step tests, and the user's ``accumulate_grad_batches``."""
        trainer, self._trainer = self._trainer, None
        if trainer is not None:
            release_step_counting(trainer)
            trainer.accumulate_grad_batches = self.user_passes

    def state_dict(self) -> dict[str, Any]:
        return {"user_passes": self.user_passes, "passes": self.passes, **self.boundaries.state_dict()}

    def load_state_dict(self, trainer: pl.Trainer, state: dict[str, Any]) -> None:
        """Resume with the saved passes per step, counted from the saved boundary."""
        self.user_passes, self.passes = int(state["user_passes"]), int(state["passes"])
        trainer.accumulate_grad_batches = self.passes
        self.boundaries.load_state_dict(state)
