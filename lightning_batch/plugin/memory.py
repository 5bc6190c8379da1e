"""Find the largest batch that fits in memory.

The probe measures the peak memory of a few training steps, fits ``bytes = a + b * B`` and verifies the
prediction with as few trial steps as possible. It knows nothing about models: the caller injects
``run_step(batch_size)``, which runs one forward/backward (and optionally optimizer step) at that batch
size, and a :class:`MemoryMeter` that measures a step's peak and translates the backend's out-of-memory
error into :class:`BatchOutOfMemoryError`.

Algorithm (:class:`MemoryProbe`):

1. Run ``start_batch`` (halving on failure). This is the only step not guarded by a prediction, so keep
   ``start_batch`` small.
2. Run ``2 * B1`` to get a slope. Before running it, check the conservative bound ``peak(B) <= peak(B1) *
   B / B1`` (true whenever the fixed cost ``a >= 0``) and shrink the batch to stay within budget. If the
   slope is below the meter's resolution (CPU RSS is coarse), keep doubling, still guarded.
3. Fit a line through the largest batch within budget and its nearest measured neighbour, predict
   ``B* = floor(safety * (budget - a) / b)`` and verify it with one trial step. In the linear case this
   ends here: 3 trial steps, within ``1 - safety`` (5%) of the true largest batch.
4. If the verify step is over budget, refit through it (now a secant that brackets the budget) and retry
   smaller; on an OOM (nothing measured) back off to ``backoff * B`` -- later retries bisect between the
   largest verified and the smallest failed batch. If it fitted but the refit says a batch more than
   ``refine_tol`` larger should fit (a concave curve), try that. Stop after ``max_trials`` steps. Where an
   OOM kills the process (:attr:`MemoryMeter.oom_is_fatal`, CPU), every step is also capped by the
   conservative bound of step 2, so the batch grows geometrically towards the budget instead of jumping.

The ceiling returned is always a batch that was actually run within budget.

>>> class SimulatedDevice(MemoryMeter):  # a step of B rows peaks at 8.4 MB + 9.1 kB a row
...     def budget_bytes(self):
...         return 900_000_000
...     def measure(self, run_step, batch_size):
...         return 8_400_000 + 9_100 * batch_size
>>> result = MemoryProbe(SimulatedDevice()).run(lambda batch_size: None)
>>> result.ceiling, len(result.steps)  # true largest: floor((0.9e9 - 8.4e6) / 9100) = 97978
(93079, 3)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import math
import numbers
import resource
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_batch.plugin.checks import checked, fraction, integer, positive_int

__all__ = [
    "BatchOutOfMemoryError",
    "CpuMemoryMeter",
    "CudaMemoryMeter",
    "MemoryMeter",
    "MemoryProbe",
    "MemoryProbeError",
    "MemoryProbeResult",
    "RunStep",
    "max_batch_that_fits",
]

RunStep = Callable[[int], None]
"""One training step (forward/backward) at the given batch size."""


class BatchOutOfMemoryError(RuntimeError):
    """A trial step ran out of memory (raised by meters in place of the backend's own error)."""


class MemoryProbeError(RuntimeError):
    """The probe could not find any batch size that fits."""


def max_batch_that_fits(bytes_per_sample: float, base_bytes: float, budget: float) -> int:
    """``floor((budget - base_bytes) / bytes_per_sample)``; 0 when the fixed cost alone exceeds the budget.

    >>> max_batch_that_fits(9_100, 8_400_000, 100_000_000)
    10065
    """
    for name, v in (("bytes_per_sample", bytes_per_sample), ("base_bytes", base_bytes), ("budget", budget)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}. Pass a size in bytes.")
    if bytes_per_sample <= 0:
        raise ValueError(
            f"bytes_per_sample must be > 0, got {bytes_per_sample!r}. Pass the measured memory per sample; "
            "with no per-sample cost every batch fits and there is no ceiling to compute."
        )
    headroom = budget - base_bytes
    if headroom <= 0:
        return 0
    if all(isinstance(v, numbers.Integral) for v in (bytes_per_sample, base_bytes, budget)):
        return int(headroom // bytes_per_sample)  # exact for integer byte counts
    return max(0, math.floor(headroom / bytes_per_sample * (1 + 1e-12)))  # 11.999999 -> 12


# ----------------------------------------------------------------------------------------------------------
# meters


class MemoryMeter(ABC):
    """Measures the peak memory of one step and the budget it must stay within.

    Units are bytes; what "peak" counts is up to the backend, but it must be consistent with
    :meth:`budget_bytes` (CUDA: absolute allocated bytes vs. an absolute budget; CPU: bytes above the
    process's RSS at :meth:`begin` vs. a budget of *additional* bytes).
    """

    name: str = ""
    resolution_bytes: int = 1
    """Differences smaller than this are measurement noise (the probe doubles the batch until it sees
    more)."""
    oom_is_fatal: bool = False
    """True where running out of memory kills the process (CPU): then every trial step, not just the
    doubling ones, is capped by the conservative bound ``peak(B) <= peak(B_ok) * B / B_ok``."""

    def begin(self) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """Called once when a probe starts (take baselines, free caches)."""

    @abstractmethod
    def budget_bytes(self) -> int:
        """The most a step may use."""

    @abstractmethod
    def measure(self, run_step: RunStep, batch_size: int) -> int:
        """Run ``run_step(batch_size)`` and return its peak bytes; raise :class:`BatchOutOfMemoryError`
        on OOM."""


class CudaMemoryMeter(MemoryMeter):
    """Peak ``torch.cuda.max_memory_allocated`` of a step; OOM is ``torch.cuda.OutOfMemoryError``.

    Budget: ``budget_fraction * total`` minus what *other* processes hold (``total - free - reserved by this
    process``, from ``torch.cuda.mem_get_info``). Peaks are absolute, so the fitted fixed cost ``a``
    includes weights and optimizer state already on the device. The caching allocator reserves more than it
    allocates (fragmentation, rounding), which is what ``budget_fraction`` and the probe's ``safety`` leave
    room for.

    >>> CudaMemoryMeter("cuda:0", budget_fraction=0.9).budget_fraction  # no GPU needed until measuring
    0.9
    """

    name = "cuda"
    resolution_bytes = 512  # the caching allocator's block granularity

    def __init__(self, device: Any = None, budget_fraction: float = 0.9) -> None:
        self.device = device
        self.budget_fraction = checked("budget_fraction", budget_fraction, fraction(), 0.9)

    def begin(self) -> None:
        import torch

        # Blocks cached from earlier work would count as "other" memory in the budget otherwise.
        torch.cuda.empty_cache()

    def budget_bytes(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        others = max(0, total - free - torch.cuda.memory_reserved(self.device))
        budget = int(self.budget_fraction * total) - others
        # A limit set with torch.cuda.set_per_process_memory_fraction (GPU sharing) caps this
        # process's allocator below the card: the budget is a share of that limit.
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        limit = get_fraction(self.device) if get_fraction is not None else 1.0
        if limit < 1.0:
            budget = min(budget, int(self.budget_fraction * limit * total))
        return max(0, budget)

    def measure(self, run_step: RunStep, batch_size: int) -> int:
        import torch

        torch.cuda.synchronize(self.device)
        # Blocks cached from the previous (smaller or larger) trial would fragment the pool a larger
        # step needs: under a limit (a per-process fraction, or a full card) it could then fail at a
        # batch that fits. Each trial starts from an empty cache, as training's first step does.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        oom = False
        try:
            run_step(batch_size)
            torch.cuda.synchronize(self.device)
        except torch.cuda.OutOfMemoryError:
            # Don't free the cache in here: the exception's traceback still references the step's tensors.
            oom = True
        if oom:
            torch.cuda.empty_cache()
            raise BatchOutOfMemoryError(f"CUDA out of memory at batch {batch_size}")
        return int(torch.cuda.max_memory_allocated(self.device))


def release_free_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so RSS shows live memory
    rather than what the allocator kept from earlier, larger steps. No-op where ``malloc_trim`` is missing.

    Only the young generations are collected: a step's tensors die by reference count, and a full
    collection in a process that has imported Lightning and MLflow takes a good part of a second, which made the probe
    slower than the training it plans."""
    gc.collect(1)
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def resident_bytes() -> int:
    try:
        import psutil
    except ImportError:  # a machine with torch and Lightning only (psutil is our dependency, not theirs)
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    return int(psutil.Process().memory_info().rss)


def available_memory() -> int:
    """RAM available to new allocations (psutil's ``available``; Linux's MemAvailable without it)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        raise
    return int(psutil.virtual_memory().available)


def _maxrss() -> int:
    # Linux reports kilobytes, macOS bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _reset_peak_rss() -> bool:
    """Linux: reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS, so that reading it
    after a step gives that step's own exact peak. False where ``/proc/self/clear_refs`` is missing
    or not writable (other systems, some sandboxes)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _peak_rss() is not None


def _peak_rss() -> int | None:
    """The kernel's peak RSS since the last :func:`_reset_peak_rss` (``VmHWM``), in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _RssSampler:
    """Polls the process RSS in a thread while a step runs (torch releases the GIL inside ops)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, resident_bytes())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


class CpuMemoryMeter(MemoryMeter):
    """Peak process RSS of a step above the RSS at :meth:`begin`.

    A CPU OOM kills the process (the OOM killer) instead of raising, so the probe must never *try* a step
    predicted over budget, and the budget is a fraction of ``psutil.virtual_memory().available`` at
    :meth:`begin` (default 0.5), or an explicit ``budget_bytes``. A ``MemoryError`` during the step is still
    reported as an OOM.

    How the peak is measured, and why: torch's CPU allocations go through ``malloc``/``mmap`` and are
    invisible to ``tracemalloc``, and torch has no CPU counterpart of ``max_memory_allocated``, so only the
    OS view (RSS) sees them. RSS does not drop after a step by itself: glibc keeps freed heap memory, and a
    later step reusing it shows no growth at all (measured: a probe started after a warm-up read 0 bytes up
    to batch 512). So before :meth:`begin` and before every step the meter runs ``gc.collect()`` and glibc
    ``malloc_trim(0)``, which returns free heap pages to the OS, and measures every step against the one
    baseline taken at :meth:`begin` (memory a step leaves alive, e.g. optimizer state created on the first
    step, then rightly counts against the budget). The peak: if ``getrusage(RUSAGE_SELF).ru_maxrss`` (the
    kernel's exact high-water mark) rose during the step, that; otherwise the step stayed below an earlier
    high-water mark and the peak comes from RSS sampled every ``sample_interval_s`` by a thread.

    Weaknesses: the high-water mark is process-wide and monotone, so a step smaller than an earlier one (or
    than an import-time peak) relies on sampling, which can miss a peak shorter than the interval (an
    underestimate); ``malloc_trim`` exists only with glibc, elsewhere retained memory inflates readings
    (conservative) or hides growth; one-time allocations of a first step (lazy init, thread pools) look like
    per-step cost unless the caller runs one warm-up step before probing; anything else the process
    allocates meanwhile (data-loader workers are other processes and are not seen at all) is charged to the
    step. Hence the coarse ``resolution_bytes``, the conservative ``budget_fraction``, and
    :attr:`oom_is_fatal`, which makes the probe grow the batch only as far as the conservative bound allows.

    On Linux the first weakness is gone: the meter resets the kernel's peak-RSS counter (``VmHWM``, via
    ``/proc/self/clear_refs``) before each step and reads it after, which is the step's exact peak however
    short. Sampling read a short step's peak as low as 43% of it, and the probe, which scales its next
    trial from that reading, then tried a batch 23% over its budget. The reset is process-wide: a tool
    that reads this process's ``VmHWM`` afterwards sees the peak since the probe, not since start-up.

    >>> m = CpuMemoryMeter(budget_bytes=64 * 2**20)
    >>> m.begin(); m.budget_bytes()
    67108864
    """

    name = "cpu"
    oom_is_fatal = True

    def __init__(
        self,
        budget_fraction: float = 0.5,
        *,
        budget_bytes: int | None = None,
        sample_interval_s: float = 0.0005,
        resolution_bytes: int = 256 * 1024,
    ) -> None:
        self.budget_fraction = checked("budget_fraction", budget_fraction, fraction(), 0.9)
        if budget_bytes is not None:
            budget_bytes = checked("budget_bytes", budget_bytes, positive_int, 1)
        self._fixed_budget = budget_bytes
        if not sample_interval_s > 0:
            raise ValueError(f"sample_interval_s must be > 0, got {sample_interval_s!r}. Pass e.g. 0.0005.")
        self.sample_interval_s = float(sample_interval_s)
        self.resolution_bytes = checked("resolution_bytes", resolution_bytes, positive_int, 262144)
        self._baseline: int | None = None
        self._budget: int | None = None

    def begin(self) -> None:
        release_free_memory()
        self._baseline = resident_bytes()
        if self._fixed_budget is not None:
            self._budget = self._fixed_budget
        else:
            self._budget = int(self.budget_fraction * available_memory())

    def budget_bytes(self) -> int:
        if self._budget is None:
            self.begin()
        assert self._budget is not None
        return self._budget

    def measure(self, run_step: RunStep, batch_size: int) -> int:
        if self._baseline is None:
            self.begin()
        assert self._baseline is not None
        release_free_memory()
        exact = _reset_peak_rss()
        high_before = _maxrss()
        oom = False
        with _RssSampler(self.sample_interval_s) if not exact else contextlib.nullcontext() as sampler:
            try:
                run_step(batch_size)
            except MemoryError:
                oom = True
        if oom:
            raise BatchOutOfMemoryError(f"MemoryError at batch {batch_size}")
        peak_since_reset = _peak_rss() if exact else None
        if peak_since_reset is not None:
            peak = peak_since_reset
        else:
            assert sampler is not None
            high_after = _maxrss()
            peak = high_after if high_after > high_before else sampler.peak
        return max(0, peak - self._baseline)


# ----------------------------------------------------------------------------------------------------------
# the probe


@dataclass
class MemoryProbeResult:
    """Outcome of a probe. ``steps`` lists every trial step run, in order, as ``(batch, peak_bytes)`` or
    ``(batch, "oom")``. ``predicted_bytes`` is the final fit at the ceiling, ``verified_bytes`` the measured
    peak there. ``base_bytes``/``bytes_per_sample`` are the final fit ``a``/``b``.

    >>> r = MemoryProbeResult(96, [(8, 100), (16, 180), (96, 820)], 820, 820, 1000, "fake", 20.0, 10.0)
    >>> r.as_dict(prefix="mem_")["mem_steps"]
    '8:100,16:180,96:820'
    """

    ceiling: int
    steps: list[tuple[int, int | str]] = field(default_factory=list)
    predicted_bytes: int = 0
    verified_bytes: int = 0
    budget_bytes: int = 0
    backend: str = ""
    base_bytes: float = 0.0
    bytes_per_sample: float = 0.0
    upper_bound: int | None = None
    #: ``(batch, seconds)`` of each trial step that fit (a forward and backward on the batch's rows):
    #: the per-row cost a throughput model can start from (:meth:`seconds_per_row`).
    step_seconds: list[tuple[int, float]] = field(default_factory=list)

    @property
    def trials(self) -> int:
        """Number of trial steps run."""
        return len(self.steps)

    def seconds_per_row(self) -> float | None:
        """The slope of the trial steps' time against their rows (least squares on relative errors,
        through :class:`~lightning_batch.plugin.policy.ThroughputModel`), or None with fewer than two sizes.

        >>> r = MemoryProbeResult(64, step_seconds=[(8, 0.0108), (64, 0.0164), (512, 0.0612)])
        >>> round(r.seconds_per_row() * 1e4, 3)  # 0.1 ms a row
        1.0
        """
        from lightning_batch.plugin.policy import ThroughputModel  # plain Python, no import cycle

        model = ThroughputModel(max_sizes=max(2, len(self.step_seconds)))
        for batch, seconds in self.step_seconds:
            if seconds > 0:
                model.observe(batch, seconds)
        if len(model.batch_sizes) < 2:
            return None
        return model.coefficients[1]  # type: ignore[index]  # fitted -> not None

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Numeric entries, for ``mlflow.log_metrics``."""
        return {
            f"{prefix}ceiling": float(self.ceiling),
            f"{prefix}trials": float(self.trials),
            f"{prefix}predicted_bytes": float(self.predicted_bytes),
            f"{prefix}verified_bytes": float(self.verified_bytes),
            f"{prefix}budget_bytes": float(self.budget_bytes),
            f"{prefix}base_bytes": float(self.base_bytes),
            f"{prefix}bytes_per_sample": float(self.bytes_per_sample),
        }

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """Flat dict of str/int/float (steps as ``"batch:peak,..."``), for ``mlflow.log_params``."""
        d: dict[str, Any] = {
            f"{prefix}ceiling": self.ceiling,
            f"{prefix}trials": self.trials,
            f"{prefix}predicted_bytes": self.predicted_bytes,
            f"{prefix}verified_bytes": self.verified_bytes,
            f"{prefix}budget_bytes": self.budget_bytes,
            f"{prefix}backend": self.backend,
            f"{prefix}base_bytes": self.base_bytes,
            f"{prefix}bytes_per_sample": self.bytes_per_sample,
            f"{prefix}steps": ",".join(f"{b}:{p}" for b, p in self.steps),
        }
        if self.upper_bound is not None:
            d[f"{prefix}upper_bound"] = self.upper_bound
        return d

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (steps as lists), so a resumed run can skip the probe."""
        return {
            "ceiling": self.ceiling,
            "steps": [[b, p] for b, p in self.steps],
            "predicted_bytes": self.predicted_bytes,
            "verified_bytes": self.verified_bytes,
            "budget_bytes": self.budget_bytes,
            "backend": self.backend,
            "base_bytes": self.base_bytes,
            "bytes_per_sample": self.bytes_per_sample,
            "upper_bound": self.upper_bound,
            "step_seconds": [[b, t] for b, t in self.step_seconds],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        known = set(self.state_dict())
        if not isinstance(state, dict) or "ceiling" not in state or not set(state) <= known:
            raise ValueError(
                f"state must come from MemoryProbeResult.state_dict() (keys {sorted(known)}), got {state!r}. "
                "Pass the dict returned by state_dict()."
            )
        for key, value in state.items():
            if key == "steps":
                value = [(int(b), p) for b, p in value]
            elif key == "step_seconds":
                value = [(int(b), float(t)) for b, t in value]
            setattr(self, key, value)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MemoryProbeResult:
        """A new result from :meth:`state_dict`."""
        r = cls(ceiling=0)
        r.load_state_dict(state)
        return r


class MemoryProbe:
    """Largest batch that fits, in few trial steps (see the module docstring for the algorithm).

    ``safety`` is the share of the headroom ``budget - a`` the predicted batch may use (0.95: lands within 5%
    of the true largest batch in the linear case, while leaving slack for a fit from two small batches).
    ``backoff`` shrinks the batch after an OOM. ``upper_bound`` (e.g. the dataset size) caps the ceiling so
    no batch larger than useful is ever tried. ``refine_tol``: after a successful verify, try a larger batch
    only if the refit predicts more than this relative gain.

    Run one warm-up step before probing: lazy initialisation (cuDNN/cuBLAS handles, thread pools, optimizer
    state) would otherwise be measured as part of the first trial step and distort the fit.

    >>> class SimulatedDevice(MemoryMeter):  # a step of B rows peaks at 1 kB + 100 B a row
    ...     def budget_bytes(self):
    ...         return 900_000
    ...     def measure(self, run_step, batch_size):
    ...         return 1_000 + 100 * batch_size
    >>> MemoryProbe(SimulatedDevice(), upper_bound=5_000).run(lambda b: None).ceiling
    5000
    """

    def __init__(
        self,
        meter: MemoryMeter,
        *,
        start_batch: int = 8,
        safety: float = 0.95,
        backoff: float = 0.8,
        max_trials: int = 8,
        upper_bound: int | None = None,
        refine_tol: float = 0.05,
    ) -> None:
        if not isinstance(meter, MemoryMeter):
            raise ValueError(
                f"meter must be a MemoryMeter, got {meter!r}. Pass e.g. CudaMemoryMeter('cuda')."
            )
        self.meter = meter
        self.start_batch = checked("start_batch", start_batch, positive_int, 8)
        self.safety = checked("safety", safety, fraction(), 0.95)
        if isinstance(backoff, bool) or not isinstance(backoff, numbers.Real) or not 0.0 < backoff < 1.0:
            raise ValueError(
                f"backoff must be in (0, 1), got {backoff!r}. Pass e.g. backoff=0.8 (or 0.5 to halve)."
            )
        self.backoff: float = float(backoff)
        self.max_trials: int = checked("max_trials", max_trials, integer(minimum=3), 8)
        if upper_bound is not None:
            upper_bound = checked("upper_bound", upper_bound, positive_int, 10_000)
        self.upper_bound: int | None = upper_bound
        if isinstance(refine_tol, bool) or not isinstance(refine_tol, numbers.Real) or refine_tol < 0:
            raise ValueError(f"refine_tol must be >= 0, got {refine_tol!r}. Pass e.g. refine_tol=0.05.")
        self.refine_tol: float = float(refine_tol)

    def run(self, run_step: RunStep) -> MemoryProbeResult:
        """Probe with ``run_step`` and return the verified ceiling."""
        if not callable(run_step):
            raise ValueError(f"run_step must be callable, got {run_step!r}. Pass a function of batch_size.")
        return _ProbeRun(self, run_step).run()


#: With the ceiling proven without a trial (see _ProbeRun._slope), the second, timing-only trial's
#: size as a multiple of the first's.
TIMING_JUMP = 8


class _ProbeRun:
    """One probe's mutable state (kept out of :class:`MemoryProbe` so a probe object can be reused)."""

    def __init__(self, cfg: MemoryProbe, run_step: RunStep) -> None:
        self.cfg = cfg
        self.run_step = run_step
        self.steps: list[tuple[int, int | str]] = []
        self.measured: dict[int, int] = {}  # every measured peak, over budget or not
        self.ok: dict[int, int] = {}  # peaks within budget
        self.fail_min: int | None = None  # smallest batch that failed
        self.oom_min: int | None = None  # smallest batch that raised OOM (nothing measured)
        self.budget = 0
        self.cap = cfg.upper_bound
        self.bounded: int | None = None  # a ceiling proven by the conservative bound, not by a trial

    # -- helpers --------------------------------------------------------------------------------------------

    def _trial(self, batch: int) -> bool:
        """Run one step; True if it fit within the budget."""
        try:
            peak = self.cfg.meter.measure(self.run_step, batch)
        except BatchOutOfMemoryError:
            self.steps.append((batch, "oom"))
            self.oom_min = batch if self.oom_min is None else min(self.oom_min, batch)
            self.fail_min = batch if self.fail_min is None else min(self.fail_min, batch)
            return False
        self.steps.append((batch, peak))
        self.measured[batch] = peak
        if peak > self.budget:
            self.fail_min = batch if self.fail_min is None else min(self.fail_min, batch)
            return False
        self.ok[batch] = peak
        return True

    def _trials_left(self) -> bool:
        return len(self.steps) < self.cfg.max_trials

    def _fit(self) -> tuple[float, float]:
        """``(a, b)`` of a line through the largest batch within budget and its nearest measured neighbour
        above it (a step measured over budget: the secant then brackets the budget, which is what makes a
        convex curve converge), else below it (the next largest batch within budget). Falls back to a line
        through the origin and the largest batch within budget (conservative when the fixed cost is
        positive) when there is no second point or the slope is not positive (noise)."""
        top = max(self.ok)
        above = [x for x in self.measured if x > top]
        below = [x for x in self.ok if x < top]
        other = min(above) if above else (max(below) if below else None)
        if other is not None:
            b = (self.measured[other] - self.ok[top]) / (other - top)
            if b > 0:
                return self.ok[top] - b * top, b
        return 0.0, max(self.ok[top], 1) / top

    def _conservative_limit(self) -> int:
        """Largest batch with ``peak(best) * B / best <= budget``: if the fixed cost is >= 0, no batch up to
        it can exceed the budget, whatever the curve's slope. Readings below the meter's resolution are
        rounded up to it, so an unmeasurably small peak does not remove the bound."""
        best = max(self.ok)
        return self.budget * best // max(self.ok[best], self.cfg.meter.resolution_bytes, 1)

    def _upper_limit(self) -> int | None:
        """Largest batch worth trying next (None: unbounded)."""
        limits = [x for x in (self.cap,) if x is not None]
        if self.cfg.meter.oom_is_fatal and self.ok:
            limits.append(self._conservative_limit())
        if self.fail_min is not None:
            limits.append(self.fail_min - 1)
        if self.oom_min is not None:
            # Nothing was measured at an OOM, so the fit can't say how far to go back: back off, and bisect
            # towards the largest verified batch on later attempts.
            best = max(self.ok) if self.ok else 0
            limits.append(max(math.floor(self.oom_min * self.cfg.backoff), best + (self.oom_min - best) // 2))
        return min(limits) if limits else None

    # -- phases ---------------------------------------------------------------------------------------------

    def run(self) -> MemoryProbeResult:
        cfg = self.cfg
        cfg.meter.begin()
        self.budget = int(cfg.meter.budget_bytes())
        if self.budget <= 0:
            raise MemoryProbeError(
                f"{cfg.meter.name} memory budget is {self.budget} bytes. "
                "Free memory or pass a larger budget_fraction."
            )
        self._first_point()
        self._slope()
        self._verify()
        return self._result()

    def _first_point(self) -> None:
        batch = self.cfg.start_batch if self.cap is None else min(self.cfg.start_batch, self.cap)
        while not self._trial(batch):
            if batch == 1 or not self._trials_left():
                raise MemoryProbeError(
                    f"no batch size fits the {self.cfg.meter.name} budget of {self.budget} bytes "
                    f"(tried {self.steps}). Free memory, pass a larger budget_fraction, or shrink the model."
                )
            batch = max(1, batch // 2)

    def _slope(self) -> None:
        resolution = self.cfg.meter.resolution_bytes
        while self._trials_left():
            best = max(self.ok)
            limit = self._upper_limit()
            # Jump straight to the largest batch that is safe without a slope (the conservative limit):
            # doubling from a small start takes a dozen trials when a batch costs a few hundred bytes, as
            # a tabular model's does on CPU. The guard also means no step is predicted over budget, even
            # before there is a slope to predict with (on CPU an over-budget step may mean the OOM
            # killer, not an exception).
            nxt = self._conservative_limit() if limit is None else min(self._conservative_limit(), limit)
            if nxt <= best:
                return  # nothing larger can be tried safely; the ceiling is `best` unless the fit finds more
            if self.cfg.meter.oom_is_fatal and self.cap is not None and nxt >= self.cap:
                # Every batch up to the cap (all the data) is within budget by the conservative bound: no
                # trial there (on a CPU a step over all the rows cost 1.5 s of a 10 s fit). One step a few
                # times the start still times a second size, for the throughput model's prior.
                self.bounded = self.cap
                if best < self.cap:
                    self._trial(min(self.cap, best * TIMING_JUMP))
                return
            fitted = self._trial(nxt)
            if not fitted or self.measured[nxt] - self.ok[best] >= resolution:
                return

    def _verify(self) -> None:
        cfg = self.cfg
        while self._trials_left() and self.bounded is None:
            best = max(self.ok)
            a, b = self._fit()
            target = max_batch_that_fits(b, a, a + cfg.safety * (self.budget - a))
            limit = self._upper_limit()
            if limit is not None:
                target = min(target, limit)
            if target <= best * (1.0 + cfg.refine_tol) and (target <= best or len(self.ok) > 1):
                # Close enough to a verified batch to not spend a trial step on it. (With only the start
                # point verified, any larger target is still worth a try.)
                return
            if a + b * target > self.budget:
                return  # never run a step the fit predicts over budget
            self._trial(target)

    def _result(self) -> MemoryProbeResult:
        verified = max(self.ok)
        ceiling = max(verified, self.bounded or 0)
        a, b = self._fit()
        return MemoryProbeResult(
            ceiling=ceiling,
            steps=list(self.steps),
            predicted_bytes=int(a + b * ceiling),
            verified_bytes=self.ok[verified],
            budget_bytes=self.budget,
            backend=self.cfg.meter.name,
            base_bytes=float(a),
            bytes_per_sample=float(b),
            upper_bound=self.cap,
        )
