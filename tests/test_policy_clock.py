"""Issue 16's policy that knows the clock: the probe-seeded throughput model, the noise EMAs windowed
in samples, and the measurement budget. Each checked against an independent reference: closed-form
EMA weights, a simulated fit's book-keeping, the probe's own timings, a real Lightning fit."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_batch.config import RunConfig
from lightning_batch.plugin.cadence import EARLY_MEASUREMENTS, MAX_REPAY_FACTOR, MeasurementBudget
from lightning_batch.plugin.callback import DynamicBatchSize
from lightning_batch.plugin.memory import MemoryProbeResult
from lightning_batch.plugin.noise import NoiseScaleEMA
from lightning_batch.plugin.policy import ThroughputModel
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.training import build_module

from .conftest import quiet_trainer

# ------------------------------------------------------------------------------------------------
# the noise EMAs, windowed in samples


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.tuples(st.floats(-5, 50), st.floats(0, 500), st.integers(1, 5000)), min_size=1, max_size=30
    ),
    share=st.sampled_from([0.1, 0.25, 1.0]),
    floor=st.sampled_from([0.0, 64.0, 10_000.0]),
)
def test_the_windowed_ema_is_the_weighted_mean_its_half_life_defines(values, share, floor):
    """Reference: every measurement's weight written out as the product of the decays after it
    (each 0.5 ** (n / h) with h = max(floor, share × samples so far)), normalised."""
    ema = NoiseScaleEMA(half_life_share=share, min_half_life=floor)
    seen, decays = 0.0, []
    for g, tr, n in values:
        ema.update(g, tr, samples=n)
        seen += n
        decays.append(0.5 ** (n / max(floor, share * seen)))
    weights = []
    for i in range(len(values)):
        later = math.prod(decays[i + 1 :])
        weights.append((1 - decays[i]) * later)
    total = sum(weights)
    expected_g = sum(w * v[0] for w, v in zip(weights, values, strict=True)) / total
    expected_tr = sum(w * v[1] for w, v in zip(weights, values, strict=True)) / total
    assert ema.grad_sqr == pytest.approx(expected_g, rel=1e-9, abs=1e-9)
    assert ema.grad_var == pytest.approx(expected_tr, rel=1e-9, abs=1e-9)


def test_a_constant_signal_is_returned_exactly_from_the_first_measurement_on():
    """The bias correction: no pull towards the zero start, whatever the spacing."""
    ema = NoiseScaleEMA(half_life_share=0.25, min_half_life=256)
    for n in (32, 32, 4096, 7, 100_000):
        ema.update(2.0, 60.0, samples=n)
        assert ema.grad_sqr == pytest.approx(2.0) and ema.gns == pytest.approx(30.0)


def test_the_window_in_samples_follows_a_change_at_any_batch_size_while_a_per_measurement_decay_lags():
    """B_noise jumps from 100 to 1000 after 50k samples, measured every 20 steps at B=32 or B=2048.
    In samples, the windowed estimate's lag hardly depends on the batch; the per-measurement decay's
    grows with it (measurements lie 64 times more samples apart)."""

    def samples_to_follow(batch: int, ema: NoiseScaleEMA) -> float:
        seen = 0
        while seen < 50_000:
            seen += 20 * batch
            ema.update(1.0, 100.0, samples=20 * batch)
        start = seen
        while ema.gns < 900:  # within 10% of the new value
            seen += 20 * batch
            ema.update(1.0, 1000.0, samples=20 * batch)
        return seen - start

    windowed = [samples_to_follow(b, NoiseScaleEMA(half_life_share=0.25)) for b in (32, 2048)]
    per_measurement = [samples_to_follow(b, NoiseScaleEMA(0.9)) for b in (32, 2048)]
    # Measured: windowed 62k and 164k samples (at B=2048 one measurement spans 41k samples: the
    # granularity, not the window, sets the lag); per measurement 13k and 369k.
    assert per_measurement[1] / per_measurement[0] > 20
    assert windowed[1] / windowed[0] < 3
    assert windowed[1] < per_measurement[1] / 2


def test_the_window_survives_a_checkpoint_and_old_checkpoints_still_load():
    ema = NoiseScaleEMA(half_life_share=0.25, min_half_life=128)
    for n in (32, 64, 128):
        ema.update(1.5, 40.0, samples=n)
    restored = NoiseScaleEMA()
    restored.load_state_dict(ema.state_dict())
    for target in (ema, restored):
        target.update(3.0, 10.0, samples=500)
    assert restored.state_dict() == ema.state_dict()
    old = NoiseScaleEMA(0.9)
    old.load_state_dict({"decay": 0.9, "ema_grad_sqr": 0.19, "ema_trace_sigma": 1.9, "num_updates": 2})
    assert old.grad_sqr == pytest.approx(1.0) and old.gns == pytest.approx(10.0)


# ------------------------------------------------------------------------------------------------
# the measurement budget


@pytest.mark.parametrize(("cost", "step"), [(0.0006, 0.001), (0.03, 0.004), (0.0001, 0.02), (0.002, 0.00005)])
def test_a_simulated_fit_measures_within_its_budget_and_keeps_measuring(cost, step):
    """A fit simulated step by step: each measured step costs ``cost`` more than the ``step`` of an
    unmeasured one; a decision (and a plan) every 20 steps. The early measurements' overspend is
    repaid (it only shrinks), the share ends at the budget, and no two measurements after the early
    ones lie further apart than the budget's spacing with the largest repayment factor."""
    budget = MeasurementBudget(0.02)
    elapsed, spent, taken = 0.0, 0.0, []
    overspend = {}
    for index in range(1, 50_001):
        elapsed += step
        if budget.step_begins():
            elapsed += cost
            spent += cost
            taken.append(index)
            budget.record(cost)
        if index % 20 == 0:
            budget.plan(elapsed, step, len(taken))
            if index % 5_000 == 0:
                overspend[index] = spent - 0.02 * elapsed
    assert len(taken) > EARLY_MEASUREMENTS + 5, "measurements keep coming"
    assert spent / elapsed <= 0.02 * 1.15, "the budget holds over the fit"
    later = [overspend[i] for i in sorted(overspend) if i >= 10_000]
    assert all(b <= a + cost for a, b in zip(later, later[1:], strict=False)), (
        "the overspend is repaid, not grown"
    )
    spacing = math.ceil(cost / (0.02 * step)) * MAX_REPAY_FACTOR
    gaps = [b - a for a, b in zip(taken[EARLY_MEASUREMENTS:], taken[EARLY_MEASUREMENTS + 1 :], strict=False)]
    assert max(gaps) <= spacing + 20, "a measurement is never older than the budget's spacing allows"
    assert 50_000 - taken[-1] <= spacing + 20
    assert budget.spent == pytest.approx(spent)


