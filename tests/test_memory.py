"""Tests for lightning_batch.plugin.memory. The probe logic runs against simulated devices (recorded figures, a
patched torch.cuda) so it needs no GPU; the CPU meter runs a real tiny torch model. True largest batches are
found by exhaustive search over the simulated curve, independently of the probe's arithmetic."""

from __future__ import annotations

import ctypes
import ctypes.util
import doctest
import gc
import json
import math
import subprocess
import sys

import psutil
import pytest
import torch

from lightning_batch.plugin import memory
from lightning_batch.plugin.memory import (
    BatchOutOfMemoryError,
    CpuMemoryMeter,
    CudaMemoryMeter,
    MemoryProbe,
    MemoryProbeError,
    MemoryProbeResult,
    max_batch_that_fits,
)
from lightning_batch.plugin.probe import CUDA_START_BATCH
from tests.fakes import FakeMemoryMeter, probe_max_batch

MB = 1_000_000

# Plausible peak figures for training steps on a GPU (weights + grads + Adam state as the fixed cost,
# activations per sample), with the device scaled down so the numbers stay readable; only the arithmetic
# matters.
RECORDED = {
    # name: (fixed bytes a, bytes per sample b, device capacity)
    "mlp-784-1024-10": (8.4 * MB, 9_100, 800 * MB),
    "mlp-4x4096-fp16": (403 * MB, 65_536, 8_000 * MB),
    "resnet18-cifar": (180 * MB, 3.1 * MB, 80_000 * MB),
    "tiny-transformer-seq512": (95 * MB, 1.6 * MB, 24_000 * MB),
}


def true_largest(meter: FakeMemoryMeter, budget: float | None = None) -> int:
    """Largest B whose noise-free bytes stay within the budget and which does not OOM (exhaustive doubling +
    bisection on the simulated curve)."""
    budget = meter.budget_bytes() if budget is None else budget

    def fits(b: int) -> bool:
        return meter.bytes_at(b) <= budget and (meter.oom_above is None or b <= meter.oom_above)

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def noop(batch_size: int) -> None:
    pass


def test_doctests() -> None:
    result = doctest.testmod(memory)
    assert result.attempted > 5
    assert result.failed == 0


def test_max_batch_that_fits() -> None:
    assert max_batch_that_fits(10, 100, 1000) == 90
    assert max_batch_that_fits(10, 100, 1009) == 90
    assert max_batch_that_fits(0.1, 0.3, 1.5) == 12  # 11.999999999999998 in floats
    assert max_batch_that_fits(10, 2000, 1000) == 0
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        max_batch_that_fits(0, 100, 1000)
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        max_batch_that_fits(10, float("nan"), 1000)


# ----------------------------------------------------------------------------------------------------------
# probe logic on recorded figures


@pytest.mark.parametrize("name", sorted(RECORDED))
@pytest.mark.parametrize("fraction", [0.9, 0.5])
def test_linear_curve_within_10pct_in_3_steps(name: str, fraction: float) -> None:
    a, b, capacity = RECORDED[name]
    meter = FakeMemoryMeter(a, b, capacity, budget_fraction=fraction)
    truth = true_largest(meter)
    result = MemoryProbe(meter, start_batch=2).run(noop)
    assert result.trials <= 3
    assert 0.9 * truth <= result.ceiling <= truth
    assert result.verified_bytes <= result.budget_bytes == int(fraction * capacity)
    assert result.bytes_per_sample == pytest.approx(b, rel=1e-6)
    assert result.base_bytes == pytest.approx(a, rel=1e-3)
    assert all(isinstance(p, int) for _, p in result.steps)  # no OOM on the way


def test_budget_fraction_respected() -> None:
    a, b, capacity = RECORDED["mlp-784-1024-10"]
    ceilings = []
    for fraction in (0.3, 0.6, 0.9):
        meter = FakeMemoryMeter(a, b, capacity, budget_fraction=fraction)
        result = MemoryProbe(meter).run(noop)
        assert meter.bytes_at(result.ceiling) <= fraction * capacity
        assert result.ceiling >= 0.9 * true_largest(meter)
        # No step was run above the budget either (linear curve: the prediction is exact).
        assert max(meter.bytes_at(c) for c in meter.calls) <= fraction * capacity
        ceilings.append(result.ceiling)
    assert ceilings == sorted(ceilings)


