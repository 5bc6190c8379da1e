"""Tests for lightning_batch.plugin.policy: every expected value is computed independently of the code under test
(brute force, hand algebra, or the papers' formulas written out again)."""

from __future__ import annotations

import doctest
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_batch.plugin import policy
from lightning_batch.plugin.policy import (
    LR_RULES,
    POLICIES,
    AdaScaleLrRule,
    BatchGrid,
    BatchSizeController,
    FixedPolicy,
    GoodputPolicy,
    MemoryPolicy,
    NoisePolicy,
    PolicyContext,
    SchedulePolicy,
    ThroughputModel,
    adascale_gain,
    efficiency,
    make_lr_rule,
    make_policy,
)


def test_doctests() -> None:
    result = doctest.testmod(policy, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10
    assert result.failed == 0


# ------------------------------------------------------------------------------------------------------------
# independent reference implementations


def ref_goodput(b: int, b0: int, bn: float, alpha: float, beta: float) -> float:
    # Pollux: throughput(B) * (B_noise + B0) / (B_noise + B), throughput from t(B) = alpha + beta B.
    return (b / (alpha + beta * b)) * ((bn + b0) / (bn + b))


def ref_admissible(lo: int, hi: int, m: int) -> list[int]:
    """The documented rounding contract, enumerated: multiples of m and sizes below m, unless the range holds
    no multiple at all, in which case every integer."""
    multiples = [b for b in range(lo, hi + 1) if b % m == 0]
    if m == 1 or not multiples:
        return list(range(lo, hi + 1))
    return [b for b in range(lo, hi + 1) if b % m == 0 or b < m]


def fitted_model(alpha: float, beta: float, sizes: tuple[int, ...] = (16, 64)) -> ThroughputModel:
    m = ThroughputModel()
    for b in sizes:
        m.observe(b, alpha + beta * b)
    return m


# ------------------------------------------------------------------------------------------------------------
# ThroughputModel


def test_throughput_recovers_alpha_beta_from_noisy_times() -> None:
    rng = random.Random(1)
    alpha, beta = 0.045, 0.0012
    m = ThroughputModel(window=40)
    for _ in range(40):
        for b in (16, 32, 64, 128, 256):
            t = (alpha + beta * b) * math.exp(rng.gauss(0.0, 0.05))
            if rng.random() < 0.1:  # stalls: GC, checkpoint, data loader
                t *= 4.0
            m.observe(b, t)
    a_hat, b_hat = m.coefficients
    assert a_hat == pytest.approx(alpha, rel=0.1)
    assert b_hat == pytest.approx(beta, rel=0.05)
    assert m.throughput(100) == pytest.approx(100 / (alpha + beta * 100), rel=0.05)


def test_throughput_fallbacks_and_constraints() -> None:
    m = ThroughputModel()
    assert m.coefficients is None and m.throughput(10) is None and not m.is_fitted
    m.observe(32, 0.64)
    # One size: time proportional to B through the origin, i.e. constant throughput; not a fit.
    assert m.coefficients == (0.0, pytest.approx(0.02))
    assert m.throughput(1000) == pytest.approx(50.0)
    assert not m.is_fitted
    # Times that *fall* with B are noise: the fit must keep beta >= 0 and alpha >= 0.
    m2 = ThroughputModel()
    for b, t in ((16, 1.0), (32, 0.9), (64, 0.8)):
        m2.observe(b, t)
    a, b = m2.coefficients
    assert a >= 0 and b >= 0
    # the best feasible line is the constant: the mean weighted for relative errors (weights 1/t²)
    times = (1.0, 0.9, 0.8)
    weighted_mean = sum(1 / t for t in times) / sum(1 / t**2 for t in times)
    assert (a, b) == (pytest.approx(weighted_mean), 0.0)


def test_throughput_window_and_eviction() -> None:
    m = ThroughputModel(window=3, max_sizes=2)
    for t in (9.0, 9.0, 9.0, 1.0, 1.0, 1.0):
        m.observe(10, t)
    m.observe(20, 2.0)
    assert m.coefficients == (pytest.approx(0.0), pytest.approx(0.1))  # only the last 3 times of B=10 count
    m.observe(40, 4.0)  # evicts B=10, the least recently observed
    assert m.batch_sizes == [20, 40]


def test_throughput_state_dict_round_trip() -> None:
    m = fitted_model(0.02, 0.001, sizes=(8, 16, 32, 16))
    state = json.loads(json.dumps(m.state_dict()))
    m2 = ThroughputModel()
    m2.load_state_dict(state)
    assert m2.state_dict() == m.state_dict()
    assert m2.coefficients == m.coefficients
    with pytest.raises(ValueError, match="state_dict"):
        m2.load_state_dict({"nope": 1})


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0, "seconds": 1.0}, {"batch_size": 8, "seconds": 0.0}, {"batch_size": 8, "seconds": -1}],
)
def test_throughput_rejects_bad_measurements(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        ThroughputModel().observe(**kwargs)


# ------------------------------------------------------------------------------------------------------------
# efficiency and goodput


def test_efficiency_formula() -> None:
    assert efficiency(64, 64, 123.0) == 1.0
    assert efficiency(1000, 100, 0.0) == pytest.approx(0.1)  # no noise: only B0/B of the samples count
    assert efficiency(300, 100, 100.0) == pytest.approx(200 / 400)
    assert efficiency(50, 100, 100.0) == pytest.approx(200 / 150)
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        efficiency(0, 100, 1.0)


@settings(max_examples=150, deadline=None)
@given(
    alpha=st.floats(1e-4, 1.0),
    beta=st.floats(1e-7, 1e-2),
    bn=st.floats(0.0, 1e5),
    b0=st.integers(1, 1024),
    lo=st.integers(1, 64),
    width=st.integers(0, 3000),
    max_batch=st.none() | st.integers(64, 4096),
)
def test_goodput_argmax_matches_brute_force(alpha, beta, bn, b0, lo, width, max_batch) -> None:
    ceiling = lo + width
    ctx = PolicyContext(
        batch_size=lo,
        base_batch=b0,
        noise_scale=bn,
        ceiling=ceiling,
        min_batch=lo,
        max_batch=max(max_batch, lo) if max_batch is not None else None,
        throughput=fitted_model(alpha, beta),
    )
    hi = min(ceiling, ctx.max_batch) if ctx.max_batch is not None else ceiling
    got = GoodputPolicy(min_efficiency=0.0).propose(ctx)  # pure Pollux: the bound is tested below
    values = {b: ref_goodput(b, b0, bn, alpha, beta) for b in range(lo, hi + 1)}
    best = max(values.values())
    assert lo <= got <= hi
    # The model's alpha/beta are re-fitted from two points, so allow float round-off between near-ties.
    assert ref_goodput(got, b0, bn, alpha, beta) >= best * (1 - 1e-9)


@settings(max_examples=100, deadline=None)
@given(
    alpha=st.floats(1e-4, 1.0),
    beta=st.floats(1e-7, 1e-2),
    bn=st.floats(0.0, 1e5),
    b0=st.integers(1, 1024),
    lo=st.integers(1, 40),
    width=st.integers(0, 3000),
)
def test_goodput_argmax_with_rounding_step(alpha, beta, bn, b0, lo, width) -> None:
    hi = lo + width
    ctx = PolicyContext(
        batch_size=lo,
        base_batch=b0,
        noise_scale=bn,
        ceiling=hi,
        min_batch=lo,
        multiple=8,
        throughput=fitted_model(alpha, beta),
    )
    got = GoodputPolicy(min_efficiency=0.0).propose(ctx)
    allowed = ref_admissible(lo, hi, 8)
    assert got in allowed
    best_allowed = max(ref_goodput(b, b0, bn, alpha, beta) for b in allowed)
    assert ref_goodput(got, b0, bn, alpha, beta) >= best_allowed * (1 - 1e-9)
    # ... and within one rounding step of the unrestricted integer argmax.
    unrestricted = max(range(lo, hi + 1), key=lambda b: ref_goodput(b, b0, bn, alpha, beta))
    assert abs(got - unrestricted) <= 8


@settings(max_examples=150, deadline=None)
@given(
    alpha=st.floats(1e-5, 1.0),
    beta=st.floats(1e-8, 1e-2),
    bn=st.floats(0.0, 5e3),
    b0=st.integers(1, 256),
    width=st.integers(0, 4000),
    floor=st.sampled_from([0.25, 0.5, 0.8]),
)
def test_goodput_with_an_efficiency_floor_is_the_best_batch_that_keeps_the_floor(
    alpha, beta, bn, b0, width, floor
) -> None:
    """Brute force over every batch: the proposal is the goodput argmax among the batches whose
    efficiency (B_noise + B0) / (B_noise + B) is at least the floor (B0 itself always is)."""
    lo, hi = 1, 1 + width
    ctx = PolicyContext(
        batch_size=lo, base_batch=b0, noise_scale=bn, ceiling=hi, throughput=fitted_model(alpha, beta)
    )
    got = GoodputPolicy(min_efficiency=floor).propose(ctx)
    keeps = [b for b in range(lo, hi + 1) if (bn + b0) / (bn + b) >= floor * (1 - 1e-12)]
    assert got in keeps or got == lo
    best = max(ref_goodput(b, b0, bn, alpha, beta) for b in keeps)
    assert ref_goodput(got, b0, bn, alpha, beta) >= best * (1 - 1e-9)


def test_the_efficiency_floor_stops_a_fixed_cost_dominated_model_from_leaving_the_noise_scale_far_behind():
    # The digits CNN's demo run that ended at 91.5%: B_noise ~30 from B0=32, and a clock so noisy
    # that the step time looked flat in B (beta ~ 0). Pure Pollux goes to the ceiling, 8 times B_noise.
    flat = fitted_model(alpha=0.004, beta=1e-8)
    ctx = PolicyContext(batch_size=128, base_batch=32, noise_scale=30.0, ceiling=512, throughput=flat)
    assert GoodputPolicy(min_efficiency=0.0).propose(ctx) == 512
    bounded = GoodputPolicy(min_efficiency=0.5).propose(ctx)
    assert bounded == 94 and efficiency(bounded, 32, 30.0) >= 0.5 > efficiency(bounded + 1, 32, 30.0)


def test_goodput_falls_back_to_current_batch() -> None:
    base = {"batch_size": 96, "base_batch": 64, "ceiling": 4096}
    one_size = fitted_model(0.01, 0.001, sizes=(96,))
    assert (
        GoodputPolicy().propose(PolicyContext(**base, throughput=fitted_model(0.01, 0.001))) == 96
    )  # no B_noise
    assert GoodputPolicy().propose(PolicyContext(**base, noise_scale=500.0)) == 96  # no model
    assert GoodputPolicy().propose(PolicyContext(**base, noise_scale=500.0, throughput=one_size)) == 96
    # Exploring measures a second batch size instead of waiting forever.
    explorer = GoodputPolicy(explore_factor=2.0)
    assert explorer.propose(PolicyContext(**base, noise_scale=500.0, throughput=one_size)) == 192
    at_top = PolicyContext(batch_size=96, base_batch=64, ceiling=96, noise_scale=500.0, throughput=one_size)
    assert explorer.propose(at_top) == 48


def test_goodput_without_upper_bound_uses_closed_form() -> None:
    # B* = sqrt(alpha * B_noise / beta) = sqrt(0.02 * 2000 / 0.0001) = 632.5
    ctx = PolicyContext(
        batch_size=64, base_batch=64, noise_scale=2000.0, throughput=fitted_model(0.02, 0.0001)
    )
    got = GoodputPolicy().propose(ctx)
    brute = max(range(1, 5000), key=lambda b: ref_goodput(b, 64, 2000.0, 0.02, 0.0001))
    assert got == brute


# ------------------------------------------------------------------------------------------------------------
# lr rules


def test_adascale_limits_and_hand_computation() -> None:
    # sigma^2 = 0 (no noise): r = 1 for any scale.
    assert adascale_gain(512, 64, grad_sqr=3.0, trace_sigma=0.0) == pytest.approx(1.0)
    # |G|^2 = 0 (pure noise): r = S.
    assert adascale_gain(512, 64, grad_sqr=0.0, trace_sigma=5.0) == pytest.approx(8.0)
    # B0 = 64, B = 256 -> S = 4; tr = 128 -> sigma^2 = 2; |G|^2 = 1: r = (2 + 1) / (2/4 + 1) = 2.
    assert adascale_gain(256, 64, grad_sqr=1.0, trace_sigma=128.0) == pytest.approx(2.0)
    assert AdaScaleLrRule().scale(256, 64, 1.0, 128.0) == pytest.approx(2.0)
    # Missing statistics: lr0.
    assert AdaScaleLrRule().scale(256, 64) == 1.0
    assert AdaScaleLrRule().scale(256, 64, grad_sqr=1.0) == 1.0
    assert AdaScaleLrRule().scale(256, 64, grad_sqr=0.0, trace_sigma=0.0) == 1.0


@settings(max_examples=200, deadline=None)
@given(
    b0=st.integers(1, 512),
    scale=st.integers(1, 64),
    g2=st.floats(1e-6, 1e3),
    tr=st.floats(0.0, 1e6),
)
def test_adascale_in_range_and_equals_scaled_efficiency(b0, scale, g2, tr) -> None:
    b = b0 * scale
    r = adascale_gain(b, b0, grad_sqr=g2, trace_sigma=tr)
    assert 1.0 - 1e-9 <= r <= scale * (1 + 1e-9)
    # Substituting sigma^2 = B_noise |G|^2 / B0 gives r = S (B_noise + B0) / (B_noise + B).
    bn = tr / g2
    assert r == pytest.approx(scale * (bn + b0) / (bn + b), rel=1e-9)


def test_simple_lr_rules() -> None:
    assert make_lr_rule("none").scale(300, 100) == 1.0
    assert make_lr_rule("linear").scale(300, 100) == pytest.approx(3.0)
    assert make_lr_rule("sqrt").scale(300, 100) == pytest.approx(math.sqrt(3.0))
    assert make_lr_rule("linear").scale(50, 100) == pytest.approx(0.5)
    assert set(LR_RULES) == {"none", "linear", "sqrt", "adascale"}


# ------------------------------------------------------------------------------------------------------------
# controller: hysteresis, rounding, bounds, ceiling


def noise_ctx(current: int, bn: float, **kw) -> PolicyContext:
    return PolicyContext(batch_size=current, base_batch=64, noise_scale=bn, **kw)


@pytest.mark.parametrize(
    ("bn", "changes"), [(104.0, False), (105.0, False), (95.0, False), (106.0, True), (94.0, True)]
)
def test_hysteresis_on_relative_size_change(bn: float, changes: bool) -> None:
    ctl = BatchSizeController(NoisePolicy(), multiple=1)
    d = ctl.decide(noise_ctx(100, bn))
    assert d.changed is changes
    assert d.batch_size == (round(bn) if changes else 100)
    assert d.predicted_gain == pytest.approx(abs(bn / 100 - 1))
    assert d.proposed == round(bn)


def test_hysteresis_on_goodput_gain() -> None:
    alpha, beta, bn, b0 = 0.05, 0.0005, 4000.0, 64
    ctl = BatchSizeController(GoodputPolicy(), multiple=1, throughput=fitted_model(alpha, beta))
    opt = max(range(1, 3000), key=lambda b: ref_goodput(b, b0, bn, alpha, beta))
    ratio = {
        b: ref_goodput(opt, b0, bn, alpha, beta) / ref_goodput(b, b0, bn, alpha, beta) for b in range(1, 3000)
    }
    near = min(
        (b for b in ratio if 1.0 < ratio[b] <= 1.049), key=lambda b: -abs(b - opt)
    )  # farthest still <5%
    far = max(b for b in ratio if ratio[b] > 1.06 and b < opt)
    d_near = ctl.decide(PolicyContext(batch_size=near, base_batch=b0, noise_scale=bn))
    assert not d_near.changed and d_near.batch_size == near
    assert d_near.predicted_gain == pytest.approx(ratio[near] - 1, rel=1e-6)
    d_far = ctl.decide(PolicyContext(batch_size=far, base_batch=b0, noise_scale=bn))
    assert d_far.changed and d_far.batch_size == opt
    assert d_far.predicted_gain == pytest.approx(ratio[far] - 1, rel=1e-6)


def test_batch_grid_rounding() -> None:
    g = BatchGrid(lo=1, hi=1000, multiple=8)
    assert [g.round(x) for x in (1, 3, 7, 8, 11, 12, 13, 1000, 5000)] == [1, 3, 7, 8, 8, 8, 16, 1000, 1000]
    assert BatchGrid(lo=9, hi=15, multiple=8).round(12) == 12  # no multiple of 8 in range: bounds win
    assert BatchGrid(lo=9, hi=20, multiple=8).round(9) == 16
    assert BatchGrid(lo=1, hi=5, multiple=8).round(100) == 5
    assert BatchGrid.from_bounds(min_batch=64, max_batch=None, ceiling=40, multiple=8) == BatchGrid(40, 40, 8)


@settings(max_examples=200, deadline=None)
@given(
    min_batch=st.integers(1, 40),
    extra=st.integers(0, 300),
    ceiling=st.none() | st.integers(1, 400),
    multiple=st.sampled_from([1, 2, 8, 16]),
    proposal=st.floats(0.0, 2000.0),
)
def test_controller_output_is_rounded_and_bounded(min_batch, extra, ceiling, multiple, proposal) -> None:
    max_batch = min_batch + extra
    ctl = BatchSizeController(
        NoisePolicy(),
        min_batch=min_batch,
        max_batch=max_batch,
        multiple=multiple,
        hysteresis=0,
        max_step_factor=None,  # rounding and bounds alone (the trust region has its own test)
    )
    d = ctl.decide(noise_ctx(min(max_batch, ceiling or max_batch), proposal, ceiling=ceiling))
    hi = max_batch if ceiling is None else min(max_batch, ceiling)
    lo = min(min_batch, hi)
    assert d.batch_size in ref_admissible(lo, hi, multiple)
    # Rounding moves a proposal by at most one step (unless the bounds clamp it). Compared with the
    # unrounded proposal: Python's round() takes ties to even (2.5 -> 2), the grid rounds them up.
    clamped = min(max(proposal, lo), hi)
    assert abs(d.batch_size - clamped) <= max(multiple, 1) or d.batch_size in (lo, hi)


@settings(max_examples=200, deadline=None)
@given(
    current=st.integers(1, 4096),
    proposal=st.floats(1, 1e6),
    factor=st.sampled_from([2.0, 4.0, 8.0]),
    multiple=st.sampled_from([1, 8]),
)
def test_trust_region_moves_at_most_factor_per_decision(current, proposal, factor, multiple) -> None:
    ctl = BatchSizeController(NoisePolicy(), multiple=multiple, hysteresis=0, max_step_factor=factor)
    d = ctl.decide(noise_ctx(current, proposal))
    unbounded = BatchSizeController(NoisePolicy(), multiple=multiple, hysteresis=0, max_step_factor=None)
    free = unbounded.decide(noise_ctx(current, proposal)).batch_size
    # within the region (up to one rounding step), and in the same direction as the free proposal
    assert current / factor - multiple <= d.batch_size <= current * factor + multiple
    assert (d.batch_size - current) * (free - current) >= 0
    if current / factor <= free <= current * factor:
        assert d.batch_size == free


def test_small_batches_survive_rounding() -> None:
    ctl = BatchSizeController(NoisePolicy(), min_batch=1, max_batch=7, multiple=8, hysteresis=0)
    assert ctl.decide(noise_ctx(4, 3.0)).batch_size == 3
    ctl = BatchSizeController(NoisePolicy(), min_batch=1, multiple=8, hysteresis=0)
    assert ctl.decide(noise_ctx(4, 2.0)).batch_size == 2


def test_ceiling_shrink_forces_change() -> None:
    # 256 -> 248 is a 3% change, below the hysteresis, but 256 no longer fits.
    ctl = BatchSizeController("fixed", multiple=8)
    d = ctl.decide(PolicyContext(batch_size=256, base_batch=256, ceiling=250))
    assert d.changed and d.batch_size == 248
    assert d.reason.startswith("forced")
    # The same with a goodput policy that would otherwise hold.
    ctl = BatchSizeController(GoodputPolicy(), multiple=1, throughput=fitted_model(0.01, 0.001))
    d = ctl.decide(PolicyContext(batch_size=512, base_batch=64, noise_scale=1e9, ceiling=500))
    assert d.batch_size <= 500 and d.changed and d.reason.startswith("forced")
    # Ceiling below min_batch: memory wins.
    ctl = BatchSizeController("fixed", min_batch=64, multiple=8)
    assert ctl.decide(PolicyContext(batch_size=64, base_batch=64, ceiling=20)).batch_size == 20


def test_ceiling_growth_is_not_forced() -> None:
    ctl = BatchSizeController("memory", multiple=1)
    d = ctl.decide(PolicyContext(batch_size=1000, base_batch=64, ceiling=1030))
    assert not d.changed and d.batch_size == 1000  # +3% is not worth a change


def test_controller_lr_scale_follows_rule() -> None:
    ctl = BatchSizeController("schedule", lr_rule="linear", multiple=1)
    ctl.policy = SchedulePolicy([1])
    assert ctl.decide(PolicyContext(batch_size=64, base_batch=64, epoch=0)).lr_scale == 1.0
    d = ctl.decide(PolicyContext(batch_size=64, base_batch=64, epoch=1))
    assert (d.batch_size, d.lr_scale) == (128, 2.0)
    # Held changes keep the lr of the batch actually used.
    ctl = BatchSizeController(NoisePolicy(), lr_rule="linear", multiple=1)
    assert ctl.decide(noise_ctx(100, 103.0)).lr_scale == pytest.approx(100 / 64)
    # AdaScale gets tr(Sigma) derived from B_noise * |G|^2 when only those are given.
    ctl = BatchSizeController("fixed", lr_rule="adascale", multiple=1)
    d = ctl.decide(PolicyContext(batch_size=256, base_batch=256, noise_scale=128.0, grad_sqr=1.0))
    assert d.lr_scale == 1.0  # B = B0
    ctl = BatchSizeController(NoisePolicy(), lr_rule="adascale", multiple=1)
    d = ctl.decide(PolicyContext(batch_size=64, base_batch=64, noise_scale=256.0, grad_sqr=2.0))
    assert d.batch_size == 256 and d.lr_scale == pytest.approx(4 * (256 + 64) / (256 + 256))


def test_controller_feeds_step_times_and_round_trips_state() -> None:
    ctl = BatchSizeController(GoodputPolicy(), multiple=1)
    times = [(32, 0.01 + 0.001 * 32), (64, 0.01 + 0.001 * 64)] * 3
    d = ctl.decide(
        PolicyContext(batch_size=32, base_batch=32, noise_scale=900.0, ceiling=4096, step_times=times)
    )
    assert d.batch_size == max(range(1, 4097), key=lambda b: ref_goodput(b, 32, 900.0, 0.01, 0.001))
    state = json.loads(json.dumps(ctl.state_dict()))
    ctl2 = BatchSizeController(GoodputPolicy(), multiple=1)
    ctl2.load_state_dict(state)
    assert ctl2.state_dict() == ctl.state_dict()
    ctx = PolicyContext(batch_size=40, base_batch=32, noise_scale=2500.0, ceiling=4096)
    assert ctl2.decide(ctx) == ctl.decide(ctx)
    with pytest.raises(ValueError, match="state_dict"):
        ctl2.load_state_dict({})


# ------------------------------------------------------------------------------------------------------------
# the other policies


def test_schedule_milestones() -> None:
    p = SchedulePolicy(milestones=[10, 20, 30], factor=[2.0, 2.0, 1.5])
    expected = {0: 100, 9: 100, 10: 200, 19: 200, 20: 400, 29: 400, 30: 600, 100: 600}
    assert {e: p.propose(PolicyContext(batch_size=1, base_batch=100, epoch=e)) for e in expected} == expected
    assert SchedulePolicy().propose(PolicyContext(batch_size=7, base_batch=100, epoch=50)) == 100
    for bad in (
        {"milestones": [5, 5]},
        {"milestones": [3], "factor": [2, 2]},
        {"milestones": [-1]},
        {"factor": 0},
    ):
        with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
            SchedulePolicy(**bad)


def test_fixed_memory_noise_policies() -> None:
    assert (
        FixedPolicy().propose(PolicyContext(batch_size=10, base_batch=64, ceiling=32)) == 64
    )  # controller clamps
    assert MemoryPolicy().propose(PolicyContext(batch_size=10, base_batch=64)) == 10
    assert (
        MemoryPolicy().propose(PolicyContext(batch_size=10, base_batch=64, ceiling=700, max_batch=512)) == 512
    )
    assert (
        MemoryPolicy().propose(PolicyContext(batch_size=10, base_batch=64, ceiling=300, max_batch=512)) == 300
    )
    assert NoisePolicy(k=2.0).propose(noise_ctx(10, 50.0, ceiling=1000)) == 100
    assert NoisePolicy().propose(noise_ctx(10, 50.0, ceiling=30)) == 30
    assert NoisePolicy().propose(noise_ctx(10, 0.2, min_batch=4)) == 4
    assert NoisePolicy().propose(PolicyContext(batch_size=10, base_batch=64)) == 10  # no estimate yet
    # B_noise derived from tr(Sigma) / |G|^2
    assert (
        NoisePolicy().propose(PolicyContext(batch_size=10, base_batch=64, grad_sqr=0.5, trace_sigma=60.0))
        == 120
    )


# ------------------------------------------------------------------------------------------------------------
# argument errors


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError) as e:
        make_policy("pollux")
    for name in POLICIES:
        assert name in str(e.value)
    with pytest.raises(ValueError) as e:
        make_lr_rule("cosine")
    for name in ("none", "linear", "sqrt", "adascale"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="Accepted: k"):
        make_policy("noise", kk=2)
    with pytest.raises(ValueError, match="Pass one of"):
        BatchSizeController("nope")
    assert isinstance(make_policy("GOODPUT"), GoodputPolicy)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0, "base_batch": 8},
        {"batch_size": 8, "base_batch": 8, "ceiling": 0},
        {"batch_size": 8, "base_batch": 8, "noise_scale": -1.0},
        {"batch_size": 8, "base_batch": 8, "noise_scale": float("nan")},
        {"batch_size": True, "base_batch": 8},
        {"batch_size": 8.5, "base_batch": 8},
        {"batch_size": 8, "base_batch": 8, "min_batch": 16, "max_batch": 8},
        {"batch_size": 8, "base_batch": 8, "epoch": -1},
    ],
)
def test_context_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        PolicyContext(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_batch": 0},
        {"max_batch": 0},
        {"multiple": 0},
        {"hysteresis": -0.1},
        {"lr_rule": "nope"},
        {"lr_rule": 3},
    ],
)
def test_controller_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        BatchSizeController("fixed", **kwargs)