def test_measurements_start_every_other_step():
    budget = MeasurementBudget(0.02)
    taken = [step for step in range(20) if budget.step_begins()]
    assert taken == list(range(0, 20, 2))


def test_the_budget_survives_a_checkpoint():
    budget = MeasurementBudget(0.05)
    for _ in range(9):
        budget.step_begins()
        budget.record(0.001)
    budget.plan(1.0, 0.002, 9)
    restored = MeasurementBudget(0.05)
    restored.load_state_dict(budget.state_dict())
    assert [restored.step_begins() for _ in range(30)] == [budget.step_begins() for _ in range(30)]


# ------------------------------------------------------------------------------------------------
# the throughput model, seeded from the memory probe


def test_the_probe_slope_fits_the_trial_steps_and_needs_two_sizes():
    result = MemoryProbeResult(64, step_seconds=[(8, 0.0021), (512, 0.0071), (4096, 0.0429)])
    # Reference: the exact line through the trials' ends is 1e-5 s a row.
    assert result.seconds_per_row() == pytest.approx(1e-5, rel=0.02)
    assert MemoryProbeResult(64, step_seconds=[(8, 0.002)]).seconds_per_row() is None


def test_timed_sizes_close_together_keep_the_prior_slope_and_far_apart_replace_it():
    model = ThroughputModel()
    model.set_prior_slope(1e-5)
    # Two noisy medians a factor 2 apart whose own slope would be 0: the prior slope stays.
    model.observe(32, 0.0050)
    model.observe(64, 0.0050)
    alpha, beta = model.coefficients
    assert beta == pytest.approx(1e-5) and alpha == pytest.approx(0.0050 - 1e-5 * 48, rel=0.01)
    model.observe(1024, 0.0150)  # a span of 32: the timed sizes' own fit
    assert model.coefficients[1] != pytest.approx(1e-5)
    restored = ThroughputModel()
    restored.load_state_dict(model.state_dict())
    assert restored.prior_slope == 1e-5 and restored.coefficients == model.coefficients