@pytest.mark.parametrize("fraction", [0.9, 1.0])
def test_oom_at_predicted_size_backs_off(fraction: float) -> None:
    a, b, capacity = RECORDED["mlp-4x4096-fp16"]
    # An OOM the peak figures don't predict (fragmentation, a cuDNN workspace) just below the prediction.
    meter = FakeMemoryMeter(a, b, capacity, budget_fraction=fraction)
    meter.oom_above = int(0.85 * true_largest(meter))
    probe = MemoryProbe(meter, backoff=0.8, max_trials=8)
    result = probe.run(noop)
    ooms = [i for i, (_, p) in enumerate(result.steps) if p == "oom"]
    assert ooms, "the scenario must hit an OOM"
    first_oom_batch = result.steps[ooms[0]][0]
    assert result.steps[ooms[0] + 1][0] <= 0.8 * first_oom_batch  # backed off
    assert result.ceiling <= meter.oom_above
    assert result.ceiling >= 0.75 * meter.oom_above
    assert result.trials <= 8
    assert result.verified_bytes <= result.budget_bytes


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("fraction", [0.9, 1.0])
def test_mildly_nonlinear_curve_converges(share: float, fraction: float) -> None:
    # bytes = a + b B + q B^2, with the quadratic term `share` of the budget at the linear prediction: the fit
    # from small batches overestimates the ceiling, so the first verify lands over budget or OOMs.
    a, b, capacity = RECORDED["resnet18-cifar"]
    linear_guess = (fraction * capacity - a) / b
    q = share * fraction * capacity / linear_guess**2
    meter = FakeMemoryMeter(a, b, capacity, budget_fraction=fraction, quadratic=q)
    truth = true_largest(meter)
    result = MemoryProbe(meter, max_trials=6).run(noop)
    assert 0.9 * truth <= result.ceiling <= truth
    assert result.trials <= 6


def test_noisy_figures_still_land_near_the_truth() -> None:
    a, b, capacity = RECORDED["tiny-transformer-seq512"]
    for seed in range(10):
        meter = FakeMemoryMeter(a, b, capacity, noise=0.005, seed=seed)
        truth = true_largest(meter)
        result = MemoryProbe(meter).run(noop)
        assert result.verified_bytes <= result.budget_bytes
        assert 0.85 * truth <= result.ceiling <= 1.02 * truth


def test_upper_bound_caps_every_trial() -> None:
    meter = FakeMemoryMeter(8.4 * MB, 9_100, 800 * MB)
    result = MemoryProbe(meter, upper_bound=1000).run(noop)
    assert result.ceiling == 1000
    assert max(meter.calls) == 1000
    assert result.as_dict()["upper_bound"] == 1000
    meter = FakeMemoryMeter(8.4 * MB, 9_100, 800 * MB)
    assert MemoryProbe(meter, start_batch=8, upper_bound=5).run(noop).ceiling == 5
    assert meter.calls == [5]


def test_doubling_step_is_guarded_by_the_budget() -> None:
    # a = 0, b = 1000 B, budget 12 kB -> truth 12. Doubling 8 -> 16 would need 16 kB: never run it.
    meter = FakeMemoryMeter(0, 1000, 12_000, budget_fraction=1.0)
    result = MemoryProbe(meter, start_batch=8).run(noop)
    assert max(meter.calls) <= 12
    assert result.ceiling == 12


def test_fatal_oom_meter_never_runs_a_step_over_budget() -> None:
    for name, (a, b, capacity) in RECORDED.items():
        meter = FakeMemoryMeter(a, b, capacity, budget_fraction=0.5, quadratic=b / 1e6)
        meter.oom_is_fatal = True
        result = MemoryProbe(meter, max_trials=16).run(noop)
        budget = meter.budget_bytes()
        assert max(meter.bytes_at(c) for c in meter.calls) <= budget, name
        assert result.ceiling >= 0.8 * true_largest(meter), name