def test_policy_args_rejected() -> None:
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        NoisePolicy(k=0)
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        GoodputPolicy(explore_factor=1.0)
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        ThroughputModel(max_sizes=1)


# ------------------------------------------------------------------------------------------------------------
# gaps found by `make mutate`


@pytest.mark.parametrize(
    ("lo", "hi", "m"), [(1, 40, 8), (5, 30, 8), (9, 15, 8), (3, 7, 8), (1, 20, 1), (6, 6, 4)]
)
def test_grid_contains_exactly_the_admissible_sizes(lo: int, hi: int, m: int) -> None:
    grid = BatchGrid(lo=lo, hi=hi, multiple=m)
    admissible = set(ref_admissible(lo, hi, m))
    assert {b for b in range(0, hi + 10) if grid.contains(b)} == admissible


def test_observe_step_feeds_the_throughput_model() -> None:
    ctl = BatchSizeController("goodput")
    ctl.observe_step(32, 0.01 + 0.001 * 32)
    ctl.observe_step(64, 0.01 + 0.001 * 64)
    assert ctl.throughput.batch_sizes == [32, 64]
    assert ctl.throughput.coefficients == pytest.approx((0.01, 0.001))


def test_decision_as_dict_has_every_field_under_its_own_name() -> None:
    import dataclasses

    d = BatchSizeController("fixed", multiple=1).decide(PolicyContext(batch_size=48, base_batch=64))
    assert d.as_dict() == dataclasses.asdict(d)
    json.dumps(d.as_dict())