def test_a_goodput_fit_starts_from_the_probe_and_never_explores():
    """A real fit: the probe's timed trials set the slope, so the first decisions (the warm-up, 5 and
    15 steps in) already move the batch by the model, with no exploration step."""
    cfg = RunConfig(data="synthetic-regression", rows=6000, features=8, batch_size=16, lr=0.05).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    resize = DynamicBatchSize(policy="goodput", lr_rule="adascale")
    quiet_trainer(1, [resize], limit_val_batches=0).fit(build_module(cfg, dm), datamodule=dm)
    assert resize.probe is not None and len(resize.probe.step_seconds) >= 2
    assert resize.controller.throughput.prior_slope == pytest.approx(resize.probe.seconds_per_row())
    reasons = [d["reason"] for d in resize.decisions]
    assert reasons and not any("exploring" in r for r in reasons), reasons
    assert resize.decisions[0]["step"] <= 15, "decided in the warm-up"
    assert resize.ema.num_updates >= EARLY_MEASUREMENTS


def test_the_lr_multiplier_stops_at_max_lr_scale():
    """Near the optimum (|G|² ~ 0) AdaScale's gain is the scale S itself: x64 at B=2048 from B0=32.
    Reference: adascale_gain computed directly; the controller caps it at 10 unless told otherwise."""
    from lightning_batch.plugin.policy import BatchSizeController, PolicyContext, adascale_gain

    ctx = PolicyContext(batch_size=2048, base_batch=32, grad_sqr=1e-9, trace_sigma=10.0, ceiling=4096)
    gain = adascale_gain(2048, 32, 1e-9, 10.0)
    assert gain == pytest.approx(64.0, rel=1e-3)
    capped = BatchSizeController("fixed", lr_rule="adascale", multiple=1)
    uncapped = BatchSizeController("fixed", lr_rule="adascale", multiple=1, max_lr_scale=None)
    fixed_ctx = PolicyContext(batch_size=2048, base_batch=2048, grad_sqr=1e-9, trace_sigma=10.0)
    assert capped.decide(fixed_ctx).lr_scale == pytest.approx(1.0)  # S = 1 at B0: nothing to cap
    noise = BatchSizeController("noise", lr_rule="adascale", multiple=1, max_step_factor=None)
    assert noise.decide(replace_batch(ctx, 32)).lr_scale == 10.0
    uncapped_noise = BatchSizeController(
        "noise", lr_rule="adascale", multiple=1, max_step_factor=None, max_lr_scale=None
    )
    assert uncapped_noise.decide(replace_batch(ctx, 32)).lr_scale > 10.0
    assert uncapped.max_lr_scale is None


def replace_batch(ctx, base):
    from dataclasses import replace

    return replace(ctx, base_batch=base)