def test_start_batch_too_large_is_halved_and_nothing_fits_raises() -> None:
    meter = FakeMemoryMeter(0, 1000, 20_000, budget_fraction=1.0)
    result = MemoryProbe(meter, start_batch=64).run(noop)
    assert meter.calls[:3] == [64, 32, 16]
    assert result.ceiling == 20
    with pytest.raises(MemoryProbeError, match="Free memory"):
        MemoryProbe(FakeMemoryMeter(5_000, 1000, 4_000)).run(noop)


def test_result_logging_and_state_dict() -> None:
    meter = FakeMemoryMeter(1 * MB, 10_000, 100 * MB)
    meter.oom_above = 7000
    result = MemoryProbe(meter).run(noop)
    d = result.as_dict(prefix="mem/")
    assert d["mem/ceiling"] == result.ceiling and d["mem/backend"] == "fake"
    assert "oom" in d["mem/steps"]
    assert all(isinstance(v, (int, float, str)) for v in d.values())
    assert all(isinstance(v, float) for v in result.metrics().values())
    state = json.loads(json.dumps(result.state_dict()))
    restored = MemoryProbeResult.from_state_dict(state)
    assert restored == result
    with pytest.raises(ValueError, match="state_dict"):
        restored.load_state_dict({"x": 1})


# ----------------------------------------------------------------------------------------------------------
# the CUDA meter, with torch.cuda replaced by a simulated device playing back recorded figures


class FakeCuda:
    """Simulated device: `step` allocates weights + per-sample activations and raises torch's OOM error."""

    def __init__(
        self, weights: int, per_sample: int, total: int, other_process: int, oom_above: int | None = None
    ):
        self.weights, self.per_sample, self.total, self.other = weights, per_sample, total, other_process
        self.oom_above = oom_above
        self.peak = weights
        self.empty_cache_calls = 0
        self.fraction = 1.0  # torch.cuda.set_per_process_memory_fraction's limit

    def step(self, batch: int) -> None:
        need = self.weights + self.per_sample * batch
        if need > self.total - self.other or (self.oom_above is not None and batch > self.oom_above):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")
        self.peak = max(self.peak, need)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(
            torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.weights)
        )
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.weights)
        monkeypatch.setattr(
            torch.cuda,
            "mem_get_info",
            lambda device=None: (self.total - self.other - self.weights, self.total),
        )
        monkeypatch.setattr(
            torch.cuda, "empty_cache", lambda: setattr(self, "empty_cache_calls", self.empty_cache_calls + 1)
        )
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: self.fraction)


def test_cuda_meter_on_recorded_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeCuda(weights=8_400_000, per_sample=9_100, total=800 * MB, other_process=50 * MB)
    gpu.install(monkeypatch)
    meter = CudaMemoryMeter("cuda:0", budget_fraction=0.9)
    # Budget: 90% of the device minus what another process holds.
    assert meter.budget_bytes() == int(0.9 * 800 * MB) - 50 * MB
    result = MemoryProbe(meter).run(gpu.step)
    truth = (meter.budget_bytes() - gpu.weights) // gpu.per_sample
    assert result.backend == "cuda"
    assert result.trials <= 3
    assert 0.9 * truth <= result.ceiling <= truth
    assert result.verified_bytes == gpu.weights + gpu.per_sample * result.ceiling


def test_cuda_budget_honours_a_per_process_memory_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeCuda(weights=8_400_000, per_sample=9_100, total=800 * MB, other_process=0)
    gpu.install(monkeypatch)
    gpu.fraction = 0.25  # torch.cuda.set_per_process_memory_fraction(0.25): a GPU shared four ways
    assert CudaMemoryMeter(budget_fraction=0.9).budget_bytes() == int(0.9 * 0.25 * 800 * MB)