def test_goodput_gain_is_unknown_until_the_model_is_fitted_and_bnoise_known() -> None:
    one_size = ThroughputModel()
    one_size.observe(32, 0.05)
    ctx = PolicyContext(batch_size=32, base_batch=32, noise_scale=100.0, throughput=one_size)
    assert GoodputPolicy().predicted_gain(ctx, 64) is None
    fitted = fitted_model(0.01, 0.001)
    assert (
        GoodputPolicy().predicted_gain(PolicyContext(batch_size=32, base_batch=32, throughput=fitted), 64)
        is None
    )
    with_bn = PolicyContext(batch_size=32, base_batch=32, noise_scale=100.0, throughput=fitted)
    expected = ref_goodput(64, 32, 100.0, 0.01, 0.001) / ref_goodput(32, 32, 100.0, 0.01, 0.001) - 1.0
    assert GoodputPolicy().predicted_gain(with_bn, 64) == pytest.approx(expected)


def test_reprs_name_the_class() -> None:
    assert repr(FixedPolicy()) == "FixedPolicy()"
    assert repr(MemoryPolicy()) == "MemoryPolicy()"
    assert repr(make_lr_rule("none")) == "NoLrRule()"
    assert repr(make_lr_rule("adascale")) == "AdaScaleLrRule()"


