"""The callback's step clock: how long each training step takes, and which steps measure the noise.

:class:`~lightning_batch.plugin.callback.DynamicBatchSize` needs step times for two things: the
``goodput`` policy's throughput model, and the measurement budget (a measured step is slower than
the others; the difference is what measuring costs). :class:`StepClock` keeps that book-keeping
free of Lightning, so it is tested with a fake clock like :mod:`lightning_batch.plugin.cadence`.

A step's time is the whole cycle from the previous step's end to this one's: the data fetch and
the loop's own overhead included, since they are the fixed cost large batches amortise. A cycle
that ran a validation or crossed an epoch boundary is not a plain step (:meth:`StepClock.interrupt`)
and times nothing.

Example (a fake clock: each tick is one second):
    >>> from lightning_batch.plugin.policy import ThroughputModel
    >>> ticks = iter(range(100))
    >>> clock = StepClock(measure_every=3, fallback_every=3, measure_budget=0.02,
    ...                   throughput=ThroughputModel(), now=lambda: float(next(ticks)))
    >>> clock.start_fit()
    >>> clock.interrupt()  # the first cycle carries the epoch's set-up
    >>> [clock.begin_step(step)[0] for step in range(4)]  # measure_every=3: steps 0 and 3
    [True, False, False, True]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lightning_batch.plugin.cadence import MeasurementBudget
from lightning_batch.plugin.policy import ThroughputModel

__all__ = ["StepClock"]


class StepClock:
    """Times steps and spaces the noise measurements (every ``measure_every`` steps, or by budget).

    The caller, once a step:

    1. :meth:`begin_step` at the step's start: whether to measure it (and its micro-batches);
    2. :meth:`cycle_seconds` at its end: how long the cycle took;
    3. :meth:`record_step` for an unmeasured step, or :meth:`record_measurement` with what the
       measurement's own reduction took, for a measured one;
    4. :meth:`next_cycle` once the step's work is done.

    Args:
        measure_every: measure every N steps; 0: as often as ``measure_budget`` allows.
        fallback_every: with ``measure_every`` > 0, measure the micro-batch fallback every N steps.
        measure_budget: with ``measure_every`` 0, the share of the fit's time measurements may take.
        throughput: the policy's throughput model: unmeasured steps' times go into it (when read),
            and it says what an unmeasured step at a size costs.
        now: the clock (``time.perf_counter``).
    """

    def __init__(
        self,
        measure_every: int,
        fallback_every: int,
        measure_budget: float,
        throughput: ThroughputModel,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.measure_every = measure_every
        self.fallback_every = fallback_every
        self.budget = MeasurementBudget(measure_budget)
        self.throughput = throughput
        self.now = now
        #: Whether the current step is measured (set by :meth:`begin_step`).
        self.measuring = False
        self._fit_started = now()
        self._cycle_started = now()
        self._clean = False
        #: Unmeasured steps' (rows, seconds) not yet in the throughput model: fed in only when read
        #: (a measured step, a decision), so an ordinary step costs a list append.
        self._pending: list[tuple[int, float]] = []

    # -- the fit ----------------------------------------------------------------------------------

    def start_fit(self) -> None:
        """The fit starts now (the measurement budget's clock: the memory probe counts)."""
        self._fit_started = self.now()

    @property
    def fit_seconds(self) -> float:
        return self.now() - self._fit_started

    def interrupt(self) -> None:
        """The running cycle is not a plain step (a validation, an epoch boundary): time nothing."""
        self._clean = False

    def next_cycle(self) -> None:
        """The next step's cycle starts now."""
        self._cycle_started = self.now()
        self._clean = True

    # -- a step -----------------------------------------------------------------------------------

    def begin_step(self, step: int) -> tuple[bool, bool]:
        """At a step's start: ``(measure, fallback)``, whether to measure it and its micro-batches.

        By budget, a measured step measures everything, micro-batches included: the budget pays for it.
        """
        if self.measure_every:
            self.measuring = step % self.measure_every == 0
            return self.measuring, step % self.fallback_every == 0
        self.measuring = self.budget.step_begins()
        return self.measuring, self.measuring

    def cycle_seconds(self) -> float:
        """Seconds since the previous step's end."""
        return self.now() - self._cycle_started

    def record_step(self, rows: int, seconds: float) -> None:
        """An unmeasured step of ``rows`` took ``seconds`` (kept for the throughput model if clean)."""
        if self._clean:
            self._pending.append((rows, seconds))

    def record_measurement(self, rows: int, cycle_seconds: float, reduction_seconds: float) -> None:
        """A measured step of ``rows`` took ``cycle_seconds``, and its reduction ``reduction_seconds``
        after it: what measuring cost is both, less what an unmeasured step of ``rows`` takes."""
        cost = reduction_seconds
        plain = self.plain_step_seconds(rows)
        if self._clean and plain is not None:
            cost += cycle_seconds - plain
        self.budget.record(cost)

    def plain_step_seconds(self, rows: int) -> float | None:
        """An unmeasured step's seconds at ``rows``: the median of those timed, else the model's."""
        self.feed_throughput()
        times = self.throughput.times_at(rows)
        if times:
            return times[len(times) // 2]
        return self.throughput.step_time(rows) if self.throughput.is_fitted else None

    def feed_throughput(self) -> None:
        """Hand the steps timed since the last call to the throughput model."""
        for rows, seconds in self._pending:
            self.throughput.observe(rows, seconds)
        self._pending.clear()

    # -- the spacing ------------------------------------------------------------------------------

    @property
    def interval(self) -> int:
        """Steps between measurements (by budget)."""
        return self.budget.interval

    @interval.setter
    def interval(self, steps: int) -> None:
        self.budget.interval = steps

    def plan(self, batch_size: int, measurements: int, known: bool = True) -> int:
        """With ``measure_every`` 0: the spacing from now on, so the budget holds over the fit so far
        (``known``: whether the measurements so far give a noise scale; see MeasurementBudget.plan)."""
        if self.measure_every:
            return self.budget.interval
        return self.budget.plan(self.fit_seconds, self.plain_step_seconds(batch_size), measurements, known)

    def state_dict(self) -> dict[str, Any]:
        return self.budget.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget.load_state_dict(state)