class H200Mlp(FakeCuda):
    """The peaks an H200 measured for the MLP 512-512 (benchmarks/gpu_check.py, fp32, 8 GiB limit):
    a fixed regime at small batches (weights' gradients, workspace), then 8,329 bytes a row."""

    def step(self, batch: int) -> None:
        need = max(70_454_784 + 1_000 * batch, 69_315_000 + 8_329 * batch)
        if need > self.total:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")
        self.peak = max(self.peak, need)


@pytest.mark.parametrize(("start", "within_10pct_in_3"), [(8, False), (CUDA_START_BATCH, True)])
def test_on_the_h200s_figures_a_start_of_1024_rows_lands_within_10pct_in_3_trials(
    monkeypatch: pytest.MonkeyPatch, start: int, within_10pct_in_3: bool
) -> None:
    gpu = H200Mlp(weights=69_315_000, per_sample=8_329, total=8 * 2**30, other_process=0)
    gpu.install(monkeypatch)
    meter = CudaMemoryMeter(budget_fraction=1.0)
    truth = (8 * 2**30 - 69_315_000) // 8_329
    result = MemoryProbe(meter, start_batch=start).run(gpu.step)
    assert (result.trials <= 3 and 0.9 * truth <= result.ceiling <= truth) is within_10pct_in_3


def test_cuda_meter_translates_oom_and_frees_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeCuda(weights=8_400_000, per_sample=9_100, total=800 * MB, other_process=0, oom_above=50_000)
    gpu.install(monkeypatch)
    meter = CudaMemoryMeter(budget_fraction=0.9)
    with pytest.raises(BatchOutOfMemoryError):
        meter.measure(gpu.step, 60_000)
    assert gpu.empty_cache_calls == 2  # before the trial (a clean pool) and after the OOM
    result = MemoryProbe(meter).run(gpu.step)
    assert any(p == "oom" for _, p in result.steps)
    assert gpu.empty_cache_calls >= 2
    assert 0.75 * 50_000 <= result.ceiling <= 50_000


# ----------------------------------------------------------------------------------------------------------
# the CPU meter on a real model