def test_controller_state_round_trips_a_stateful_policy() -> None:
    class CountingPolicy(FixedPolicy):
        def __init__(self) -> None:
            self.calls = 0

        def propose_with_reason(self, ctx: PolicyContext) -> tuple[int, str]:
            self.calls += 1
            return super().propose_with_reason(ctx)

        def state_dict(self) -> dict:
            return {"calls": self.calls}

        def load_state_dict(self, state: dict) -> None:
            self.calls = state["calls"]

    ctl = BatchSizeController(CountingPolicy())
    for _ in range(3):
        ctl.decide(PolicyContext(batch_size=64, base_batch=64))
    restored = BatchSizeController(CountingPolicy())
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert restored.policy.calls == 3


def test_schedule_accepts_epoch_zero_and_factors_below_one() -> None:
    p = SchedulePolicy(milestones=[0, 2], factor=0.5)
    assert [p.propose(PolicyContext(batch_size=64, base_batch=64, epoch=e)) for e in (0, 1, 2)] == [
        32,
        32,
        16,
    ]
    per_milestone = SchedulePolicy(milestones=[1], factor=[0.5])
    assert per_milestone.propose(PolicyContext(batch_size=8, base_batch=8, epoch=1)) == 4


@pytest.mark.parametrize("factor", [0.0, [0.0], [2.0, 0.0]])
def test_schedule_refuses_a_zero_factor(factor) -> None:
    milestones = [1, 2] if isinstance(factor, list) and len(factor) == 2 else [1]
    with pytest.raises(ValueError, match="factor"):
        SchedulePolicy(milestones=milestones, factor=factor)


