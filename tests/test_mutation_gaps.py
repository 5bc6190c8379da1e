"""Tests for gaps that `make mutate` found in lightning_batch/plugin/cadence.py (tests/test_cadence.py is
another engineer's file; these complement it)."""

from __future__ import annotations

from lightning_batch.plugin.cadence import DecisionCadence


def test_rows_count_from_zero_towards_the_quarter_epoch() -> None:
    cadence = DecisionCadence(adjust_every=10)
    assert not cadence.step_done(24, 100)  # 24 rows < a quarter of 100
    assert cadence.step_done(1, 100)  # 25 rows: due


def test_state_round_trips_and_old_checkpoints_without_counters_load_as_zero() -> None:
    cadence = DecisionCadence(adjust_every=10)
    cadence.step_done(7, 1000)
    cadence.step_done(5, 1000)
    restored = DecisionCadence(adjust_every=10)
    restored.load_state_dict(cadence.state_dict())
    assert (restored.steps_since_decision, restored.rows_since_decision) == (2, 12)
    restored.load_state_dict({})
    assert (restored.steps_since_decision, restored.rows_since_decision) == (0, 0)
    restored.load_state_dict({"steps_since_decision": 3})
    assert (restored.steps_since_decision, restored.rows_since_decision) == (3, 0)
