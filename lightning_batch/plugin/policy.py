"""Batch-size policies: numbers in, numbers out.

Nothing here touches torch or Lightning. The caller measures things (current batch, gradient-noise statistics,
step times, a memory ceiling) and a :class:`BatchSizeController` turns them into a :class:`Decision`: the next
global batch size (samples per optimizer step) and the learning-rate multiplier relative to the user's lr0.

Pieces:

* :class:`ThroughputModel` -- step time ``t(B) = alpha + beta * B`` fitted to measured step times.
* Policies (:func:`make_policy`): ``fixed``, ``memory``, ``noise``, ``goodput`` (Pollux), ``schedule``
  (Smith et al. 2017).
* lr rules (:func:`make_lr_rule`): ``none``, ``linear``, ``sqrt``, ``adascale`` (Johnson et al. 2020).
* :class:`BatchGrid` -- bounds, memory ceiling and rounding to a multiple, shared by the policies and the
  controller so that what a policy optimises over is exactly what the controller may return.

>>> ctl = BatchSizeController("noise", lr_rule="sqrt", multiple=8)
>>> d = ctl.decide(PolicyContext(batch_size=64, base_batch=64, noise_scale=250.0, ceiling=1024))
>>> d.batch_size, round(d.lr_scale, 3), d.changed
(248, 1.969, True)
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import statistics
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

from lightning_batch.plugin.checks import checked, count, integer, number, optional, positive_int
from lightning_batch.plugin.options import BatchSizeOptions
from lightning_batch.plugin.options import BatchSizeOptions as _Declared  # the declared defaults

__all__ = [
    "LR_RULES",
    "POLICIES",
    "AdaScaleLrRule",
    "BatchGrid",
    "BatchPolicy",
    "BatchSizeController",
    "Decision",
    "FixedPolicy",
    "GoodputPolicy",
    "LinearLrRule",
    "LrRule",
    "MemoryPolicy",
    "NoLrRule",
    "NoisePolicy",
    "PolicyContext",
    "SchedulePolicy",
    "SqrtLrRule",
    "ThroughputModel",
    "adascale_gain",
    "efficiency",
    "goodput",
    "goodput_argmax",
    "make_lr_rule",
    "make_policy",
]


T = TypeVar("T")

# ----------------------------------------------------------------------------------------------------------
# throughput


#: With a prior slope, timed sizes must span this factor before their own slope replaces it.
PRIOR_SPAN = 8.0


class ThroughputModel:
    """Step time ``t(B) = alpha + beta * B`` (seconds) fitted to recent measurements.

    Each batch size keeps its last ``window`` step times and the fit uses the *median* of each window, so a
    few slow steps (GC, checkpointing, data-loader stalls) don't move it; each batch size is weighted by the
    number of samples in its window over its squared time (a fit of relative errors). Only the ``max_sizes`` most recently observed batch sizes are kept, so
    the model follows drift (a changing input pipeline, other jobs on the node).

    The least-squares fit is constrained to ``alpha >= 0`` and ``beta >= 0``: a negative fixed cost, or steps
    that get faster with more samples, can only be noise, and would make throughput negative or unbounded.

    A fit needs two distinct batch sizes (:attr:`is_fitted`), or one and a *prior slope*
    (:meth:`set_prior_slope`): the memory probe times its trial steps (a forward and backward at
    sizes from a few rows to the ceiling) anyway, and their slope is the per-row cost ``beta`` of
    the real steps; what the trial steps lack (the optimizer step, the training loop's own hooks) is
    per-step cost, which the first real steps at one size pin down as ``alpha``. So the first
    decision can jump without an exploration phase. Once the timed sizes span a factor of
    :data:`PRIOR_SPAN`, the fit is theirs alone.
    Without either, :attr:`coefficients` falls back to ``t(B)`` proportional to ``B`` through the
    origin (``alpha = 0``), i.e. constant throughput -- fine for reporting, but policies that
    optimise over ``B`` (``goodput``) must wait for :attr:`is_fitted`.

    >>> m = ThroughputModel()
    >>> for b in (32, 64, 128):
    ...     m.observe(b, 0.01 + 0.001 * b)
    >>> alpha, beta = m.coefficients
    >>> round(alpha, 6), round(beta, 6)
    (0.01, 0.001)
    >>> round(m.throughput(100), 3)  # samples / s
    909.091
    >>> seeded = ThroughputModel()
    >>> seeded.set_prior_slope(0.001)  # per-row seconds, from the probe's trial steps
    >>> seeded.observe(32, 0.042)  # the real steps at B=32: alpha = 0.042 - 0.001 * 32
    >>> seeded.is_fitted, tuple(round(c, 6) for c in seeded.coefficients)
    (True, (0.01, 0.001))
    """

    def __init__(self, window: int = 32, max_sizes: int = 8) -> None:
        self.window = checked("window", window, positive_int, 32)
        self.max_sizes = checked("max_sizes", max_sizes, integer(minimum=2), 8)
        self._times: OrderedDict[int, deque[float]] = OrderedDict()
        self.prior_slope: float | None = None

    def set_prior_slope(self, beta: float | None) -> None:
        """Seconds per row measured elsewhere (the memory probe's trial steps); None forgets it."""
        self.prior_slope = None if beta is None else checked("beta", beta, number(minimum=0.0), 1e-6)

    def observe(self, batch_size: int, seconds: float) -> None:
        """Record one optimizer step of ``batch_size`` samples that took ``seconds``."""
        batch_size = checked("batch_size", batch_size, positive_int, 1)
        seconds = checked("seconds", seconds, number(above=0.0), 0.01)
        times = self._times.pop(batch_size, None)
        if times is None:
            times = deque(maxlen=self.window)
        times.append(seconds)
        self._times[batch_size] = times  # re-inserted last = most recently used
        while len(self._times) > self.max_sizes:
            self._times.popitem(last=False)

    def times_at(self, batch_size: int) -> list[float]:
        """The step times kept for ``batch_size``, sorted (empty if it was not observed)."""
        return sorted(self._times.get(batch_size, ()))

    @property
    def batch_sizes(self) -> list[int]:
        """Batch sizes currently in the model, least recently observed first."""
        return list(self._times)

    @property
    def is_fitted(self) -> bool:
        """True once step times for two distinct batch sizes, or one and a prior slope, were observed."""
        return len(self._times) >= 2 or (len(self._times) == 1 and self.prior_slope is not None)

    @property
    def coefficients(self) -> tuple[float, float] | None:
        """``(alpha, beta)`` of ``t(B) = alpha + beta * B``, or None without any measurement."""
        # Weighted by count / t²: least squares on *relative* errors, so the slow large-batch points
        # (whose absolute noise is largest) don't swamp the small-batch ones that pin down alpha.
        points = [(b, t, len(ts) / (t * t)) for b, ts in self._times.items() for t in [statistics.median(ts)]]
        if not points:
            return None
        sizes = [b for b, _, _ in points]
        if self.prior_slope is not None and max(sizes) < PRIOR_SPAN * min(sizes):
            # Timed sizes close together pin down alpha but hardly beta (a slope from two noisy
            # medians a factor 2 apart can come out 0 or double): keep the probe's slope, which
            # spans a few rows to the ceiling, and fit alpha alone, alpha >= 0 (a step cannot cost
            # less than its rows).
            beta = min(self.prior_slope, min(t / b for b, t, _ in points))
            sw = sum(w for _, _, w in points)
            return max(0.0, sum(w * (t - beta * b) for b, t, w in points) / sw), beta
        if len(points) == 1:
            b, t, _ = points[0]
            return 0.0, t / b
        sw = sum(w for _, _, w in points)
        xm = sum(w * b for b, _, w in points) / sw
        ym = sum(w * t for _, t, w in points) / sw
        # Centred sums: B can be ~1e5 and t ~1e-2, the raw normal equations lose digits.
        sxx = sum(w * (b - xm) ** 2 for b, _, w in points)
        sxy = sum(w * (b - xm) * (t - ym) for b, t, w in points)
        beta = sxy / sxx
        alpha = ym - beta * xm
        if alpha >= 0.0 and beta >= 0.0:
            return alpha, beta
        # The unconstrained optimum is infeasible, so the constrained one lies on a boundary of the
        # quadrant (the objective is convex): best of "through the origin" and "constant time".
        through_origin = (0.0, sum(w * b * t for b, t, w in points) / sum(w * b * b for b, _, w in points))
        constant = (ym, 0.0)

        def sse(ab: tuple[float, float]) -> float:
            return sum(w * (t - ab[0] - ab[1] * b) ** 2 for b, t, w in points)

        return min((through_origin, constant), key=sse)

    def step_time(self, batch_size: float) -> float | None:
        """Predicted seconds per step at ``batch_size``, or None without any measurement."""
        ab = self.coefficients
        return None if ab is None else ab[0] + ab[1] * batch_size

    def throughput(self, batch_size: float) -> float | None:
        """Predicted samples per second ``B / t(B)``, or None when it cannot be predicted."""
        t = self.step_time(batch_size)
        return None if t is None or t <= 0.0 else batch_size / t

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: ``{"samples": [[batch, [seconds, ...]], ...], "prior_slope": beta}`` (oldest
        batch size first)."""
        return {"samples": [[b, list(ts)] for b, ts in self._times.items()], "prior_slope": self.prior_slope}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (windows are re-bounded by this model's ``window``)."""
        if not isinstance(state, dict) or "samples" not in state:
            raise ValueError(
                f"state must be a dict from ThroughputModel.state_dict(), got {state!r}. "
                "Pass the dict returned by state_dict()."
            )
        self._times.clear()
        self.prior_slope = state.get("prior_slope")
        for b, ts in state["samples"]:
            for t in ts:
                self.observe(b, t)


# ----------------------------------------------------------------------------------------------------------
# the admissible batch sizes


class PerOptimizerStep:
    """A :class:`ThroughputModel` of passes read in optimizer steps of ``k`` accumulated passes.

    With ``accumulate_grad_batches = k`` the clock times each pass (a micro-batch of ``B / k``
    rows) while a policy reasons about an optimizer step of ``B`` rows, k passes:
    ``t_step(B) = k * t_pass(B / k) = k * alpha + beta * B``.

    >>> passes = ThroughputModel()
    >>> passes.observe(16, 0.10); passes.observe(32, 0.18)
    >>> steps = PerOptimizerStep(passes, 4)
    >>> steps.batch_sizes, [round(c, 3) for c in steps.coefficients], round(steps.step_time(128), 3)
    ([64, 128], [0.08, 0.005], 0.72)
    """

    def __init__(self, passes: ThroughputModel, k: int) -> None:
        self.passes, self.k = passes, k

    @property
    def is_fitted(self) -> bool:
        return self.passes.is_fitted

    @property
    def batch_sizes(self) -> list[int]:
        return [b * self.k for b in self.passes.batch_sizes]

    @property
    def coefficients(self) -> tuple[float, float] | None:
        ab = self.passes.coefficients
        return None if ab is None else (ab[0] * self.k, ab[1])

    def times_at(self, batch_size: int) -> list[float]:
        if batch_size % self.k:
            return []
        return [t * self.k for t in self.passes.times_at(batch_size // self.k)]

    def step_time(self, batch_size: float) -> float | None:
        t = self.passes.step_time(batch_size / self.k)
        return None if t is None else t * self.k

    def throughput(self, batch_size: float) -> float | None:
        t = self.step_time(batch_size)
        return None if t is None or t <= 0.0 else batch_size / t


def _floor(x: float) -> int:
    # Guard against 15.999999999 from float arithmetic on integer-valued quantities.
    return math.floor(x + 1e-9)


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


@dataclass(frozen=True)
class BatchGrid:
    """The batch sizes a decision may return.

    Integers in ``[lo, hi]`` (``hi=None``: unbounded) that are multiples of ``multiple``, plus the sizes below
    ``multiple`` -- so a batch of 1..7 stays possible when the bounds allow it, rather than being rounded to
    0 or up to 8. If ``[lo, hi]`` holds no multiple at all, every integer in it is admissible (the bounds
    beat the rounding).

    >>> g = BatchGrid(lo=1, hi=100, multiple=8)
    >>> g.round(3), g.round(12), g.round(13), g.round(99), g.round(500)
    (3, 8, 16, 96, 96)
    >>> g.below(50.0), g.above(50.0)
    (48, 56)
    """

    lo: int
    hi: int | None
    multiple: int = 1

    def __post_init__(self) -> None:
        checked("lo", self.lo, positive_int, 1)
        checked("hi", self.hi, optional(integer(minimum=self.lo)), self.lo)
        checked("multiple", self.multiple, positive_int, 8)

    @classmethod
    def from_bounds(
        cls, min_batch: int, max_batch: int | None, ceiling: int | None, multiple: int = 1
    ) -> BatchGrid:
        """Combine user bounds with a memory ceiling.

        The ceiling wins over ``min_batch``: a batch that doesn't fit cannot be trained on, so if the ceiling
        is below ``min_batch`` the grid becomes ``[ceiling, ceiling]``.
        """
        bounds = [b for b in (max_batch, ceiling) if b is not None]
        hi = min(bounds) if bounds else None
        lo = min_batch if hi is None else min(min_batch, hi)
        return cls(lo=lo, hi=hi, multiple=multiple)

    @property
    def _all_ints(self) -> bool:
        m = self.multiple
        if m <= 1:
            return True
        first = -(-self.lo // m) * m
        return self.hi is not None and first > self.hi

    def in_bounds(self, batch_size: int) -> bool:
        """``lo <= batch_size <= hi`` (ignoring rounding)."""
        return batch_size >= self.lo and (self.hi is None or batch_size <= self.hi)

    def contains(self, batch_size: int) -> bool:
        """Whether ``batch_size`` is admissible (in bounds and correctly rounded)."""
        if not self.in_bounds(batch_size):
            return False
        return self._all_ints or batch_size < self.multiple or batch_size % self.multiple == 0

    def clamp(self, batch_size: float) -> int:
        """Nearest integer in ``[lo, hi]`` (no rounding to the multiple)."""
        b = max(self.lo, math.floor(batch_size + 0.5))
        return b if self.hi is None else min(b, self.hi)

    def round(self, batch_size: float) -> int:
        """Nearest admissible batch size; ties go down (less memory)."""
        b = self.clamp(batch_size)
        m = self.multiple
        if self._all_ints or b < m:
            return b
        down = b // m * m
        candidates = [c for c in (down, down + m) if self.in_bounds(c)]
        # Non-empty: if neither neighbour multiple were in bounds, no multiple would be (see _all_ints).
        return min(candidates, key=lambda c: (abs(c - b), c))

    def below(self, x: float) -> int | None:
        """Largest admissible batch size ``<= x``, or None."""
        if x < self.lo:
            return None
        b = _floor(x)
        if self.hi is not None:
            b = min(b, self.hi)
        m = self.multiple
        if self._all_ints or b < m:
            return b
        down = b // m * m
        # down >= m, so when down < lo the sizes below m are below lo too: nothing admissible <= x.
        return down if down >= self.lo else None

    def above(self, x: float) -> int | None:
        """Smallest admissible batch size ``>= x``, or None."""
        if self.hi is not None and x > self.hi:
            return None
        b = max(_ceil(x), self.lo)
        m = self.multiple
        if self._all_ints or b < m:
            return b
        up = -(-b // m) * m
        return up if self.hi is None or up <= self.hi else None


# ----------------------------------------------------------------------------------------------------------
# context, efficiency, goodput


@dataclass(frozen=True)
class PolicyContext:
    """Everything a policy may look at for one decision.

    ``batch_size`` and ``base_batch`` are global (samples per optimizer step); ``base_batch`` is the user's
    initial batch B0, where lr0 was tuned. ``noise_scale`` is the gradient-noise scale
    ``B_noise = tr(Sigma) / |G|^2``; when it is None it is derived from ``trace_sigma`` and ``grad_sqr`` if
    both are given (:attr:`b_noise`). ``trace_sigma`` is the trace of the *per-sample* gradient covariance.
    ``ceiling`` is the largest batch that fits in memory (None: unknown). ``step_times`` are ``(batch_size,
    seconds)`` measurements since the last decision (the controller feeds them into its
    :class:`ThroughputModel`). ``min_batch``, ``max_batch``, ``multiple`` and ``throughput`` are set by the
    controller from its own settings; fill them yourself only when calling a policy directly.

    >>> PolicyContext(batch_size=32, base_batch=32, grad_sqr=2.0, trace_sigma=100.0).b_noise
    50.0
    """

    batch_size: int
    base_batch: int
    noise_scale: float | None = None
    grad_sqr: float | None = None
    trace_sigma: float | None = None
    ceiling: int | None = None
    epoch: int = 0
    step_times: Sequence[tuple[int, float]] = ()
    min_batch: int = 1
    max_batch: int | None = None
    multiple: int = 1
    throughput: ThroughputModel | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise numpy scalars etc. to plain Python
        set_(self, "batch_size", checked("batch_size", self.batch_size, positive_int, 1))
        set_(
            self,
            "base_batch",
            checked("base_batch", self.base_batch, positive_int, 1),
        )
        set_(
            self,
            "noise_scale",
            checked("noise_scale", self.noise_scale, optional(number(minimum=0.0)), 1.0),
        )
        set_(self, "grad_sqr", checked("grad_sqr", self.grad_sqr, optional(number(minimum=0.0)), 1.0))
        set_(
            self,
            "trace_sigma",
            checked("trace_sigma", self.trace_sigma, optional(number(minimum=0.0)), 1.0),
        )
        set_(
            self,
            "ceiling",
            checked("ceiling", self.ceiling, optional(positive_int), 1),
        )
        set_(self, "epoch", checked("epoch", self.epoch, count, 0))
        set_(self, "min_batch", checked("min_batch", self.min_batch, positive_int, 1))
        set_(
            self,
            "max_batch",
            checked("max_batch", self.max_batch, optional(integer(minimum=self.min_batch)), self.min_batch),
        )
        set_(
            self,
            "multiple",
            checked("multiple", self.multiple, positive_int, 8),
        )
        set_(self, "step_times", tuple((int(b), float(t)) for b, t in self.step_times))

    @property
    def b_noise(self) -> float | None:
        """The gradient-noise scale, given or derived from ``trace_sigma / grad_sqr``; None if unknown."""
        if self.noise_scale is not None:
            return self.noise_scale
        if self.trace_sigma is not None and self.grad_sqr is not None and self.grad_sqr > 0.0:
            return self.trace_sigma / self.grad_sqr
        return None

    @property
    def grid(self) -> BatchGrid:
        """The admissible batch sizes under this context's bounds, ceiling and rounding."""
        return BatchGrid.from_bounds(self.min_batch, self.max_batch, self.ceiling, self.multiple)


def efficiency(batch_size: float, base_batch: float, noise_scale: float) -> float:
    """Statistical efficiency ``(B_noise + B0) / (B_noise + B)`` (Pollux): progress per sample at ``B``
    relative to ``B0``. 1 at ``B = B0``; below 1 for larger batches.

    >>> efficiency(320, 64, 192.0)
    0.5
    """
    if batch_size <= 0 or base_batch <= 0 or noise_scale < 0:
        raise ValueError(
            f"efficiency needs batch_size > 0, base_batch > 0, noise_scale >= 0; got {batch_size!r}, "
            f"{base_batch!r}, {noise_scale!r}. Pass positive batch sizes and a non-negative B_noise."
        )
    return (noise_scale + base_batch) / (noise_scale + batch_size)


def goodput(batch_size: float, base_batch: float, noise_scale: float, alpha: float, beta: float) -> float:
    """``throughput(B) * efficiency(B)`` with ``t(B) = alpha + beta * B``: useful samples per second,
    measured in base-batch samples.

    >>> round(goodput(128, 64, 64.0, 0.01, 0.001), 3)
    618.357
    """
    return batch_size / (alpha + beta * batch_size) * efficiency(batch_size, base_batch, noise_scale)


def goodput_argmax(
    alpha: float, beta: float, noise_scale: float, base_batch: float, grid: BatchGrid
) -> int | None:
    """The admissible batch size maximising :func:`goodput`, or None when the model has no maximum in
    ``grid``.

    Maximising ``B / ((alpha + beta B)(B_noise + B))`` has a closed form: the derivative of its log is
    ``(alpha B_noise - beta B^2) / (B (alpha + beta B)(B_noise + B))``, which changes sign once, at
    ``B* = sqrt(alpha B_noise / beta)``. Goodput is therefore unimodal, and its maximum over any ordered set
    of candidates is at one of the two candidates bracketing ``B*``; :class:`BatchGrid` gives those directly
    (multiples of the rounding step, or the sizes below it). This is the exact argmax of the model over the
    admissible sizes, in O(1) instead of a grid search.

    >>> goodput_argmax(0.01, 0.001, 400.0, 64, BatchGrid(1, 4096, multiple=1))  # sqrt(0.01*400/0.001) = 63.2
    63
    """
    if alpha <= 0.0 and beta <= 0.0:
        return None
    if beta <= 0.0:
        # Constant step time: throughput grows linearly and beats the efficiency loss; take the largest.
        if grid.hi is None:
            return None
        candidates = [grid.below(grid.hi)]
    else:
        # alpha == 0 or B_noise == 0 makes goodput decreasing: B* = 0 -> the smallest admissible size.
        x = math.sqrt(alpha * noise_scale / beta)
        candidates = [grid.below(x), grid.above(x)]
    found = [c for c in candidates if c is not None]
    if not found:
        return None
    # Exact ties (possible only on symmetric round-off) go to the smaller, cheaper batch.
    return max(found, key=lambda b: (goodput(b, base_batch, noise_scale, alpha, beta), -b))


# ----------------------------------------------------------------------------------------------------------
# policies


class BatchPolicy(ABC):
    """A rule for the next batch size. Subclasses implement :meth:`propose_with_reason`.

    Policies return a raw proposal; the :class:`BatchSizeController` applies bounds, ceiling, rounding and
    hysteresis. Policies here keep no state beyond their configuration (they are functions of the context), so
    their :meth:`state_dict` is empty, which makes resuming from a checkpoint trivially consistent.
    """

    name: str = ""

    @abstractmethod
    def propose_with_reason(self, ctx: PolicyContext) -> tuple[int, str]:
        """The proposed batch size and a short human-readable reason."""

    def propose(self, ctx: PolicyContext) -> int:
        """The proposed batch size."""
        return self.propose_with_reason(ctx)[0]

    def predicted_gain(self, ctx: PolicyContext, batch_size: int) -> float | None:
        """Predicted relative improvement of moving from ``ctx.batch_size`` to ``batch_size`` (0.1 = +10%),
        or None when the policy has no objective to measure it with (the controller then uses the relative
        size change)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (empty: policies are stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 -- optional hook, a no-op here
        """Restore from :meth:`state_dict` (nothing to restore)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FixedPolicy(BatchPolicy):
    """Always the base batch B0 (bounds and ceiling still apply).

    >>> FixedPolicy().propose(PolicyContext(batch_size=96, base_batch=64))
    64
    """

    name = "fixed"

    def propose_with_reason(self, ctx: PolicyContext) -> tuple[int, str]:
        return ctx.base_batch, f"fixed: base batch {ctx.base_batch}"


class MemoryPolicy(BatchPolicy):
    """The largest batch that fits: the memory ceiling, capped by ``max_batch``. Keeps the current batch
    while the ceiling is unknown.

    >>> MemoryPolicy().propose(PolicyContext(batch_size=64, base_batch=64, ceiling=1000, max_batch=512))
    512
    """

    name = "memory"

    def propose_with_reason(self, ctx: PolicyContext) -> tuple[int, str]:
        if ctx.ceiling is None:
            return ctx.batch_size, "memory: ceiling unknown, keeping current batch"
        hi = ctx.grid.hi
        assert hi is not None  # a ceiling is set
        return (
            hi,
            f"memory: largest batch that fits = {hi} (ceiling {ctx.ceiling}, max_batch {ctx.max_batch})",
        )


class NoisePolicy(BatchPolicy):
    """``B = clamp(k * B_noise, min_batch, min(ceiling, max_batch))`` (McCandlish et al. 2018: the critical
    batch is about ``B_noise``). Keeps the current batch while ``B_noise`` is unknown.

    >>> ctx = PolicyContext(batch_size=64, base_batch=64, noise_scale=300.0, ceiling=128)
    >>> NoisePolicy(k=0.5).propose(ctx)
    128
    """

    name = "noise"

    def __init__(self, k: float = _Declared.noise_k) -> None:
        self.k = checked("k", k, number(above=0.0), 1.0)

    def propose_with_reason(self, ctx: PolicyContext) -> tuple[int, str]:
        bn = ctx.b_noise
        if bn is None:
            return ctx.batch_size, "noise: no gradient-noise estimate yet, keeping current batch"
        b = ctx.grid.clamp(self.k * bn)
        return b, f"noise: {self.k:g} * B_noise ({bn:.4g}) -> {b}"

    def __repr__(self) -> str:
        return f"NoisePolicy(k={self.k!r})"


class GoodputPolicy(BatchPolicy):
    """Pollux (Qiao et al., OSDI'21): maximise ``goodput(B) = throughput(B) * efficiency(B)``, with
    ``efficiency(B) = (B_noise + B0) / (B_noise + B)``, over the admissible sizes in
    ``[min_batch, min(ceiling, max_batch)]`` (see :func:`goodput_argmax` for why the argmax is exact).

    Keeps the current batch until ``B_noise`` is known and the :class:`ThroughputModel` is fitted (step times
    at two batch sizes, or one and the memory probe's slope). Since a policy that never moves never measures
    a second size, ``explore_factor`` (off by default) proposes ``current * explore_factor`` (or divided, at
    the upper bound) while the model is not fitted.

    ``min_efficiency`` (default 0.25) bounds the batch to sizes whose statistical efficiency is at
    least that: ``B <= (B_noise + B0) / min_efficiency - B_noise``, ``3 B_noise + 4 B0`` at 0.25.
    Pollux trains until a target, so trading samples for speed always pays there; a run of a fixed
    number of epochs has a fixed number of samples, and at efficiency 0.1 its epochs make a tenth
    of the progress (measured: the digits CNN's 10 epochs at B=512 from B0=32, efficiency 0.11,
    ended at 91.5% test accuracy against 96% at B=56-104). It also bounds the damage a throughput
    model misled by a noisy clock can do. Not higher by default: under AdaScale's lr the noise floor
    ``lr / B`` falls only in proportion to the efficiency, so a bound of 0.5 kept the regression
    benchmark 2x above B0's floor and its target (0.2% of the optimum) out of reach. 0 turns it
    off (pure Pollux).

    >>> m = ThroughputModel()
    >>> m.observe(32, 0.01 + 0.001 * 32)
    >>> m.observe(64, 0.01 + 0.001 * 64)
    >>> ctx = PolicyContext(batch_size=32, base_batch=32, noise_scale=900.0, ceiling=4096, throughput=m)
    >>> GoodputPolicy().propose(ctx)  # sqrt(0.01 * 900 / 0.001) = 94.9
    95
    """

    name = "goodput"

    def __init__(
        self, explore_factor: float | None = None, min_efficiency: float = _Declared.min_efficiency
    ) -> None:
        if explore_factor is not None:
            explore_factor = checked("explore_factor", explore_factor, number(above=1.0), 4.0)
        self.explore_factor = explore_factor
        self.min_efficiency = checked("min_efficiency", min_efficiency, number(minimum=0.0), 0.25)
        if self.min_efficiency >= 1.0:
            raise ValueError(
                f"min_efficiency must be below 1, got {min_efficiency!r}. Pass e.g. 0.5 (0: no bound)."
            )

    def efficiency_bound(self, ctx: PolicyContext, noise_scale: float) -> float | None:
        """The largest batch whose efficiency is at least ``min_efficiency`` (None: unbounded).

        >>> GoodputPolicy(min_efficiency=0.5).efficiency_bound(PolicyContext(32, 32), 30.0)
        94.0
        """
        if self.min_efficiency <= 0.0:
            return None
        return (noise_scale + ctx.base_batch) / self.min_efficiency - noise_scale

    def propose_with_reason(self, ctx: PolicyContext) -> tuple[int, str]:
        bn = ctx.b_noise
        model = ctx.throughput
        if bn is None:
            return ctx.batch_size, "goodput: no gradient-noise estimate yet, keeping current batch"
        if model is None or not model.is_fitted:
            if self.explore_factor is not None and model is not None and model.batch_sizes:
                grid = ctx.grid
                bound = self.efficiency_bound(ctx, bn)
                up = grid.clamp(min(ctx.batch_size * self.explore_factor, bound or math.inf))
                b = up if up != ctx.batch_size else grid.clamp(ctx.batch_size / self.explore_factor)
                return b, f"goodput: exploring B={b} to fit the throughput model"
            return (
                ctx.batch_size,
                "goodput: throughput needs step times at 2 batch sizes, keeping current batch",
            )
        alpha, beta = model.coefficients  # type: ignore[misc]  # fitted -> not None
        grid = ctx.grid
        bound = self.efficiency_bound(ctx, bn)
        if bound is not None and bound >= grid.lo and (grid.hi is None or bound < grid.hi):
            # Goodput is unimodal, so its argmax over the sizes up to the bound is the argmax
            # clipped to it: search the grid with the bound as its top.
            top = grid.below(bound)
            grid = replace(grid, hi=top) if top is not None else grid
        best = goodput_argmax(alpha, beta, bn, ctx.base_batch, grid)
        if best is None:
            return ctx.batch_size, "goodput: model has no maximum within the bounds, keeping current batch"
        capped = f", efficiency >= {self.min_efficiency:g} up to B={bound:.0f}" if bound is not None else ""
        return best, f"goodput: argmax B={best} (B_noise={bn:.4g}, t(B)={alpha:.3g}+{beta:.3g}*B{capped})"

    def predicted_gain(self, ctx: PolicyContext, batch_size: int) -> float | None:
        """``goodput(batch_size) / goodput(current) - 1`` under the fitted model, or None."""
        bn = ctx.b_noise
        model = ctx.throughput
        if bn is None or model is None or not model.is_fitted:
            return None
        alpha, beta = model.coefficients  # type: ignore[misc]
        return (
            goodput(batch_size, ctx.base_batch, bn, alpha, beta)
            / goodput(ctx.batch_size, ctx.base_batch, bn, alpha, beta)
            - 1.0
        )

    def __repr__(self) -> str:
        return (
            f"GoodputPolicy(explore_factor={self.explore_factor!r}, min_efficiency={self.min_efficiency!r})"
        )


class SchedulePolicy(BatchPolicy):
    """Smith et al. 2017, "Don't decay the learning rate, increase the batch size": from each milestone epoch
    on, multiply the batch by ``factor`` where one would have decayed the lr.

    ``B(epoch) = B0 * prod(factor_i for milestone_i <= epoch)``. It is a function of the epoch and B0 only
    (not of the current batch), so it is idempotent within an epoch and needs no state to resume.
    ``factor`` is one number for all milestones or one per milestone.

    Examples:
        >>> p = SchedulePolicy(milestones=[30, 60], factor=2.0)
        >>> [p.propose(PolicyContext(batch_size=64, base_batch=64, epoch=e)) for e in (0, 29, 30, 59, 60, 90)]
        [64, 64, 128, 128, 256, 256]
    """

    name = "schedule"

    def __init__(
        self, milestones: Sequence[int] = (), factor: float | Sequence[float] = _Declared.schedule_factor
    ) -> None:
        ms = [checked("milestones[i]", m, count, 30) for m in milestones]
        if any(b <= a for a, b in itertools.pairwise(ms)):
            raise ValueError(
                f"milestones must be strictly increasing, got {ms!r}. Pass e.g. milestones=[30, 60]."
            )
        if isinstance(factor, numbers.Real):
            factor = checked("factor", factor, number(above=0.0), 2.0)
            factors = [factor] * len(ms)
        else:
            factors = [float(f) for f in factor]  # type: ignore[union-attr]  # a Sequence here: not Real
            if len(factors) != len(ms):
                raise ValueError(
                    f"factor has {len(factors)} entries for {len(ms)} milestones. "
                    "Pass one factor per milestone, or a single number for all."
                )
        self.factors = [checked("factor", f, number(above=0.0), 2.0) for f in factors]
        self.milestones = ms

    def propose_with_reason(self, ctx: PolicyContext) -> tuple[int, str]:
        scale = 1.0
        passed = 0
        for m, f in zip(self.milestones, self.factors, strict=True):
            if ctx.epoch >= m:
                scale *= f
                passed += 1
        b = max(1, round(ctx.base_batch * scale))
        return b, f"schedule: epoch {ctx.epoch}, {passed} milestone(s) passed, B0 * {scale:g} = {b}"

    def __repr__(self) -> str:
        return f"SchedulePolicy(milestones={self.milestones!r}, factor={self.factors!r})"


POLICIES: dict[str, type[BatchPolicy]] = {
    cls.name: cls for cls in (FixedPolicy, MemoryPolicy, NoisePolicy, GoodputPolicy, SchedulePolicy)
}


def _make(registry: dict[str, type[T]], kind: str, name: str, kwargs: dict[str, Any]) -> T:
    if not isinstance(name, str) or name.lower() not in registry:
        raise ValueError(f"Unknown {kind} {name!r}. Pass one of: {', '.join(sorted(registry))}.")
    cls = registry[name.lower()]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(cls).parameters]
        raise ValueError(
            f"Invalid arguments for {kind} {name!r}: {e}. Accepted: {', '.join(params) or '(none)'}."
        ) from None
    return cls(**kwargs)


def policy_from_options(options: BatchSizeOptions) -> BatchPolicy:
    """The policy ``options`` name (``auto`` is goodput), with the options it takes; or theirs as it is.

    >>> policy_from_options(BatchSizeOptions(policy="schedule", milestones=[3], schedule_factor=4.0))
    SchedulePolicy(milestones=[3], factor=[4.0])
    """
    if isinstance(options.policy, BatchPolicy):
        return options.policy
    name = options.policy_name
    kwargs: dict[str, Any] = {}
    if name == "noise":
        kwargs = {"k": options.noise_k}
    elif name == "goodput":
        kwargs = {"explore_factor": options.explore_factor, "min_efficiency": options.min_efficiency}
    elif name == "schedule":
        kwargs = {"milestones": tuple(options.milestones), "factor": options.schedule_factor}
    return make_policy(name, **kwargs)


def make_policy(name: str, **kwargs: Any) -> BatchPolicy:
    """Build a policy by name: ``fixed``, ``memory``, ``noise`` (k), ``goodput`` (explore_factor),
    ``schedule`` (milestones, factor).

    >>> make_policy("schedule", milestones=[10])
    SchedulePolicy(milestones=[10], factor=[2.0])
    """
    return _make(POLICIES, "batch policy", name, kwargs)


# ----------------------------------------------------------------------------------------------------------
# learning-rate rules


def adascale_gain(
    batch_size: float, base_batch: float, grad_sqr: float | None, trace_sigma: float | None
) -> float | None:
    """AdaScale gain ratio (Johnson et al. 2020) for scale ``S = B / B0``:
    ``r = (sigma^2 + |G|^2) / (sigma^2 / S + |G|^2)`` with ``sigma^2 = tr(Sigma) / B0`` the gradient
    variance at the base batch. ``r`` lies in ``[1, S]`` for ``S >= 1`` (``[S, 1]`` below): 1 without noise,
    ``S`` for pure noise. Equivalently ``r = S * efficiency(B)``. None when the statistics are missing or
    both zero.

    >>> adascale_gain(256, 64, grad_sqr=1.0, trace_sigma=64.0)  # sigma^2 = 1, S = 4: 2 / 1.25
    1.6
    """
    if grad_sqr is None or trace_sigma is None:
        return None
    sigma2 = trace_sigma / base_batch
    s = batch_size / base_batch
    denom = sigma2 / s + grad_sqr
    if denom <= 0.0:
        return None
    return (sigma2 + grad_sqr) / denom


class LrRule(ABC):
    """Learning-rate multiplier relative to lr0 when the batch goes from B0 to B. Stateless."""

    name: str = ""

    @abstractmethod
    def scale(
        self,
        batch_size: int,
        base_batch: int,
        grad_sqr: float | None = None,
        trace_sigma: float | None = None,
    ) -> float:
        """lr / lr0 at ``batch_size``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoLrRule(LrRule):
    """Keep lr0.

    >>> NoLrRule().scale(256, 64)
    1.0
    """

    name = "none"

    def scale(
        self,
        batch_size: int,
        base_batch: int,
        grad_sqr: float | None = None,
        trace_sigma: float | None = None,
    ) -> float:
        return 1.0


class LinearLrRule(LrRule):
    """Goyal et al. 2017: ``lr = lr0 * B / B0``.

    >>> LinearLrRule().scale(256, 64)
    4.0
    """

    name = "linear"

    def scale(
        self,
        batch_size: int,
        base_batch: int,
        grad_sqr: float | None = None,
        trace_sigma: float | None = None,
    ) -> float:
        return batch_size / base_batch


class SqrtLrRule(LrRule):
    """Square-root scaling (Krizhevsky 2014; common for Adam): ``lr = lr0 * sqrt(B / B0)``.

    >>> SqrtLrRule().scale(256, 64)
    2.0
    """

    name = "sqrt"

    def scale(
        self,
        batch_size: int,
        base_batch: int,
        grad_sqr: float | None = None,
        trace_sigma: float | None = None,
    ) -> float:
        return math.sqrt(batch_size / base_batch)


class AdaScaleLrRule(LrRule):
    """AdaScale: the multiplier is the gain ratio :func:`adascale_gain`; 1 while statistics are missing
    (so a run starts like ``none`` until the noise estimator has warmed up).

    >>> AdaScaleLrRule().scale(256, 64, grad_sqr=1.0, trace_sigma=64.0)
    1.6
    >>> AdaScaleLrRule().scale(256, 64)
    1.0
    """

    name = "adascale"

    def scale(
        self,
        batch_size: int,
        base_batch: int,
        grad_sqr: float | None = None,
        trace_sigma: float | None = None,
    ) -> float:
        r = adascale_gain(batch_size, base_batch, grad_sqr, trace_sigma)
        return 1.0 if r is None else r


LR_RULES: dict[str, type[LrRule]] = {
    cls.name: cls for cls in (NoLrRule, LinearLrRule, SqrtLrRule, AdaScaleLrRule)
}


def make_lr_rule(name: str) -> LrRule:
    """Build an lr rule by name: ``none``, ``linear``, ``sqrt``, ``adascale``.

    >>> make_lr_rule("sqrt").scale(100, 25)
    2.0
    """
    return _make(LR_RULES, "lr rule", name, {})


# ----------------------------------------------------------------------------------------------------------
# controller


@dataclass(frozen=True)
class Decision:
    """What the controller decided: the batch to use now, lr multiplier relative to lr0, why, and the
    predicted gain of the proposed change (None when it was not needed or cannot be predicted)."""

    batch_size: int
    lr_scale: float
    reason: str
    predicted_gain: float | None
    changed: bool
    proposed: int

    def record(self, old: int | None, new: int | None, lr_scale: float, ctx: PolicyContext) -> dict[str, Any]:
        """The decision as its history keeps it: the sizes, the lr scale, the statistics it was taken
        from, and its reason."""
        return {
            "from": old,
            "to": new,
            "lr_scale": lr_scale,
            "grad_sqr": ctx.grad_sqr,
            "grad_var": ctx.trace_sigma,
            "reason": self.reason,
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for logging."""
        return {
            "batch_size": self.batch_size,
            "lr_scale": self.lr_scale,
            "reason": self.reason,
            "predicted_gain": self.predicted_gain,
            "changed": self.changed,
            "proposed": self.proposed,
        }


class BatchSizeController:
    """Wraps a policy with bounds, the memory ceiling, rounding, hysteresis and an lr rule.

    Per :meth:`decide`:

    1. ``ctx.step_times`` go into the controller's :class:`ThroughputModel`.
    2. The policy proposes a batch; it is rounded into the :class:`BatchGrid` of ``[min_batch,
       min(ceiling, max_batch)]`` and multiples of ``multiple`` (sizes below ``multiple`` stay allowed).
    3. Hysteresis -- changing the batch has a cost (re-tracing, new data-loader iterators, lr jumps), so a
       change is only applied if its predicted gain exceeds ``hysteresis`` (default 5%). The gain is the
       policy's own :meth:`~BatchPolicy.predicted_gain` where it has an objective (``goodput``:
       ``goodput(new) / goodput(current) - 1``), otherwise the relative size change ``|new / current - 1|``
       (``noise``, ``memory``, ``schedule``, ``fixed``). Exception: when the current batch is outside the
       bounds -- typically because the ceiling shrank below it -- the change is forced, whatever the gain.
    4. The lr multiplier is the lr rule at the resulting batch, at most ``max_lr_scale`` (default 10).

    Between 2 and 3, a trust region: a proposal more than ``max_step_factor`` (default 4) away from the
    current batch is pulled back to it, because the throughput model only knows the sizes measured so
    far; the next decision, with a measurement at the new size, can go on.

    >>> ctl = BatchSizeController("fixed", multiple=8)
    >>> d = ctl.decide(PolicyContext(batch_size=256, base_batch=256, ceiling=200))
    >>> d.batch_size, d.changed, d.reason.split(":")[0]
    (200, True, 'forced')
    """

    def __init__(
        self,
        policy: BatchPolicy | str = "fixed",
        *,
        lr_rule: LrRule | str = "none",
        min_batch: int = _Declared.min_batch,
        max_batch: int | None = None,
        multiple: int = _Declared.multiple,
        hysteresis: float = _Declared.hysteresis,
        throughput: ThroughputModel | None = None,
        max_step_factor: float | None = 4.0,
        max_lr_scale: float | None = _Declared.max_lr_scale,
    ) -> None:
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        if not isinstance(self.policy, BatchPolicy):
            raise ValueError(f"policy must be a BatchPolicy or a name, got {policy!r}. Pass e.g. 'goodput'.")
        self.lr_rule = make_lr_rule(lr_rule) if isinstance(lr_rule, str) else lr_rule
        if not isinstance(self.lr_rule, LrRule):
            raise ValueError(f"lr_rule must be an LrRule or a name, got {lr_rule!r}. Pass e.g. 'sqrt'.")
        self.min_batch = checked("min_batch", min_batch, positive_int, 1)
        self.max_batch = checked(
            "max_batch", max_batch, optional(integer(minimum=self.min_batch)), self.min_batch
        )
        self.multiple = checked("multiple", multiple, positive_int, 8)
        self.hysteresis = checked("hysteresis", hysteresis, number(minimum=0.0), 0.05)
        self.throughput = throughput if throughput is not None else ThroughputModel()
        if max_step_factor is not None:
            max_step_factor = checked("max_step_factor", max_step_factor, number(above=1.0), 4.0)
        self.max_step_factor = max_step_factor
        if max_lr_scale is not None:
            max_lr_scale = checked("max_lr_scale", max_lr_scale, number(minimum=1.0), 10.0)
        self.max_lr_scale = max_lr_scale
        #: Passes per optimizer step (the Trainer's ``accumulate_grad_batches``): batches are rows per
        #: optimizer step, the throughput model times passes (:class:`PerOptimizerStep` converts).
        self.accumulation = 1
        self.num_changes = 0

    @classmethod
    def from_options(cls, options: BatchSizeOptions, lr_rule: str | None = None) -> BatchSizeController:
        """The controller ``DynamicBatchSize`` runs for its ``options`` (``lr_rule`` overrides theirs).

        >>> ctl = BatchSizeController.from_options(BatchSizeOptions(policy="noise", noise_k=2.0, lr_rule="sqrt"))
        >>> ctl.policy, ctl.lr_rule
        (NoisePolicy(k=2.0), SqrtLrRule())
        """
        return cls(
            policy_from_options(options),
            lr_rule=lr_rule or options.lr_rule,
            min_batch=options.min_batch,
            max_batch=options.max_batch,
            multiple=options.multiple,
            hysteresis=options.hysteresis,
            max_lr_scale=options.max_lr_scale,
        )

    def observe_step(self, batch_size: int, seconds: float) -> None:
        """Record one measured optimizer step (alternative to ``PolicyContext.step_times``)."""
        self.throughput.observe(batch_size, seconds)

    def decide(self, ctx: PolicyContext) -> Decision:
        """The batch size and lr multiplier to use from now on."""
        for b, t in ctx.step_times:
            self.throughput.observe(b, t)
        ctx = replace(
            ctx,
            step_times=(),
            min_batch=self.min_batch,
            max_batch=self.max_batch,
            multiple=self.multiple,
            throughput=self.throughput
            if self.accumulation == 1
            else cast(ThroughputModel, PerOptimizerStep(self.throughput, self.accumulation)),
        )
        grid = ctx.grid
        cur = ctx.batch_size
        raw, why = self.policy.propose_with_reason(ctx)
        target = grid.round(raw)
        if self.max_step_factor is not None and grid.in_bounds(cur):
            # A trust region: the throughput model is fitted on sizes seen so far, so a far jump is an
            # extrapolation. Moving at most x4 per decision lets the next decision measure and correct.
            bounded = grid.round(min(max(target, cur / self.max_step_factor), cur * self.max_step_factor))
            if bounded != target:
                why = f"{why} (proposed {target}; at most x{self.max_step_factor:g} per decision)"
                target = bounded
        gain: float | None
        if not grid.in_bounds(cur):
            new, gain = target, self.policy.predicted_gain(ctx, target)
            reason = (
                f"forced: current batch {cur} outside [{grid.lo}, {grid.hi}] (ceiling {ctx.ceiling}); {why}"
            )
        elif target == cur:
            new, gain = cur, 0.0
            reason = f"keep: {why}"
        else:
            gain = self.policy.predicted_gain(ctx, target)
            measure = "predicted gain"
            if gain is None:
                gain, measure = abs(target / cur - 1.0), "size change"
            # The epsilon keeps an exact 5% (105/100 - 1 = 0.05000000000000004) on the 'hold' side.
            if gain > self.hysteresis + 1e-12:
                new = target
                reason = f"change: {cur} -> {target}, {measure} {gain:.1%} > {self.hysteresis:.1%}; {why}"
            else:
                new = cur
                reason = (
                    f"hold: {cur} (proposed {target}), {measure} {gain:.1%} <= {self.hysteresis:.1%}; {why}"
                )
        trace = ctx.trace_sigma
        bn = ctx.b_noise
        if trace is None and bn is not None and ctx.grad_sqr is not None:
            trace = bn * ctx.grad_sqr
        lr_scale = float(self.lr_rule.scale(new, ctx.base_batch, ctx.grad_sqr, trace))
        if self.max_lr_scale is not None:
            # Near the optimum AdaScale's gain tends to S (linear scaling): the lr grows with the
            # batch, the noise floor lr/B stops falling, and past the stability limit the loss
            # diverges (regression: lr x39 at B=4296 from lr0=0.01 at B0=32). Capped, a larger
            # batch lowers the floor instead (Smith et al. 2017: grow B where you would decay lr).
            lr_scale = min(lr_scale, self.max_lr_scale)
        if new != cur:
            self.num_changes += 1
        return Decision(new, lr_scale, reason, gain, new != cur, target)

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints."""
        return {
            "throughput": self.throughput.state_dict(),
            "policy": self.policy.state_dict(),
            "num_changes": self.num_changes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        missing = {"throughput", "policy", "num_changes"} - set(state)
        if missing:
            raise ValueError(
                f"state is missing {sorted(missing)}. Pass the dict from BatchSizeController.state_dict()."
            )
        self.throughput.load_state_dict(state["throughput"])
        self.policy.load_state_dict(state["policy"])
        self.num_changes = int(state["num_changes"])