def test_schedule_never_proposes_below_one_row() -> None:
    p = SchedulePolicy(milestones=[1], factor=0.25)
    assert p.propose(PolicyContext(batch_size=2, base_batch=2, epoch=1)) == 1  # round(0.5) = 0 -> 1
    assert SchedulePolicy().propose(PolicyContext(batch_size=1, base_batch=1)) == 1


def test_throughput_at_zero_batch_cannot_be_predicted_through_the_origin() -> None:
    m = ThroughputModel()
    m.observe(32, 0.064)  # one size: t(B) = B * 0.002, through the origin
    assert m.throughput(0) is None
    assert m.throughput(100) == pytest.approx(500.0)


def _brute_below_above(lo: int, hi: int, m: int, x: float) -> tuple[int | None, int | None]:
    admissible = ref_admissible(lo, hi, m)
    below = [b for b in admissible if b <= x + 1e-9]
    above = [b for b in admissible if b >= x - 1e-9]
    return (max(below) if below else None), (min(above) if above else None)


@pytest.mark.parametrize(("lo", "hi", "m"), [(1, 40, 8), (8, 24, 8), (9, 30, 8), (5, 7, 8), (3, 17, 1)])
def test_below_and_above_match_brute_force(lo: int, hi: int, m: int) -> None:
    grid = BatchGrid(lo=lo, hi=hi, multiple=m)
    # integers and points between them, inside and outside [lo, hi]; and integers with float round-off
    # inside (the bounds themselves are exact: below(lo - 1e-12) is None)
    points = [v + d for v in range(0, hi + 4) for d in (0.0, 0.5)]
    points += [v + d for v in range(lo + 1, hi) for d in (-1e-12, 1e-12)]
    for x in points:
        assert (grid.below(x), grid.above(x)) == _brute_below_above(lo, hi, m, x), x


