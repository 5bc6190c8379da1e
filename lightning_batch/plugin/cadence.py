"""When :class:`~lightning_batch.plugin.callback.DynamicBatchSize` decides, and the numbers a resize writes.

The callback is glue between the Trainer and the policy; the arithmetic of that glue lives here,
free of Lightning, so it can be tested (and mutation-tested) without a Trainer:

- :class:`DecisionCadence`: the steps at which a decision falls;
- :class:`DecisionsKept`: the decision points that kept the batch, and why;
- :func:`effective_ceiling`: the largest batch a decision may choose, from the memory probe, the
  out-of-memory recoveries and the size of the data;
- :func:`epoch_steps`: how many steps the current epoch has after a mid-epoch resize, which the
  Trainer must be told (see :func:`lightning_batch.plugin.callback.sync_epoch_length`).

The documented cadence: a decision falls at the end of the step where at least ``adjust_every``
steps went by since the previous decision, or sooner, once a quarter of an epoch's rows went by
(a large batch makes few steps an epoch); but never before ``min_steps`` steps at the current size
(the ``goodput`` policy times that many steps of each size for its throughput model; the other
policies need no timings and use ``min_steps=1``). With ``warmup=W``, the first ``W`` decisions
come sooner: the k-th (from 0) after ``adjust_every`` and ``min_steps`` divided by ``2**(W - k)``
(at least 1): the first few dozen steps carry the most information per second, and a batch that
should grow is worth growing early. :class:`~lightning_batch.plugin.callback.DynamicBatchSize` uses
``warmup=2`` (:data:`WARMUP_DECISIONS`): with the defaults, decisions after 5, 10, then every 20 steps.

Examples:
    >>> def decision_steps(cadence, rows, epoch_rows=1000, steps=9):
    ...     due = []
    ...     for step in range(1, steps + 1):
    ...         if cadence.step_done(rows, epoch_rows):
    ...             due.append(step)
    ...             cadence.reset()  # the callback decides, then counts afresh
    ...     return due
    >>> decision_steps(DecisionCadence(adjust_every=3), rows=8)
    [3, 6, 9]
    >>> decision_steps(DecisionCadence(adjust_every=50), rows=100)  # a quarter epoch every 3 steps
    [3, 6, 9]
    >>> decision_steps(DecisionCadence(adjust_every=2, min_steps=4), rows=8)  # goodput timing 4 steps
    [4, 8]
    >>> decision_steps(DecisionCadence(adjust_every=4, warmup=2), rows=8, steps=12)  # after 1, 2, then 4
    [1, 3, 7, 11]
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Any

from lightning_batch.plugin.checks import checked, count, fraction, positive_int

if TYPE_CHECKING:  # the config imports this module's defaults and must not pull in torch
    from lightning_batch.plugin.sampler import ResizableBatchSampler

log = logging.getLogger(__name__)

#: The share of an epoch's rows after which a decision falls even before ``adjust_every`` steps.
EPOCH_SHARE_PER_DECISION = 0.25
#: The decisions DynamicBatchSize takes sooner at the start of a fit (see the module docstring).
WARMUP_DECISIONS = 2


class DecisionCadence:
    """Counts steps and rows since the last decision and says when the next one is due.

    Args:
        adjust_every: decide every N optimizer steps.
        min_steps: never decide before this many steps since the previous decision (the
            quarter-epoch rule included); 1 means every step may be a decision.
        warmup: the first ``warmup`` decisions come sooner (see the module docstring); 0: never.

    The counters go into checkpoints, so a resumed fit decides at the same steps as an
    unbroken one.
    """

    def __init__(self, adjust_every: int, min_steps: int = 1, warmup: int = 0) -> None:
        adjust_every = checked("adjust_every", adjust_every, positive_int, 20)
        min_steps = checked("min_steps", min_steps, positive_int, 1)
        warmup = checked("warmup", warmup, count, 2)
        self.adjust_every = adjust_every
        self.min_steps = min_steps
        self.warmup = warmup
        self.steps_since_decision = 0
        self.rows_since_decision = 0
        self.decisions = 0

    @classmethod
    def for_policy(cls, policy: Any, adjust_every: int, min_timed_steps: int) -> DecisionCadence:
        """The cadence ``DynamicBatchSize`` runs for ``policy``: only ``goodput`` (or a policy of one's
        own with ``times_steps = True``) times ``min_timed_steps`` steps at each size; said once, as a
        warning, when that makes decisions rarer than ``adjust_every``.

        >>> from lightning_batch.plugin.policy import NoisePolicy
        >>> DecisionCadence.for_policy(NoisePolicy(), adjust_every=5, min_timed_steps=20).effective_every
        5
        """
        times_steps = getattr(policy, "times_steps", getattr(policy, "name", "") == "goodput")
        cadence = cls(adjust_every, min_timed_steps if times_steps else 1, warmup=WARMUP_DECISIONS)
        if cadence.effective_every > adjust_every:
            log.warning(
                "DynamicBatchSize: the %s policy times %d steps at each batch size, so it decides every %d "
                "steps, not every adjust_every=%d; pass min_timed_steps=%d to decide that often, with a "
                "noisier throughput model",
                policy.name,
                min_timed_steps,
                cadence.effective_every,
                adjust_every,
                adjust_every,
            )
        return cadence

    def _shortened(self, steps: int) -> int:
        """``steps`` for the current decision: divided during the warm-up, at least 1."""
        shift = self.warmup - self.decisions
        return max(1, steps >> shift) if shift > 0 else steps

    @property
    def effective_every(self) -> int:
        """Steps between decisions when no quarter epoch cuts them short."""
        return max(self.adjust_every, self.min_steps)

    def step_done(self, rows: int, epoch_rows: int) -> bool:
        """Count one trained step of ``rows`` global rows; True when a decision is due now.

        The caller decides and then calls :meth:`reset`.
        """
        self.steps_since_decision += 1
        self.rows_since_decision += rows
        return self.due(epoch_rows)

    def due(self, epoch_rows: int) -> bool:
        """Whether the steps counted so far make a decision due (see the module docstring)."""
        if self.steps_since_decision < self._shortened(self.min_steps):
            return False
        if self.steps_since_decision >= self._shortened(self.adjust_every):
            return True
        return epoch_rows > 0 and self.rows_since_decision >= epoch_rows * EPOCH_SHARE_PER_DECISION

    def reset(self) -> None:
        """A decision was taken: count afresh."""
        self.steps_since_decision = 0
        self.rows_since_decision = 0
        self.decisions += 1

    def state_dict(self) -> dict[str, int]:
        return {
            "steps_since_decision": self.steps_since_decision,
            "rows_since_decision": self.rows_since_decision,
            "decisions_taken": self.decisions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_since_decision = int(state.get("steps_since_decision", 0))
        self.rows_since_decision = int(state.get("rows_since_decision", 0))
        # A checkpoint from before the warm-up existed is past it.
        self.decisions = int(state.get("decisions_taken", self.warmup))


class DecisionsKept:
    """The decision points that kept the batch, and why: ``batch_size_decisions.json``'s ``kept``.

    A decision falls at the :class:`DecisionCadence`'s steps, but it changes the batch only when the
    policy's proposal gains enough; a noise policy's proposal moves only with fresh noise
    measurements, which the measurement budget spaces out (see
    :class:`~lightning_batch.plugin.clock.StepClock`). So ``adjust_every=5`` may change the batch far
    less often than every 5 steps. Each kept point is recorded with its reason and the fresh
    measurements it had; consecutive points with the same batch and reason are one entry (first and
    last step, count), so a long fit stays a short file.

    >>> kept = DecisionsKept()
    >>> for step, updates in ((5, 3), (10, 3), (15, 3)):
    ...     fresh = kept.fresh_measurements(updates)
    ...     kept.add(step, 0, 32, "keep: gain 1% < 5%", fresh, measured=True)
    >>> for entry in kept.entries:
    ...     print(entry["step"], entry["last_step"], entry["count"], entry["reason"])
    5 5 1 keep: gain 1% < 5%
    10 15 2 keep: no new noise measurement since the previous decision
    """

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._updates_at_last_decision = 0

    def fresh_measurements(self, num_updates: int) -> int:
        """Noise measurements since the previous decision point, given the meter's running count."""
        fresh = max(0, num_updates - self._updates_at_last_decision)
        self._updates_at_last_decision = num_updates
        return fresh

    def add(self, step: int, epoch: int, batch_size: int, reason: str, fresh: int, measured: bool) -> None:
        """Record a decision point at ``step`` that kept ``batch_size`` (rows per optimizer step).

        ``measured``: the decision reads noise measurements, so none fresh is the reason it kept.
        """
        if measured and fresh == 0:
            reason = "keep: no new noise measurement since the previous decision"
        last = self.entries[-1] if self.entries else None
        if last is not None and last["batch_size"] == batch_size and last["reason"] == reason:
            last["last_step"], last["count"] = step, last["count"] + 1
            return
        self.entries.append(
            {
                "step": step,
                "last_step": step,
                "count": 1,
                "epoch": epoch,
                "batch_size": batch_size,
                "new_measurements": fresh,
                "reason": reason,
            }
        )

    def state_dict(self) -> dict[str, Any]:
        return {"entries": [dict(e) for e in self.entries], "updates": self._updates_at_last_decision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = [dict(e) for e in state.get("entries", [])]
        self._updates_at_last_decision = int(state.get("updates", 0))


def effective_ceiling(
    probed: int | None, oom_rows_per_pass: int | None, world_size: int, epoch_rows: int | None
) -> int | None:
    """The largest global batch a decision may choose; None when nothing bounds it.

    ``probed`` is the memory probe's global ceiling; ``oom_rows_per_pass`` the rows one rank's
    forward/backward held after an out-of-memory error (the module learnt it; it lowers the ceiling
    to that times the ranks); ``epoch_rows`` the rows in an epoch over all ranks (a batch larger
    than the data is the data).

    >>> effective_ceiling(512, None, 1, 10_000)
    512
    >>> effective_ceiling(512, 100, 2, 10_000)  # an OOM taught each of 2 ranks to hold 100 rows
    200
    >>> effective_ceiling(None, None, 1, 300)
    300
    """
    bounds = [value for value in (probed, epoch_rows) if value is not None]
    if oom_rows_per_pass:
        bounds.append(int(oom_rows_per_pass) * world_size)
    return min(bounds) if bounds else None


def epoch_steps(sampler: ResizableBatchSampler, limit_train_batches: int | float = 1.0) -> int:
    """Steps the current epoch has now, as the Trainer must count them after a resize.

    Steps already taken plus those left at the current batch size; an epoch whose last batch was
    already drawn has exactly the steps it took. ``limit_train_batches`` is the Trainer's option:
    an int caps the steps, a fraction below 1 takes that share (at least one step).

    >>> from lightning_batch.plugin.sampler import ResizableBatchSampler
    >>> sampler = ResizableBatchSampler(100, batch_size=10, shuffle=False)
    >>> batches = iter(sampler)
    >>> _ = [next(batches) for _ in range(3)]  # 30 rows taken in 3 steps
    >>> sampler.batch_size = 35  # 70 left: two more steps
    >>> epoch_steps(sampler), epoch_steps(sampler, 4), epoch_steps(sampler, 0.5)
    (5, 4, 2)
    """
    finished = sampler.cursor >= sampler.num_samples  # resized after the epoch's last batch was drawn
    total = sampler.batches_yielded if finished else len(sampler)
    if isinstance(limit_train_batches, int):
        return min(total, limit_train_batches)
    if limit_train_batches < 1.0:
        return max(1, int(total * limit_train_batches))
    return total


#: Measurements taken every other step at the start of a fit, before the budget plans the spacing.
EARLY_MEASUREMENTS = 8
#: The measurements taken every other step whatever they cost: the policies act on the noise scale
#: from 4 measurements on (DynamicBatchSize's MIN_MEASUREMENTS).
GUARANTEED_MEASUREMENTS = 4
#: The early measurements may take this many times the budget (a measurement that costs a dozen
#: steps, as a CNN's micro-batches do, ends the early phase at once).
EARLY_OVERSPEND = 5.0
#: The most the spacing grows to repay measurements that cost more than the budget so far.
MAX_REPAY_FACTOR = 2.0
#: The longest spacing the budget plans between measurements (a sanity bound; the budget rules).
MAX_MEASURE_INTERVAL = 10_000


class MeasurementBudget:
    """When to measure the noise statistics so that measuring costs at most ``budget`` of the fit's time.

    The caller times what a measurement costs -- a measured step's cycle minus an unmeasured step's
    at the same batch, plus the reduction after it -- and :meth:`record`\\ s it; at each decision it
    asks :meth:`plan` for the steps between measurements from then on:

    ``interval = ceil(cost / (budget × step)) × spent / (budget × elapsed)``

    the first factor spreads a measurement's median cost over enough steps, the second repays
    what was spent beyond the budget so far (or spends what is left of it), so the budget holds
    over the fit, not just per window. The first :data:`EARLY_MEASUREMENTS` come every other step
    (the estimates move fastest early, and decisions then need them most): the first
    :data:`GUARANTEED_MEASUREMENTS` whatever they cost, the rest while they cost at most
    :data:`EARLY_OVERSPEND` times the budget.

    >>> budget = MeasurementBudget(0.02)
    >>> [budget.step_begins() for _ in range(4)]  # every other step at first
    [True, False, True, False]
    >>> for _ in range(8):
    ...     budget.record(0.0005)  # a measurement costs 0.5 ms
    >>> budget.plan(elapsed_seconds=0.2, step_seconds=0.001, measurements=8)  # 4 ms spent of 4 ms allowed
    25
    """

    def __init__(self, budget: float) -> None:
        self.budget = checked("budget", budget, fraction(high=0.5), 0.02)
        self.interval = 2
        self.steps_since = 1  # the first step is measured
        self.spent = 0.0
        self._costs: deque[float] = deque(maxlen=16)  # the latest measurements' costs

    def step_begins(self) -> bool:
        """Count a step; True when it is to be measured."""
        self.steps_since += 1
        if self.steps_since >= self.interval:
            self.steps_since = 0
            return True
        return False

    def record(self, seconds: float) -> None:
        """One measurement cost ``seconds`` (beyond the step it rode on)."""
        seconds = max(0.0, float(seconds))
        self.spent += seconds
        self._costs.append(seconds)

    def plan(
        self, elapsed_seconds: float, step_seconds: float | None, measurements: int, known: bool = True
    ) -> int:
        """The steps between measurements from now on (also kept as :attr:`interval`).

        ``known``: whether the measurements so far give a noise scale; until they do, they come as
        the early ones do (every other step while they cost at most EARLY_OVERSPEND times the budget):
        the decisions wait for them.
        """
        allowed = self.budget * max(elapsed_seconds, 1e-9)
        early = measurements < EARLY_MEASUREMENTS or not known
        if measurements < GUARANTEED_MEASUREMENTS or (early and self.spent <= EARLY_OVERSPEND * allowed):
            self.interval = 2
            return self.interval
        if not self._costs or not step_seconds or step_seconds <= 0:
            return self.interval
        costs = sorted(self._costs)
        cost = costs[len(costs) // 2]
        spacing = cost / (self.budget * step_seconds)
        # Repay an overspend at most 2x slower: the first measurements are guaranteed whatever they
        # cost, and repaying them 8x over froze a ResNet's measurements for the rest of its fit.
        balance = min(max(self.spent / allowed, 0.25), MAX_REPAY_FACTOR)
        self.interval = int(min(max(math.ceil(spacing * balance - 1e-9), 1), MAX_MEASURE_INTERVAL))
        return self.interval

    def state_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "steps_since": self.steps_since,
            "spent": self.spent,
            "costs": list(self._costs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.interval = int(state["interval"])
        self.steps_since = int(state["steps_since"])
        self.spent = float(state["spent"])
        self._costs = deque((float(c) for c in state["costs"]), maxlen=16)
