"""The callback's decision arithmetic without a Trainer: cadence, ceiling, epoch length after a resize."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_batch.plugin.cadence import DecisionCadence, MeasurementBudget, effective_ceiling, epoch_steps
from lightning_batch.plugin.sampler import ResizableBatchSampler


def _decision_steps(cadence: DecisionCadence, rows: list[int], epoch_rows: int) -> list[int]:
    due = []
    for step, r in enumerate(rows, start=1):
        if cadence.step_done(r, epoch_rows):
            due.append(step)
            cadence.reset()
    return due


def _reference_steps(rows: list[int], epoch_rows: int, adjust_every: int, min_steps: int) -> list[int]:
    """The documented rule, written out independently: decide at the end of a step once
    ``adjust_every`` steps or a quarter epoch of rows went by, never before ``min_steps`` steps."""
    due, steps, seen = [], 0, 0
    for step, r in enumerate(rows, start=1):
        steps, seen = steps + 1, seen + r
        if steps >= min_steps and (steps >= adjust_every or (epoch_rows > 0 and 4 * seen >= epoch_rows)):
            due.append(step)
            steps = seen = 0
    return due


@pytest.mark.parametrize("adjust_every", [1, 2, 5, 7, 20])
def test_small_batches_decide_every_adjust_every_steps_exactly(adjust_every: int):
    """adjust_every below the old hidden floor of 20 is honoured (it was silently raised to 20)."""
    cadence = DecisionCadence(adjust_every)
    due = _decision_steps(cadence, [4] * 100, epoch_rows=100_000)
    assert due == list(range(adjust_every, 101, adjust_every))


def test_a_quarter_epoch_of_rows_brings_the_decision_forward_exactly_at_the_quarter():
    # 1000 rows an epoch; batches of 60: 4 steps hold 240 < 250 rows, 5 hold 300.
    assert _decision_steps(DecisionCadence(100), [60] * 12, epoch_rows=1000) == [5, 10]
    # exactly a quarter counts: batches of 125 reach 250 at the 2nd step
    assert _decision_steps(DecisionCadence(100), [125] * 6, epoch_rows=1000) == [2, 4, 6]
    # an unknown epoch size (0) never brings a decision forward
    assert _decision_steps(DecisionCadence(5), [10**6] * 10, epoch_rows=0) == [5, 10]


def test_min_steps_holds_both_rules_back():
    assert _decision_steps(DecisionCadence(2, min_steps=4), [1] * 12, epoch_rows=10**6) == [4, 8, 12]
    # a quarter epoch every step, still only every 3 steps
    assert _decision_steps(DecisionCadence(50, min_steps=3), [500] * 9, epoch_rows=1000) == [3, 6, 9]
    assert DecisionCadence(2, min_steps=4).effective_every == 4
    assert DecisionCadence(30, min_steps=4).effective_every == 30


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.integers(1, 400), min_size=1, max_size=80),
    epoch_rows=st.integers(0, 3000),
    adjust_every=st.integers(1, 30),
    min_steps=st.integers(1, 30),
)
def test_cadence_matches_the_documented_rule(rows, epoch_rows, adjust_every, min_steps):
    cadence = DecisionCadence(adjust_every, min_steps)
    assert _decision_steps(cadence, rows, epoch_rows) == _reference_steps(
        rows, epoch_rows, adjust_every, min_steps
    )


@pytest.mark.parametrize("warmup", [0, 2])
def test_a_restored_cadence_decides_at_the_steps_an_unbroken_one_does(warmup: int):
    rows = [7, 30, 3, 90, 12, 5, 64, 8, 8, 8, 200, 1, 1, 1, 1, 1]
    unbroken = _decision_steps(DecisionCadence(4, min_steps=2, warmup=warmup), rows, epoch_rows=900)
    first = DecisionCadence(4, min_steps=2, warmup=warmup)
    before = _decision_steps(first, rows[:6], epoch_rows=900)
    resumed = DecisionCadence(4, min_steps=2, warmup=warmup)
    resumed.load_state_dict(first.state_dict())
    after = [6 + s for s in _decision_steps(resumed, rows[6:], epoch_rows=900)]
    assert before + after == unbroken
    assert first.state_dict() == {
        "steps_since_decision": first.steps_since_decision,
        "rows_since_decision": first.rows_since_decision,
        "decisions_taken": len(before),
    }
    assert first.rows_since_decision == sum(rows[before[-1] : 6])


def _reference_warmup_steps(rows: int, adjust_every: int, min_steps: int, warmup: int) -> list[int]:
    """The warm-up rule written out: the k-th decision (from 0) waits adjust_every and min_steps
    divided by 2**(warmup - k), at least 1 step; afterwards the plain rule."""
    due, steps, k = [], 0, 0
    for step in range(1, rows + 1):
        steps += 1
        div = 2 ** max(0, warmup - k)
        if steps >= max(1, min_steps // div) and steps >= max(1, adjust_every // div):
            due.append(step)
            steps, k = 0, k + 1
    return due


@pytest.mark.parametrize(
    ("adjust_every", "min_steps", "warmup"), [(20, 20, 2), (20, 1, 2), (7, 3, 3), (1, 1, 2)]
)
def test_the_warmup_brings_the_first_decisions_forward(adjust_every, min_steps, warmup):
    cadence = DecisionCadence(adjust_every, min_steps, warmup=warmup)
    due = _decision_steps(cadence, [1] * 120, epoch_rows=10**9)
    assert due == _reference_warmup_steps(120, adjust_every, min_steps, warmup)
    if (adjust_every, warmup) == (20, 2):
        assert due[:4] == [5, 15, 35, 55], "the defaults: after 5, 10, then every 20 steps"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "5"])
def test_cadence_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="adjust_every must be a positive integer"):
        DecisionCadence(bad)
    with pytest.raises(ValueError, match="min_steps must be a positive integer"):
        DecisionCadence(5, min_steps=bad)


@pytest.mark.parametrize(
    ("probed", "oom_rows", "world", "epoch_rows", "expected"),
    [
        (None, None, 1, None, None),
        (None, None, 1, 300, 300),
        (512, None, 1, None, 512),
        (512, None, 1, 300, 300),
        (512, None, 1, 10_000, 512),
        (512, 100, 1, 10_000, 100),
        (512, 100, 2, 10_000, 200),  # per-rank rows times the ranks
        (512, 300, 2, 10_000, 512),
        (None, 40, 3, None, 120),
        (None, 40, 3, 100, 100),
        (512, 0, 2, 10_000, 512),  # 0: no OOM learnt
    ],
)
def test_effective_ceiling(probed, oom_rows, world, epoch_rows, expected):
    assert effective_ceiling(probed, oom_rows, world, epoch_rows) == expected


def _drawn(sampler: ResizableBatchSampler, steps: int) -> list[int]:
    batches = iter(sampler)
    return [len(next(batches)) for _ in range(steps)]


def test_epoch_steps_counts_taken_steps_plus_those_left_at_the_new_size():
    sampler = ResizableBatchSampler(100, batch_size=10, shuffle=False)
    assert epoch_steps(sampler) == 10
    assert _drawn(sampler, 3) == [10, 10, 10]
    sampler.batch_size = 35  # 70 rows left: 35 + 35
    assert epoch_steps(sampler) == 5
    sampler.batch_size = 4  # 70 rows left: 17 of 4 and a tail of 2
    assert epoch_steps(sampler) == 3 + 18
    sampler.batch_size = 7  # 70 = 10 × 7, no tail
    assert epoch_steps(sampler) == 13


def test_epoch_steps_after_the_last_batch_was_drawn_is_the_steps_taken():
    sampler = ResizableBatchSampler(50, batch_size=20, shuffle=False)
    assert _drawn(sampler, 3) == [20, 20, 10]
    sampler.batch_size = 1  # resized after the epoch's last batch: nothing left to take
    assert epoch_steps(sampler) == 3


def test_epoch_steps_respects_limit_train_batches():
    sampler = ResizableBatchSampler(100, batch_size=10, shuffle=False)
    assert epoch_steps(sampler, 4) == 4
    assert epoch_steps(sampler, 40) == 10
    assert epoch_steps(sampler, 0.5) == 5
    assert epoch_steps(sampler, 0.01) == 1  # at least one step
    assert epoch_steps(sampler, 1.0) == 10
    assert epoch_steps(sampler, 0.99) == 9


class _TimingPolicy:
    name = "mine"
    times_steps = True


@pytest.mark.parametrize(
    ("policy", "every", "warned"),
    [("goodput", 20, True), ("noise", 5, False), ("fixed", 5, False), ("mine", 20, True)],
)
def test_the_cadence_of_a_policy_times_steps_only_for_goodput_or_a_policy_that_says_so(
    policy, every, warned, caplog
):
    from lightning_batch.plugin.policy import make_policy

    chosen = _TimingPolicy() if policy == "mine" else make_policy(policy)
    with caplog.at_level("WARNING"):
        cadence = DecisionCadence.for_policy(chosen, adjust_every=5, min_timed_steps=20)
    assert cadence.effective_every == every
    assert cadence.warmup == 2
    assert ("decides every 20 steps, not every adjust_every=5" in caplog.text) == warned
    # with enough timed steps asked for, goodput decides as often as adjust_every
    assert DecisionCadence.for_policy(chosen, adjust_every=30, min_timed_steps=20).effective_every == 30


# -- the measurement budget's plan, at its edges ---------------------------------------------------------


def _budget(costs: list[float], spent: float | None = None, share: float = 0.02) -> MeasurementBudget:
    budget = MeasurementBudget(share)
    for cost in costs:
        budget.record(cost)
    if spent is not None:
        budget.spent = spent
    return budget


def test_the_first_measurements_come_every_other_step_whatever_they_cost():
    for measurements in range(4):  # the guaranteed ones
        assert _budget([1.0], spent=1e6).plan(1.0, 0.01, measurements) == 2
    # then, until 8, only while they cost at most 5x the budget so far (here exactly 5x: still early)
    assert _budget([0.01], spent=5 * 0.02 * 10.0).plan(10.0, 0.01, 4) == 2
    assert _budget([0.01], spent=5 * 0.02 * 10.0 + 1e-6).plan(10.0, 0.01, 4) > 2


def test_the_plan_spreads_the_median_cost_and_repays_or_spends_the_balance():
    # cost 2 ms, steps of 10 ms, budget 2%: one measurement every 10 steps when spent == allowed
    allowed = 0.02 * 100.0
    assert _budget([0.002] * 5, spent=allowed).plan(100.0, 0.01, 10) == 10
    assert _budget([0.002] * 5, spent=2 * allowed).plan(100.0, 0.01, 10) == 20  # repays twice the budget
    assert (
        _budget([0.002] * 5, spent=0.1 * allowed).plan(100.0, 0.01, 10) == 3
    )  # at most 4x sooner: 10 x 0.25
    assert _budget([0.002] * 5, spent=100 * allowed).plan(100.0, 0.01, 10) == 20  # at most 2x later
    # the median of the latest 16 costs: an old outlier has left the window
    assert _budget([9.9] + [0.002] * 16, spent=allowed).plan(100.0, 0.01, 10) == 10
    # the median, not another order statistic: 0.001, 0.002, 0.003 -> 0.002
    assert _budget([0.003, 0.001, 0.002], spent=allowed).plan(100.0, 0.01, 10) == 10
    # at least every step, at most MAX_MEASURE_INTERVAL
    assert _budget([1e-9] * 3, spent=allowed).plan(100.0, 0.01, 10) == 1
    assert _budget([1e6] * 3, spent=allowed).plan(100.0, 0.01, 10) == 10_000


def test_without_a_cost_or_a_step_time_the_plan_keeps_its_spacing():
    for costs, step in (([], 0.01), ([0.002], None), ([0.002], 0.0), ([0.002], -1.0)):
        budget = _budget(costs, spent=1.0)
        budget.interval = 7
        assert budget.plan(100.0, step, 10) == 7


def test_a_policy_without_a_name_times_no_steps_and_an_equal_cadence_says_nothing(caplog):
    class Unnamed:
        pass

    assert DecisionCadence.for_policy(Unnamed(), adjust_every=5, min_timed_steps=20).effective_every == 5
    from lightning_batch.plugin.policy import make_policy

    with caplog.at_level("WARNING"):
        cadence = DecisionCadence.for_policy(make_policy("goodput"), adjust_every=20, min_timed_steps=20)
    assert cadence.effective_every == 20 and not caplog.text
    with caplog.at_level("WARNING"):
        DecisionCadence.for_policy(make_policy("goodput"), adjust_every=5, min_timed_steps=20)
    assert "the goodput policy times 20 steps" in caplog.text


def test_a_cadence_saved_before_the_warmup_was_counted_resumes_past_it():
    cadence = DecisionCadence(adjust_every=8, warmup=2)
    cadence.load_state_dict({"steps_since_decision": 3, "rows_since_decision": 30})  # an older checkpoint
    assert cadence.decisions == 2  # its warm-up is over: the next decision after 8 steps, not sooner


def test_until_the_noise_scale_is_known_measurements_come_every_other_step_within_the_overspend():
    """Past the early measurements, an unknown noise scale keeps the early spacing (the decisions wait
    for it) while the measurements cost at most EARLY_OVERSPEND times the budget; then the budget's."""
    allowed = 0.02 * 100.0
    assert _budget([0.002] * 5, spent=allowed).plan(100.0, 0.01, 30, known=False) == 2
    assert _budget([0.002] * 5, spent=allowed).plan(100.0, 0.01, 30, known=True) == 10
    assert _budget([0.002] * 5, spent=6 * allowed).plan(100.0, 0.01, 30, known=False) == 20