def test_above_without_an_upper_bound() -> None:
    grid = BatchGrid(lo=3, hi=None, multiple=8)
    assert [grid.above(x) for x in (1.0, 5.0, 8.0, 9.0, 16.0, 1000.5)] == [3, 5, 8, 16, 16, 1008]


@pytest.mark.parametrize("kwargs", [dict(noise_scale=-1.0), dict(base_batch=0), dict(batch_size=0)])
def test_efficiency_refuses_each_bad_argument(kwargs: dict) -> None:
    args = dict(batch_size=64, base_batch=32, noise_scale=10.0) | kwargs
    with pytest.raises(ValueError):
        efficiency(**args)


@pytest.mark.parametrize(("alpha", "beta"), [(0.01, 0.0), (0.5, 0.0), (0.0, 0.001), (0.0, 2.0), (0.0, 0.0)])
def test_goodput_argmax_at_the_edges_of_the_throughput_model(alpha: float, beta: float) -> None:
    grid = BatchGrid(lo=4, hi=100, multiple=8)
    got = policy.goodput_argmax(alpha, beta, 50.0, 32, grid)
    if alpha == 0.0 and beta == 0.0:
        assert got is None  # t(B) = 0: no model
    elif beta == 0.0:
        assert got == 96  # constant step time: goodput grows with B, the largest admissible size
        assert policy.goodput_argmax(alpha, beta, 50.0, 32, BatchGrid(lo=4, hi=None, multiple=8)) is None
    else:
        assert got == 4  # no fixed cost: goodput falls with B, the smallest admissible size
    if got is not None:
        values = {b: ref_goodput(b, 32, 50.0, alpha, beta) for b in ref_admissible(4, 100, 8)}
        assert values[got] == max(values.values())