@pytest.fixture(scope="module")
def tiny_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    ran: list[int] = []

    def step(batch_size: int) -> None:
        ran.append(batch_size)
        x = torch.randn(batch_size, 256)
        loss = net(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(8)  # warm-up: lazy initialisation is not a per-sample cost
    ran.clear()
    return step, ran


def test_cpu_meter_real_model_small_budget(tiny_step) -> None:
    step, ran = tiny_step
    budget = 12 * 2**20
    meter = CpuMemoryMeter(budget_bytes=budget, resolution_bytes=256 * 1024)
    result = MemoryProbe(meter, max_trials=12).run(step)
    assert result.backend == "cpu" and result.budget_bytes == budget
    assert result.ceiling > 0
    assert result.verified_bytes <= budget
    assert ran == [b for b, _ in result.steps]
    # Never a step predicted over budget: each step after the first stays within the conservative bound
    # peak(B_ok) * B / B_ok <= budget of the largest batch verified before it.
    ok: dict[int, int] = {}
    for batch, peak in result.steps:
        if ok:
            best = max(ok)
            assert batch * max(ok[best], meter.resolution_bytes) <= budget * best, result.steps
        if isinstance(peak, int) and peak <= budget:
            ok[batch] = peak
    # The readings are real RSS, so allow noise, but no step may have blown far past the budget.
    assert max(p for _, p in result.steps if isinstance(p, int)) <= 1.5 * budget, result.steps


def test_cpu_meter_budget_from_available_memory() -> None:
    meter = CpuMemoryMeter(budget_fraction=0.25)
    meter.begin()
    expected = 0.25 * psutil.virtual_memory().available
    assert meter.budget_bytes() == pytest.approx(expected, rel=0.1)


def test_cpu_meter_reports_memory_error_as_oom() -> None:
    def explode(batch_size: int) -> None:
        raise MemoryError

    with pytest.raises(BatchOutOfMemoryError):
        CpuMemoryMeter(budget_bytes=2**20).measure(explode, 4)


def test_cpu_meter_sees_a_large_allocation() -> None:
    meter = CpuMemoryMeter(budget_bytes=2**30)
    meter.begin()
    size = 64 * 2**20

    def allocate(batch_size: int) -> None:
        t = torch.ones(size // 4)  # touch the pages so they are resident
        assert float(t[-1]) == 1.0

    assert meter.measure(allocate, 1) >= 0.9 * size


def _vm_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise LookupError(field)


def _true_peak_bytes(step, batch_size: int) -> int:
    """A step's true peak RSS above the RSS just before it, measured without the meter: free what glibc
    keeps (``gc.collect`` + ``malloc_trim`` through our own ctypes handle), reset the kernel's exact
    high-water mark (``/proc/self/clear_refs`` 5, Linux >= 4.0) and read ``VmHWM`` after the step."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    before = _vm_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(batch_size)
    return _vm_bytes("VmHWM") - before


def _true_largest_batch(step, budget: int, rel_tol: float = 0.02) -> tuple[int, int]:
    """(largest batch whose true peak fits in ``budget`` to within ``rel_tol``, the smallest that does not):
    doubling, then bisection over :func:`_true_peak_bytes` (monotone in the batch for this step)."""
    lo, hi = 0, 128
    while _true_peak_bytes(step, hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > max(1, int(rel_tol * lo)):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _true_peak_bytes(step, mid) <= budget else (lo, mid)
    return lo, hi


def _has_resettable_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_bytes("VmHWM") > 0
    except OSError:
        return False


try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 -- glibc only
except (OSError, AttributeError):
    _LIBC = None

WIDE_IN, WIDE_OUT = 16, 8192
REAL_BUDGET = 64 * 2**20


def _wide_step():
    """A forward/backward of one wide layer: each sample holds 8192-float activations (pre-activation, ReLU
    output, square, their gradients); the weight's gradient is the fixed cost."""
    torch.manual_seed(0)
    weight = torch.randn(WIDE_IN, WIDE_OUT, requires_grad=True)

    def step(batch_size: int) -> None:
        x = torch.randn(batch_size, WIDE_IN)
        torch.relu(x @ weight).square().mean().backward()
        weight.grad = None  # allocated in every step: part of the step's own fixed cost

    step(64)  # warm-up: lazy initialisation is not a per-sample cost
    return step


def _real_probe_against_the_truth() -> dict:
    """Run in a child process (see the test): the independent bisection, then the real probe."""
    step = _wide_step()
    true_fit, true_fail = _true_largest_batch(step, REAL_BUDGET)
    result = MemoryProbe(CpuMemoryMeter(budget_bytes=REAL_BUDGET), start_batch=32).run(step)
    return {
        "true_fit": true_fit,
        "true_fail": true_fail,
        "peak_at_fail": _true_peak_bytes(step, true_fail),
        "ceiling": result.ceiling,
        "budget": result.budget_bytes,
        "steps": result.steps,
        "verified": result.verified_bytes,
        "true_peak_at_ceiling": [_true_peak_bytes(step, result.ceiling) for _ in range(3)],
    }


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _LIBC is None or not _has_resettable_peak(),
    reason="needs Linux's resettable VmHWM and glibc's malloc_trim for the independent peak measurement",
)
def test_cpu_probe_ceiling_matches_an_independent_bisection_of_the_true_peak() -> None:
    """The real CpuMemoryMeter + MemoryProbe against a bisection over the kernel's exact peak RSS of a real
    step, with a budget 64 MiB above the current use.

    It runs in a child process with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so every
    activation is its own mapping and RSS follows live memory. Under glibc's default (dynamic) threshold
    the same step's peak RSS varies from run to run by whole activation tensors (measured at batch 554:
    87, 104, 121, 139 MiB), so there is no single true peak to compare with (see the report in issue 12).

    Tolerance: the probe plans with ``safety=0.95`` (a verified batch within 5% of the largest that fits in
    the linear case) and its verified batch must really fit; allow 10% below for RSS noise and the few
    trial steps, and 2% above (the bisection's 2% resolution, page rounding)."""
    from .conftest import ROOT, subprocess_env  # here: the child imports this module without Lightning

    code = (
        "import json; from tests.test_memory import _real_probe_against_the_truth as f; "
        "print(json.dumps(f()))"
    )
    env = subprocess_env(MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    true_fit, true_fail, ceiling, budget = r["true_fit"], r["true_fail"], r["ceiling"], r["budget"]
    # The truth is real memory: at least the pre-activation and the ReLU output, 4 bytes a float each.
    assert r["peak_at_fail"] >= 2 * 4 * WIDE_OUT * true_fail, r
    assert 200 <= true_fit <= 4000, r  # ~100-200 KB a sample
    assert budget == REAL_BUDGET
    assert 0.9 * true_fit <= ceiling <= 1.02 * true_fail, r
    assert max(r["true_peak_at_ceiling"]) <= 1.02 * budget, r
    # The meter's own reading at the ceiling agrees with the independent measurement.
    assert r["verified"] == pytest.approx(min(r["true_peak_at_ceiling"]), rel=0.03), r


# ----------------------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start_batch": 0},
        {"safety": 0.0},
        {"safety": 1.5},
        {"backoff": 1.0},
        {"backoff": 0},
        {"max_trials": 2},
        {"upper_bound": 0},
        {"refine_tol": -1},
    ],
)
def test_probe_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        MemoryProbe(FakeMemoryMeter(0, 1, 100), **kwargs)


