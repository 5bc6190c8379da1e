"""The callback's step clock, without Lightning: which steps measure, what a step and a measurement cost.

A fake clock makes every figure exact: ``FakeTime`` returns the times the test sets.
"""

from __future__ import annotations

import pytest

from lightning_batch.plugin.cadence import EARLY_MEASUREMENTS, MeasurementBudget
from lightning_batch.plugin.clock import StepClock
from lightning_batch.plugin.policy import ThroughputModel


class FakeTime:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _clock(
    measure_every: int = 0, fallback_every: int = 10, budget: float = 0.02
) -> tuple[StepClock, FakeTime]:
    time = FakeTime()
    return StepClock(measure_every, fallback_every, budget, ThroughputModel(), now=time), time


def _step(clock: StepClock, time: FakeTime, rows: int, seconds: float, reduction: float = 0.0) -> None:
    """One training step of ``seconds`` (its measurement's reduction ``reduction`` more, if measured)."""
    time.now += seconds
    cycle = clock.cycle_seconds()
    if clock.measuring:
        started = time.now
        time.now += reduction
        clock.record_measurement(rows, cycle, time.now - started)
    else:
        clock.record_step(rows, cycle)
    clock.next_cycle()


def test_a_fixed_spacing_measures_every_nth_step_and_its_micro_batches_every_mth():
    clock, _ = _clock(measure_every=3, fallback_every=6)
    plan = [clock.begin_step(step) for step in range(13)]
    assert [s for s, (measure, _) in enumerate(plan) if measure] == [0, 3, 6, 9, 12]
    assert [s for s, (_, fallback) in enumerate(plan) if fallback] == [0, 6, 12]
    assert (
        clock.plan(batch_size=32, measurements=100) == clock.interval
    )  # a fixed spacing is never re-planned


def test_by_budget_the_first_measurements_come_every_other_step_micro_batches_included():
    clock, _ = _clock()
    plan = [clock.begin_step(step) for step in range(8)]
    assert plan == [(True, True), (False, False)] * 4


def test_a_plain_step_times_only_clean_cycles():
    clock, time = _clock(measure_every=1000)
    clock.start_fit()
    clock.interrupt()  # the first cycle carries the epoch's set-up
    clock.begin_step(1)
    _step(clock, time, rows=32, seconds=5.0)  # not clean: not timed
    for step in range(2, 6):
        clock.begin_step(step)
        _step(clock, time, rows=32, seconds=0.5)
    clock.interrupt()  # a validation ran in this cycle
    clock.begin_step(6)
    _step(clock, time, rows=32, seconds=3.0)
    assert clock.plain_step_seconds(32) == 0.5
    assert clock.throughput.times_at(32) == [0.5] * 4


def test_a_measurement_costs_its_reduction_and_its_steps_extra_time():
    clock, time = _clock()
    clock.start_fit()
    clock.interrupt()
    for step in range(1, 21):  # steps of 1 s; measured ones take 0.25 s more, and 0.05 s of reduction
        measure, _ = clock.begin_step(step)
        _step(clock, time, rows=64, seconds=1.25 if measure else 1.0, reduction=0.05 if measure else 0.0)
    budget = clock.budget
    assert budget.spent == pytest.approx(sum(budget._costs))
    # the first measured step had no plain step to compare with: its reduction only
    assert sorted(budget._costs)[0] == pytest.approx(0.05)
    assert sorted(budget._costs)[-1] == pytest.approx(0.30)


def test_the_plan_spaces_measurements_to_the_budget_once_the_early_ones_are_done():
    clock, time = _clock(budget=0.02)
    clock.start_fit()
    for step in range(200):  # 10 ms steps; a measurement costs 1 ms of reduction
        measure, _ = clock.begin_step(step)
        _step(clock, time, rows=32, seconds=0.01, reduction=0.001 if measure else 0.0)
    interval = clock.plan(batch_size=32, measurements=EARLY_MEASUREMENTS)
    # 1 ms a measurement at 2% of 10 ms steps: one every 5 steps, more while repaying the early overspend
    assert interval >= 5
    expected = MeasurementBudget(0.02)
    expected.spent, expected._costs = clock.budget.spent, clock.budget._costs
    assert interval == expected.plan(clock.fit_seconds, 0.01, EARLY_MEASUREMENTS)
    clock.interval = 7  # the spacing rank 0 broadcast
    assert clock.budget.interval == 7


def test_the_state_is_the_budgets_and_comes_back():
    clock, time = _clock()
    for step in range(10):
        clock.begin_step(step)
        _step(clock, time, rows=32, seconds=0.01, reduction=0.002)
    other, _ = _clock()
    other.load_state_dict(clock.state_dict())
    assert other.state_dict() == clock.state_dict()
    assert [other.begin_step(s) for s in range(6)] == [clock.begin_step(s) for s in range(6)]


def test_nothing_is_timed_or_measured_before_the_first_cycle_starts():
    clock, time = _clock(measure_every=1000)
    assert clock.measuring is False
    time.now = 5.0
    assert clock.fit_seconds == 5.0  # the fit's clock runs from construction until start_fit
    clock.record_step(32, 1.0)  # no next_cycle() yet: the cycle is not a plain step
    assert clock.plain_step_seconds(32) is None
    clock.start_fit()
    assert clock.fit_seconds == 0.0


def test_an_unmeasured_steps_time_is_the_median_of_those_timed_else_the_models():
    clock, time = _clock(measure_every=1000)
    clock.next_cycle()
    for seconds in (0.1, 0.9, 0.3, 0.5, 0.2):
        clock.begin_step(1)
        _step(clock, time, rows=16, seconds=seconds)
    assert clock.plain_step_seconds(16) == pytest.approx(
        0.3
    )  # the median of five, not another order statistic
    assert clock.plain_step_seconds(64) is None  # one size timed: no model to ask
    for seconds in (0.7, 0.7, 0.7):
        clock.begin_step(1)
        _step(clock, time, rows=64, seconds=seconds)
    assert clock.plain_step_seconds(64) == pytest.approx(0.7)
    fitted = clock.plain_step_seconds(32)  # never timed: the fitted line t(B) = alpha + beta B
    assert fitted == pytest.approx(clock.throughput.step_time(32))
    assert 0.3 < fitted < 0.7


def test_a_measured_step_in_a_cycle_that_is_not_clean_costs_its_reduction_only():
    clock, time = _clock(measure_every=1)
    clock.next_cycle()
    for _ in range(3):  # time the plain step at 32 rows first
        clock.measuring = False
        clock.record_step(32, 1.0)
    clock.interrupt()  # a validation ran: the measured cycle's extra time is not the measurement's
    clock.measuring = True
    clock.record_measurement(32, cycle_seconds=9.0, reduction_seconds=0.25)
    assert clock.budget.spent == pytest.approx(0.25)


def test_an_unknown_noise_scale_keeps_the_early_spacing_through_the_clock():
    from lightning_batch.plugin.policy import ThroughputModel

    ticks = iter(range(10_000))
    clock = StepClock(0, 10, 0.02, ThroughputModel(), now=lambda: float(next(ticks)))
    clock.start_fit()
    for _ in range(12):
        clock.begin_step(0)
        clock.budget.record(0.0)
    assert clock.plan(8, measurements=30, known=False) == 2