def test_goodput_argmax_exact_tie_goes_to_the_smaller_batch() -> None:
    # goodput(c1) == goodput(c2) exactly when alpha * B_noise == beta * c1 * c2: here 1 * 128 == 1 * 8 * 16
    assert ref_goodput(8, 64, 128.0, 1.0, 1.0) == ref_goodput(16, 64, 128.0, 1.0, 1.0)
    assert policy.goodput_argmax(1.0, 1.0, 128.0, 64, BatchGrid(lo=8, hi=64, multiple=8)) == 8


def test_throughput_accepts_one_row_and_keeps_each_window() -> None:
    m = ThroughputModel(window=4)
    m.observe(1, 0.5)
    for t in (1.0, 1.0, 1.0, 100.0):  # one slow step: the median ignores it
        m.observe(32, t)
    assert m.batch_sizes == [1, 32]
    assert m.state_dict()["samples"] == [[1, [0.5]], [32, [1.0, 1.0, 1.0, 100.0]]]


def test_grid_refuses_hi_below_lo_and_rounds_to_one_by_default() -> None:
    with pytest.raises(ValueError, match="hi"):
        BatchGrid(lo=5, hi=3)
    grid = BatchGrid.from_bounds(1, None, 50)
    assert (grid.lo, grid.hi, grid.round(13)) == (1, 50, 13)


def test_controller_defaults_are_the_documented_ones() -> None:
    ctl = BatchSizeController()
    assert isinstance(ctl.policy, FixedPolicy) and repr(ctl.lr_rule) == "NoLrRule()"
    assert (ctl.min_batch, ctl.max_batch, ctl.multiple) == (1, None, 8)
    assert (ctl.hysteresis, ctl.max_step_factor, ctl.num_changes) == (0.05, 4.0, 0)
    m = ThroughputModel()
    for b in range(1, 10):  # nine sizes: the least recently observed is dropped
        m.observe(b, 0.01 * b)
    for _ in range(40):
        m.observe(9, 0.09)
    assert m.batch_sizes == list(range(2, 10))
    assert len(m.state_dict()["samples"][-1][1]) == 32
    assert ThroughputModel(window=1).window == 1


def test_controller_takes_rule_and_policy_objects_and_a_strict_step_factor() -> None:
    ctl = BatchSizeController(NoisePolicy(k=2.0), lr_rule=policy.SqrtLrRule(), multiple=1)
    d = ctl.decide(PolicyContext(batch_size=64, base_batch=64, noise_scale=64.0))
    assert (d.batch_size, d.lr_scale) == (128, pytest.approx(math.sqrt(2.0)))
    with pytest.raises(ValueError, match="max_step_factor"):
        BatchSizeController(max_step_factor=1.0)


def test_reasons_name_their_outcome_and_gain_is_zero_when_kept() -> None:
    ctl = BatchSizeController("noise", multiple=1, hysteresis=0.1)
    keep = ctl.decide(PolicyContext(batch_size=64, base_batch=64, noise_scale=64.0))
    hold = ctl.decide(PolicyContext(batch_size=64, base_batch=64, noise_scale=67.0))
    change = ctl.decide(PolicyContext(batch_size=64, base_batch=64, noise_scale=100.0))
    forced = ctl.decide(PolicyContext(batch_size=64, base_batch=64, noise_scale=100.0, ceiling=32))
    ctl.decide(PolicyContext(batch_size=64, base_batch=64, noise_scale=64.0))  # another keep
    assert [d.reason.split(":")[0] for d in (keep, hold, change, forced)] == [
        "keep",
        "hold",
        "change",
        "forced",
    ]
    assert [d.changed for d in (keep, hold, change, forced)] == [False, False, True, True]
    assert keep.predicted_gain == 0.0
    assert hold.predicted_gain == pytest.approx(3 / 64)
    assert ctl.num_changes == 2


