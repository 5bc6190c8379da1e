"""Every checked argument of the plugin's math takes the edge of its range and refuses just past it.

Each case builds the object with a value on the bound (accepted) and one just outside (refused with a
one-line ``ValueError`` naming the argument), so a bound that moves, or a check that is dropped, fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from lightning_batch.plugin.cadence import DecisionCadence, MeasurementBudget
from lightning_batch.plugin.noise import NoiseScaleEMA, unbiased_grad_stats
from lightning_batch.plugin.policy import (
    BatchGrid,
    BatchSizeController,
    GoodputPolicy,
    NoisePolicy,
    PolicyContext,
    SchedulePolicy,
    ThroughputModel,
)

#: (what, build(value), on the bound, just outside)
CASES: list[tuple[str, Callable[[Any], object], Any, Any]] = [
    ("controller min_batch", lambda v: BatchSizeController(min_batch=v), 1, 0),
    ("controller max_batch", lambda v: BatchSizeController(min_batch=4, max_batch=v), 4, 3),
    ("controller multiple", lambda v: BatchSizeController(multiple=v), 1, 0),
    ("controller hysteresis", lambda v: BatchSizeController(hysteresis=v), 0.0, -1e-9),
    ("controller max_step_factor", lambda v: BatchSizeController(max_step_factor=v), 1.0 + 1e-9, 1.0),
    ("controller max_lr_scale", lambda v: BatchSizeController(max_lr_scale=v), 1.0, 1.0 - 1e-9),
    ("noise k", lambda v: NoisePolicy(k=v), 1e-9, 0.0),
    ("goodput explore_factor", lambda v: GoodputPolicy(explore_factor=v), 1.0 + 1e-9, 1.0),
    ("goodput min_efficiency", lambda v: GoodputPolicy(min_efficiency=v), 0.0, -1e-9),
    ("schedule milestone", lambda v: SchedulePolicy(milestones=[v]), 0, -1),
    ("schedule factor", lambda v: SchedulePolicy(milestones=[3], factor=v), 1e-9, 0.0),
    ("schedule factors", lambda v: SchedulePolicy(milestones=[3], factor=[v]), 1e-9, 0.0),
    ("throughput window", lambda v: ThroughputModel(window=v), 1, 0),
    ("throughput max_sizes", lambda v: ThroughputModel(max_sizes=v), 2, 1),
    ("throughput prior slope", lambda v: ThroughputModel().set_prior_slope(v), 0.0, -1e-12),
    ("throughput batch", lambda v: ThroughputModel().observe(v, 1.0), 1, 0),
    ("throughput seconds", lambda v: ThroughputModel().observe(8, v), 1e-12, 0.0),
    ("grid lo", lambda v: BatchGrid(lo=v, hi=None, multiple=1), 1, 0),
    ("grid hi", lambda v: BatchGrid(lo=8, hi=v, multiple=1), 8, 7),
    ("grid multiple", lambda v: BatchGrid(lo=1, hi=None, multiple=v), 1, 0),
    ("context batch_size", lambda v: PolicyContext(batch_size=v, base_batch=8), 1, 0),
    ("context base_batch", lambda v: PolicyContext(batch_size=8, base_batch=v), 1, 0),
    ("context noise_scale", lambda v: PolicyContext(8, 8, noise_scale=v), 0.0, -1e-9),
    ("context grad_sqr", lambda v: PolicyContext(8, 8, grad_sqr=v), 0.0, -1e-9),
    ("context trace_sigma", lambda v: PolicyContext(8, 8, trace_sigma=v), 0.0, -1e-9),
    ("context ceiling", lambda v: PolicyContext(8, 8, ceiling=v), 1, 0),
    ("context epoch", lambda v: PolicyContext(8, 8, epoch=v), 0, -1),
    ("context min_batch", lambda v: PolicyContext(8, 8, min_batch=v), 1, 0),
    ("context max_batch", lambda v: PolicyContext(8, 8, min_batch=4, max_batch=v), 4, 3),
    ("context multiple", lambda v: PolicyContext(8, 8, multiple=v), 1, 0),
    ("cadence adjust_every", lambda v: DecisionCadence(v), 1, 0),
    ("cadence min_steps", lambda v: DecisionCadence(5, min_steps=v), 1, 0),
    ("cadence warmup", lambda v: DecisionCadence(5, warmup=v), 0, -1),
    ("budget share", lambda v: MeasurementBudget(v), 0.5, 0.5 + 1e-9),
    ("budget share above 0", lambda v: MeasurementBudget(v), 1e-9, 0.0),
    ("gradient stats n", lambda v: unbiased_grad_stats(2.0, 1.0, n=v, small_batch=1), 2, 1),
    ("gradient stats small_batch", lambda v: unbiased_grad_stats(2.0, 1.0, n=4, small_batch=v), 1, 0),
    ("ema decay", lambda v: NoiseScaleEMA(v), 0.0, -1e-9),
    ("ema half-life share", lambda v: NoiseScaleEMA(0.9, half_life_share=v), 10.0, 10.0 + 1e-9),
    ("ema half-life share above 0", lambda v: NoiseScaleEMA(0.9, half_life_share=v), 1e-9, 0.0),
    ("ema min half-life", lambda v: NoiseScaleEMA(0.9, min_half_life=v), 0.0, -1e-9),
    (
        "ema samples",
        lambda v: NoiseScaleEMA(0.9, half_life_share=0.25).update(1.0, 2.0, samples=v),
        0.0,
        -1e-9,
    ),
]


@pytest.mark.parametrize(("what", "build", "edge", "outside"), CASES, ids=[c[0] for c in CASES])
def test_an_argument_takes_its_bound_and_refuses_just_past_it(what, build, edge, outside):
    build(edge)
    with pytest.raises(ValueError) as refused:
        build(outside)
    assert "\n" not in str(refused.value)