def test_only_a_policy_that_times_steps_waits_between_decisions():
    from lightning_batch.plugin.policy import GoodputPolicy, NoisePolicy

    assert DecisionCadence.for_policy(NoisePolicy(), adjust_every=1, min_timed_steps=20).min_steps == 1
    assert DecisionCadence.for_policy(GoodputPolicy(), adjust_every=1, min_timed_steps=20).min_steps == 20


def test_the_decisions_taken_come_back_from_a_checkpoint():
    cadence = DecisionCadence(adjust_every=8, warmup=2)
    cadence.load_state_dict({"steps_since_decision": 3, "rows_since_decision": 9, "decisions_taken": 1})
    assert (cadence.steps_since_decision, cadence.rows_since_decision, cadence.decisions) == (3, 9, 1)
    assert cadence._shortened(8) == 4, "one warm-up decision left: half the spacing"


def test_the_median_cost_is_of_the_latest_sixteen_measurements_also_after_a_checkpoint():
    small, big = 0.001, 0.004  # 10 and 40 steps of 10 ms at 2% with spent == allowed
    costs = [small] + [big] * 8 + [small] * 8  # the latest 16: half big, so the median is big
    allowed = 0.02 * 100.0
    assert _budget(costs, spent=allowed).plan(100.0, 0.01, 20) == 20
    restored = MeasurementBudget(0.02)
    restored.load_state_dict({"interval": 2, "steps_since": 0, "spent": allowed, "costs": costs})
    assert restored.plan(100.0, 0.01, 20) == 20
    assert (
        _budget([0.001, 0.002, 0.003, 0.004], spent=allowed).plan(100.0, 0.01, 20) == 15
    )  # the upper median


def test_a_fit_shorter_than_a_second_is_budgeted_by_its_own_time():
    """allowed = budget x elapsed (no floor of a second): 0.5 s at 2% allows 10 ms."""
    assert _budget([0.001] * 8, spent=0.01).plan(0.5, 0.001, 20) == 50