def test_adascale_in_the_controller_prefers_a_given_trace_over_one_derived_from_the_noise_scale() -> None:
    ctl = BatchSizeController("fixed", lr_rule="adascale", multiple=1, min_batch=128)  # stays at B = 128
    # r = (sigma2 + |G|^2) / (sigma2 / S + |G|^2) with sigma2 = tr(Sigma) / B0 and S = B / B0 = 2
    given = ctl.decide(
        PolicyContext(batch_size=128, base_batch=64, noise_scale=10.0, grad_sqr=1.0, trace_sigma=64.0)
    )
    assert given.batch_size == 128
    assert given.lr_scale == pytest.approx((1.0 + 1.0) / (1.0 / 2 + 1.0))
    derived = ctl.decide(PolicyContext(batch_size=128, base_batch=64, noise_scale=10.0, grad_sqr=1.0))
    sigma2 = 10.0 * 1.0 / 64  # tr(Sigma) = B_noise * |G|^2
    assert derived.lr_scale == pytest.approx((sigma2 + 1.0) / (sigma2 / 2 + 1.0))


@pytest.mark.parametrize("value", [True, "0.1", None])
def test_float_arguments_refuse_bools_and_non_numbers(value) -> None:
    with pytest.raises(ValueError, match="finite number"):
        BatchSizeController(hysteresis=value)
    with pytest.raises(ValueError, match="finite number"):
        PolicyContext(
            batch_size=8, base_batch=8, grad_sqr=1.0, trace_sigma=value if value is not None else True
        )


def test_context_accepts_small_statistics_and_normalises_step_times() -> None:
    ctx = PolicyContext(batch_size=8, base_batch=8, grad_sqr=0.25, trace_sigma=0.5, step_times=[[32.0, 1]])
    assert ctx.b_noise == 2.0
    assert ctx.step_times == ((32, 1.0),)
    assert all(type(b) is int and type(t) is float for b, t in ctx.step_times)


def test_a_decision_records_its_sizes_lr_scale_statistics_and_reason() -> None:
    ctx = PolicyContext(batch_size=32, base_batch=32, grad_sqr=2.0, trace_sigma=50.0)
    decision = BatchSizeController("noise", multiple=1).decide(ctx)
    assert decision.record(32, decision.batch_size, 1.5, ctx) == {
        "from": 32,
        "to": decision.batch_size,
        "lr_scale": 1.5,
        "grad_sqr": 2.0,
        "grad_var": 50.0,
        "reason": decision.reason,
    }


def test_the_controller_and_policy_a_callback_runs_come_from_its_options() -> None:
    from lightning_batch.plugin.options import BatchSizeOptions
    from lightning_batch.plugin.policy import policy_from_options

    options = BatchSizeOptions(
        policy="goodput",
        explore_factor=3.0,
        min_efficiency=0.4,
        lr_rule="linear",
        min_batch=4,
        max_batch=256,
        multiple=2,
        hysteresis=0.1,
        max_lr_scale=3.0,
    )
    ctl = BatchSizeController.from_options(options)
    assert (ctl.min_batch, ctl.max_batch, ctl.multiple, ctl.hysteresis, ctl.max_lr_scale) == (
        4,
        256,
        2,
        0.1,
        3.0,
    )
    assert repr(ctl.lr_rule) == "LinearLrRule()"
    assert (ctl.policy.explore_factor, ctl.policy.min_efficiency) == (3.0, 0.4)
    assert repr(BatchSizeController.from_options(options, lr_rule="sqrt").lr_rule) == "SqrtLrRule()"
    assert policy_from_options(BatchSizeOptions()).name == "goodput"  # auto
    assert policy_from_options(BatchSizeOptions(policy="noise", noise_k=2.0)).k == 2.0
    mine = NoisePolicy(k=3.0)
    assert policy_from_options(BatchSizeOptions(policy=mine)) is mine


# -- optimizer steps of accumulated passes ------------------------------------------------------------


def test_a_pass_model_read_per_optimizer_step():
    from lightning_batch.plugin.policy import PerOptimizerStep

    passes = ThroughputModel()
    steps = PerOptimizerStep(passes, 4)
    assert steps.coefficients is None and steps.step_time(64) is None and steps.throughput(64) is None
    assert not steps.is_fitted and steps.batch_sizes == []
    passes.observe(16, 0.10)
    passes.observe(16, 0.12)
    passes.observe(32, 0.18)
    assert steps.is_fitted and steps.batch_sizes == [64, 128]
    assert steps.times_at(64) == pytest.approx([0.40, 0.48]) and steps.times_at(66) == []
    alpha, beta = passes.coefficients
    assert steps.coefficients == pytest.approx((4 * alpha, beta))
    assert steps.step_time(128) == pytest.approx(4 * passes.step_time(32))
    assert steps.throughput(128) == pytest.approx(128 / (4 * passes.step_time(32)))


def test_a_controller_of_accumulated_passes_decides_as_one_timed_in_whole_steps():
    """Passes of B/k rows timed t, read per step, are steps of B rows timed k*t."""
    ctx = PolicyContext(batch_size=64, base_batch=64, noise_scale=300.0, ceiling=4096)
    passes, whole = ThroughputModel(), ThroughputModel()
    for rows, seconds in [(16, 0.010), (32, 0.012), (64, 0.016)]:
        passes.observe(rows, seconds)
        whole.observe(4 * rows, 4 * seconds)
    accumulating = BatchSizeController("goodput", throughput=passes)
    accumulating.accumulation = 4
    plain = BatchSizeController("goodput", throughput=whole)
    a, b = accumulating.decide(ctx), plain.decide(ctx)
    assert (a.batch_size, a.reason) == (b.batch_size, b.reason)
    assert a.batch_size != ctx.batch_size, "the steps' model moves the batch"
    one = BatchSizeController("goodput", throughput=passes)  # read as steps of one pass: another answer
    assert one.decide(ctx).batch_size != a.batch_size