def test_meters_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        MemoryProbe("cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        CudaMemoryMeter(budget_fraction=0.0)
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        CpuMemoryMeter(budget_fraction=2.0)
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        CpuMemoryMeter(budget_bytes=0)
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        CpuMemoryMeter(sample_interval_s=0)
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        FakeMemoryMeter(-1, 1, 100)
    with pytest.raises(ValueError, match=r"Pass|; e\.g\. "):
        probe_max_batch("not callable", FakeMemoryMeter(0, 1, 100))  # type: ignore[arg-type]
    assert not math.isnan(FakeMemoryMeter(0, 1, 100).budget_bytes())


def test_the_cpu_meter_reads_a_short_steps_peak_exactly_after_a_larger_one():
    """A step whose peak is brief and below an earlier, larger step's: the process's lifetime
    high-water mark says nothing about it and polling can miss it; the kernel's per-step peak
    (reset before the step) must see the whole allocation."""
    from lightning_batch.plugin.memory import _peak_rss, _reset_peak_rss

    if not _reset_peak_rss():
        pytest.skip("no resettable peak-RSS counter (/proc/self/clear_refs) on this system")
    meter = CpuMemoryMeter(budget_bytes=2**30)
    meter.begin()

    def brief(batch: int) -> None:
        block = torch.ones(batch, 2**18)  # batch MiB, every page touched, freed at once
        del block

    assert meter.measure(brief, 96) >= 96 * 2**20 * 0.98  # the larger step first: the lifetime peak
    for _ in range(3):
        peak = meter.measure(brief, 24)
        assert 24 * 2**20 * 0.98 <= peak <= 24 * 2**20 + 8 * 2**20, peak / 2**20
    assert _peak_rss() is not None


def test_a_fatal_oom_meter_proves_the_whole_data_fits_without_a_step_over_all_of_it() -> None:
    """On a CPU (an OOM kills): when the conservative bound (a line through the origin and a verified
    peak) already covers the cap, no trial runs at the cap; one step at 8x the start times a second size."""
    meter = FakeMemoryMeter(1000, 10, 10**9, budget_fraction=0.5)
    meter.oom_is_fatal = True
    result = MemoryProbe(meter, start_batch=8, upper_bound=100_000).run(noop)
    assert meter.calls == [8, 64]
    assert result.ceiling == 100_000 and result.verified_bytes == meter.bytes_at(64)
    assert result.predicted_bytes >= meter.bytes_at(100_000), "the bound is conservative"
    # Where the bound does not cover the cap, the probe steps towards it as before.
    tight = FakeMemoryMeter(1000, 10, 2_000_000, budget_fraction=0.5)
    tight.oom_is_fatal = True
    capped = MemoryProbe(tight, start_batch=8, upper_bound=100_000).run(noop)
    assert max(tight.calls) > 64 and capped.ceiling < 100_000
