"""Tests for lightning_batch.plugin.noise (gradient noise scale).

References are computed independently of the code under test: per-sample gradients from
``torch.func.vmap(grad(...))`` or a plain Python loop of ``torch.autograd.grad`` over single examples,
reduced with the textbook sample-covariance formulas (not with ``unbiased_grad_stats``).
"""

from __future__ import annotations

import doctest
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import lightning_batch.plugin.noise as noise_module
from lightning_batch.plugin.noise import (
    GradNoiseStats,
    NoiseMeter,
    NoiseScaleEMA,
    microbatch_grad_stats,
    noise_scale,
    unbiased_grad_stats,
)
from lightning_batch.plugin.options import BatchSizeOptions
from tests.references import per_sample_grad_stats

DTYPE = torch.float64


# --------------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------------


def func_per_sample_grads(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per-example gradients of the per-example losses via torch.func (each example as a batch of one)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def loop_per_sample_grads(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Same as above with a Python loop of autograd.grad: independent of torch.func."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        rows.append(torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params))
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}


def flat(per_sample: dict[str, Tensor], names) -> Tensor:
    return torch.cat([per_sample[k].flatten(1) for k in names], dim=1)  # (B, P)


def reference_stats(samples: Tensor, small_batch: int = 1) -> dict[str, float]:
    """Stats from explicit small gradients ``samples`` (n, P) via the sample covariance.

    tr(Sigma) = b * trace of the unbiased sample covariance of the small gradients (each has covariance
    Sigma / b); |G|^2 = |mean|^2 - tr(Cov(mean)) = |mean|^2 - tr(Sigma) / (n b).
    """
    n = samples.shape[0]
    mean = samples.mean(0)
    trace_sigma = small_batch * (samples - mean).pow(2).sum() / (n - 1)
    grad_sqr = mean.pow(2).sum() - trace_sigma / (n * small_batch)
    return {
        "S": float(samples.pow(2).sum(1).mean()),
        "T": float(mean.pow(2).sum()),
        "grad_sqr": float(grad_sqr),
        "trace_sigma": float(trace_sigma),
    }


def assert_stats_close(stats: GradNoiseStats, ref: dict[str, float], rel: float = 1e-4) -> None:
    assert stats.small_sqr_norm == pytest.approx(ref["S"], rel=rel)
    assert stats.big_sqr_norm == pytest.approx(ref["T"], rel=rel)
    assert stats.grad_sqr == pytest.approx(ref["grad_sqr"], rel=rel)
    assert stats.trace_sigma == pytest.approx(ref["trace_sigma"], rel=rel)


def mlp(inplace_relu: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(inplace=inplace_relu), nn.Linear(16, 3)).to(DTYPE)


def ce_loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


# --------------------------------------------------------------------------------------------------
# unbiased_grad_stats
# --------------------------------------------------------------------------------------------------


def test_unbiased_grad_stats_hand_example() -> None:
    # per-example gradients 1 and 3 (1-D): mean 2, sample variance 2, |G|^2 estimate = 4 - 2/2 = 3
    assert unbiased_grad_stats(5.0, 4.0, n=2, small_batch=1) == pytest.approx((3.0, 2.0))


@settings(max_examples=200, deadline=None)
@given(
    s=st.floats(0, 1e6),
    t=st.floats(0, 1e6),
    n=st.integers(2, 4096),
    b=st.integers(1, 512),
)
def test_unbiased_grad_stats_equals_mccandlish_formula(s: float, t: float, n: int, b: int) -> None:
    grad_sqr, trace_sigma = unbiased_grad_stats(s, t, n=n, small_batch=b)
    b_small, b_big = b, n * b  # appendix A.1: |G_small|^2 -> S, |G_big|^2 -> T
    expected_g = (b_big * t - b_small * s) / (b_big - b_small)
    expected_tr = (s - t) / (1 / b_small - 1 / b_big)
    assert grad_sqr == pytest.approx(expected_g, rel=1e-9, abs=1e-6)
    assert trace_sigma == pytest.approx(expected_tr, rel=1e-9, abs=1e-6 * n * b)


@settings(max_examples=200, deadline=None)
@given(
    g=st.floats(0, 1e3),
    tr=st.floats(0, 1e3),
    n=st.integers(2, 1000),
    b=st.integers(1, 100),
)
def test_unbiased_grad_stats_inverts_expectations(g: float, tr: float, n: int, b: int) -> None:
    # Plugging in the exact expectations E[S], E[T] must give back |G|^2 and tr(Sigma).
    got = unbiased_grad_stats(g + tr / b, g + tr / (n * b), n=n, small_batch=b)
    assert got == pytest.approx((g, tr), rel=1e-7, abs=1e-6)


def test_unbiased_grad_stats_is_unbiased_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(1234)
    d, n, b, trials = 3, 4, 3, 20000
    true_g = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE)
    a = torch.tensor([[2.0, 0.0, 0.0], [0.5, 1.0, 0.0], [-1.0, 0.3, 3.0]], dtype=DTYPE)
    sigma = a @ a.T  # correlated covariance
    true_grad_sqr, true_trace = float(true_g @ true_g), float(sigma.trace())

    examples = true_g + torch.randn(trials, n, b, d, generator=gen, dtype=DTYPE) @ a.T
    small = examples.mean(2)  # (trials, n, d): each small gradient is a mean of b examples
    s = small.pow(2).sum(-1).mean(-1)
    t = small.mean(1).pow(2).sum(-1)
    est = torch.tensor(
        [unbiased_grad_stats(float(si), float(ti), n=n, small_batch=b) for si, ti in zip(s, t, strict=True)]
    )
    mean, se = est.mean(0), est.std(0) / math.sqrt(trials)
    assert abs(float(mean[0]) - true_grad_sqr) < 4 * float(se[0])
    assert abs(float(mean[1]) - true_trace) < 4 * float(se[1])
    # Sensitivity: the naive |G_small|^2 and |G_big|^2 are biased far beyond this tolerance.
    assert abs(float(s.mean()) - true_grad_sqr) > 20 * float(se[0])
    assert abs(float(t.mean()) - true_grad_sqr) > 4 * float(se[0])


@pytest.mark.parametrize(
    ("n", "b", "match"),
    [
        (1, 1, "n "),
        (0, 4, "n "),
        (2.5, 1, "n "),
        (True, 1, "n "),
        (4, 0, "small_batch"),
        (4, 1.5, "small_batch"),
    ],
)
def test_unbiased_grad_stats_validation(n, b, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        unbiased_grad_stats(1.0, 1.0, n=n, small_batch=b)


def test_noise_scale_helper() -> None:
    assert noise_scale(2.0, 8.0) == 4.0
    assert noise_scale(0.0, 8.0) is None
    assert noise_scale(-1.0, 8.0) is None
    assert noise_scale(float("nan"), 8.0) is None
    assert noise_scale(1.0, -3.0) == 0.0


# --------------------------------------------------------------------------------------------------
# Micro-batch statistics on a CNN
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False])
def test_microbatch_gradients_vectorized_or_looped_equal_the_means_of_exact_per_example_ones(
    vectorize: bool,
) -> None:
    torch.manual_seed(5)
    model = SmallCNN().to(DTYPE)
    x, y = torch.randn(12, 1, 6, 6, dtype=DTYPE), torch.randint(0, 2, (12,))
    names = [k for k, _ in model.named_parameters()]
    per_example = flat(loop_per_sample_grads(model, ce_loss, x, y), names)  # (12, P)
    micro = per_example.view(4, 3, -1).mean(dim=1)  # 4 contiguous micro-batches of 3
    stats = microbatch_grad_stats(model, ce_loss, x, y, num_microbatches=4, vectorize=vectorize)
    assert (stats.n, stats.small_batch) == (4, 3)
    assert_stats_close(stats, reference_stats(micro, small_batch=3))


def test_a_model_with_buffers_takes_the_loop_and_gets_them_back() -> None:
    """BatchNorm updates its running statistics in place, which vmap refuses: the default loops."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DTYPE)
    x, y = torch.randn(8, 3, dtype=DTYPE), torch.randn(8, 1, dtype=DTYPE)
    default = microbatch_grad_stats(model, nn.functional.mse_loss, x, y, num_microbatches=2)
    looped = microbatch_grad_stats(model, nn.functional.mse_loss, x, y, num_microbatches=2, vectorize=False)
    assert default == looped


# --------------------------------------------------------------------------------------------------
# Closed form: linear regression
# --------------------------------------------------------------------------------------------------
# Model: x ~ N(0, I_d), y = w*.x + eps, eps ~ N(0, s^2); per-example loss 1/2 (theta.x - y)^2, theta = w* + delta.
# Per-example gradient g = (x.delta - eps) x, so G = E[g] = E[x x^T] delta = delta.
# E|g|^2 = E[(x.delta - eps)^2 |x|^2] = E[(x.delta)^2 |x|^2] + s^2 E|x|^2   (cross term: E[eps] = 0)
# Rotate so delta = |delta| e_1: E[(x.delta)^2 |x|^2] = |delta|^2 (E[x_1^4] + (d-1) E[x_1^2] E[x_k^2])
#                                                     = |delta|^2 (3 + d - 1) = (d+2) |delta|^2.
# So tr(Sigma) = E|g|^2 - |G|^2 = (d+1)|delta|^2 + d s^2 and B_noise = tr(Sigma) / |delta|^2.

D, SIGMA = 8, 1.0


def regression_problem():
    gen = torch.Generator().manual_seed(2024)
    w_star = torch.randn(D, generator=gen, dtype=DTYPE)
    delta = torch.randn(D, generator=gen, dtype=DTYPE)
    delta = delta / delta.norm()  # |delta|^2 = 1
    model = nn.Linear(D, 1, bias=False).to(DTYPE)
    with torch.no_grad():
        model.weight.copy_((w_star + delta).unsqueeze(0))

    def batch(size: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(size, D, generator=gen, dtype=DTYPE)
        return x, x @ w_star + SIGMA * torch.randn(size, generator=gen, dtype=DTYPE)

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (out.squeeze(1) - y).pow(2).mean()

    true_trace = (D + 1) * 1.0 + D * SIGMA**2
    return model, batch, loss_fn, 1.0, true_trace


def test_closed_form_linear_regression_microbatches() -> None:
    model, batch, loss_fn, true_grad_sqr, true_trace = regression_problem()
    ema = NoiseScaleEMA(decay=0.995)
    for _ in range(600):
        x, y = batch(128)
        stats = microbatch_grad_stats(model, loss_fn, x, y, num_microbatches=8)
        ema.update(stats.grad_sqr, stats.trace_sigma)
    assert ema.gns == pytest.approx(true_trace / true_grad_sqr, rel=0.1)
    assert ema.grad_var == pytest.approx(true_trace, rel=0.1)


# --------------------------------------------------------------------------------------------------
# NoiseScaleEMA
# --------------------------------------------------------------------------------------------------


def test_ema_is_ratio_of_bias_corrected_averages() -> None:
    ema = NoiseScaleEMA(decay=0.5)
    assert (ema.grad_sqr, ema.grad_var, ema.gns) == (None, None, None)
    ema.update(1.0, 1.0)
    assert (ema.grad_sqr, ema.grad_var, ema.gns) == (1.0, 1.0, 1.0)  # bias-corrected first value
    ema.update(3.0, 1.0)
    # EMAs: grad_sqr 0.5 -> 1.75, trace 0.5 -> 0.75; correction 1 - 0.25 = 0.75
    assert ema.grad_sqr == pytest.approx(7 / 3)
    assert ema.grad_var == pytest.approx(1.0)
    assert ema.gns == pytest.approx(3 / 7)
    average_of_ratios = (0.5 * 0.5 * 1.0 + 0.5 * (1 / 3)) / 0.75  # = 5/9, what a naive EMA would give
    assert abs(ema.gns - average_of_ratios) > 0.1


def test_ema_constant_input_and_nonpositive_grad_sqr() -> None:
    ema = NoiseScaleEMA(decay=0.9)
    for _ in range(5):
        ema.update(2.0, 10.0)
        assert ema.grad_sqr == pytest.approx(2.0) and ema.gns == pytest.approx(5.0)
    ema = NoiseScaleEMA(decay=0.9)
    ema.update(-1.0, 10.0)
    assert ema.grad_sqr == pytest.approx(-1.0) and ema.gns is None
    ema.update(0.5, 10.0)  # EMA of grad_sqr still negative
    assert ema.gns is None
    ema.update(5.0, -20.0)  # positive |G|^2, negative trace average -> clamped
    assert ema.grad_sqr > 0 and ema.grad_var < 0 and ema.gns == 0.0


def test_ema_state_dict_round_trip() -> None:
    ema = NoiseScaleEMA(decay=0.8)
    for g, tr in [(1.0, 4.0), (0.5, 6.0), (2.0, 3.0)]:
        ema.update(g, tr)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    restored = NoiseScaleEMA(decay=0.3)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.state_dict() == ema.state_dict()
    ema.update(1.5, 2.5)
    restored.update(1.5, 2.5)
    assert (restored.grad_sqr, restored.grad_var, restored.gns, restored.num_updates) == (
        ema.grad_sqr,
        ema.grad_var,
        ema.gns,
        4,
    )
    with pytest.raises(KeyError):
        restored.load_state_dict({"decay": 0.5})


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, float("nan")])
def test_ema_validation(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        NoiseScaleEMA(decay=decay)


def test_ema_rejects_non_finite() -> None:
    ema = NoiseScaleEMA()
    with pytest.raises(ValueError, match="non-finite"):
        ema.update(float("nan"), 1.0)
    assert ema.num_updates == 0


def test_docstring_examples() -> None:
    result = doctest.testmod(noise_module)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------------
# Gaps found by `make mutate`
# --------------------------------------------------------------------------------------------------


def test_ema_reset_forgets_everything() -> None:
    ema = NoiseScaleEMA(decay=0.9)
    ema.update(5.0, 50.0)
    ema.update(1.0, 30.0)
    ema.reset()
    assert (ema.num_updates, ema.grad_sqr, ema.grad_var, ema.gns) == (0, None, None, None)
    ema.update(2.0, 6.0)  # bias correction: a first value after reset is returned as is
    assert (ema.num_updates, ema.grad_sqr, ema.grad_var, ema.gns) == (
        1,
        pytest.approx(2.0),
        pytest.approx(6.0),
        pytest.approx(3.0),
    )


def test_ema_state_of_a_fresh_average_loads() -> None:
    restored = NoiseScaleEMA(decay=0.5)
    restored.update(1.0, 1.0)
    restored.load_state_dict(NoiseScaleEMA(decay=0.9).state_dict())
    assert (restored.decay, restored.num_updates, restored.gns) == (0.9, 0, None)


def test_vectorized_microbatches_draw_a_dropout_mask_each() -> None:
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3)).to(DTYPE).train()
    x, y = torch.randn(8, 5, dtype=DTYPE), torch.randint(0, 3, (8,))
    stats = microbatch_grad_stats(model, ce_loss, x, y, num_microbatches=4, vectorize=True)
    assert (stats.n, stats.small_batch) == (4, 2) and math.isfinite(stats.grad_sqr)


@pytest.mark.parametrize("vectorize", [True, False])
def test_microbatch_stats_keep_float64_precision(vectorize: bool) -> None:
    torch.manual_seed(21)
    model = mlp()
    x, y = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    names = [k for k, _ in model.named_parameters()]
    ref = reference_stats(flat(loop_per_sample_grads(model, ce_loss, x, y), names))
    got = microbatch_grad_stats(model, ce_loss, x, y, num_microbatches=6, vectorize=vectorize)
    assert_stats_close(got, ref, rel=1e-10)


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(5, 5)  # registered first, never called
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def test_looped_microbatches_skip_unused_parameters_and_take_a_subset() -> None:
    torch.manual_seed(22)
    model = WithUnused().to(DTYPE)
    x, y = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    ref = reference_stats(flat(loop_per_sample_grads(model.fc, ce_loss, x, y), ["weight", "bias"]))
    got = microbatch_grad_stats(model, ce_loss, x, y, num_microbatches=6, vectorize=False)
    assert_stats_close(got, ref, rel=1e-10)  # the unused layer's gradient is exactly zero
    only_bias = microbatch_grad_stats(model, ce_loss, x, y, 6, param_names=["fc.bias"], vectorize=False)
    ref_bias = reference_stats(flat(loop_per_sample_grads(model.fc, ce_loss, x, y), ["bias"]))
    assert_stats_close(only_bias, ref_bias, rel=1e-10)


def test_microbatches_leave_buffers_updated_when_asked() -> None:
    torch.manual_seed(23)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(DTYPE)
    x, y = torch.randn(8, 5, dtype=DTYPE), torch.randint(0, 3, (8,))
    before = model[1].running_mean.clone()
    microbatch_grad_stats(model, ce_loss, x, y, num_microbatches=2, restore_buffers=False)
    assert not torch.equal(model[1].running_mean, before)


def test_ema_with_zero_decay_keeps_only_the_last_measurement() -> None:
    ema = NoiseScaleEMA(decay=0.0)
    ema.update(1.0, 10.0)
    ema.update(4.0, 8.0)
    assert (ema.grad_sqr, ema.grad_var, ema.gns) == (4.0, 8.0, 2.0)


class KeywordInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(5, 5).requires_grad_(False)  # first: its output needs no grad
        self.fc = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4)  # after a Linear in module order
        self.head = nn.Linear(4, 3)
        self.head.weight.requires_grad_(False)  # only the head's bias is trained

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.fc(input=self.frozen(x))))


# --------------------------------------------------------------------------------------------------
# The test reference itself (tests/references.py: per-example gradients by torch.func) and the
# micro-batch statistics against it
# --------------------------------------------------------------------------------------------------


def test_per_sample_and_microbatch_stats_on_cnn() -> None:
    torch.manual_seed(10)
    model = SmallCNN().to(DTYPE)
    x, y = torch.randn(12, 1, 6, 6, dtype=DTYPE), torch.randint(0, 2, (12,))
    names = [k for k, _ in model.named_parameters()]
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel, strict=True):
        p.grad = s.clone()

    samples = flat(loop_per_sample_grads(model, ce_loss, x, y), names)  # independent reference
    ref = reference_stats(samples)
    assert_stats_close(per_sample_grad_stats(model, ce_loss, x, y), ref)
    assert_stats_close(per_sample_grad_stats(model, ce_loss, x, y, chunk_size=5), ref)
    assert_stats_close(microbatch_grad_stats(model, ce_loss, x, y, num_microbatches=12), ref)

    groups = samples.view(4, 3, -1).mean(1)  # 4 micro-batches of 3 examples (contiguous split)
    mb = microbatch_grad_stats(model, ce_loss, x, y, num_microbatches=4)
    assert (mb.n, mb.small_batch) == (4, 3)
    assert_stats_close(mb, reference_stats(groups, small_batch=3))

    # Restricting to a subset of parameters.
    conv_only = per_sample_grad_stats(model, ce_loss, x, y, param_names=["conv.weight", "conv.bias"])
    assert_stats_close(
        conv_only,
        reference_stats(flat(loop_per_sample_grads(model, ce_loss, x, y), ["conv.weight", "conv.bias"])),
    )

    for p, s in zip(model.parameters(), sentinel, strict=True):
        assert torch.equal(p.grad, s)  # .grad untouched by both fall-backs


def test_microbatch_restores_buffers_and_validates() -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DTYPE)
    x, y = torch.randn(8, 3, dtype=DTYPE), torch.randn(8, 1, dtype=DTYPE)
    before = {k: v.clone() for k, v in model.named_buffers()}
    microbatch_grad_stats(model, nn.functional.mse_loss, x, y, num_microbatches=2)
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="divisible"):
        microbatch_grad_stats(model, nn.functional.mse_loss, x, y, num_microbatches=3)
    with pytest.raises(ValueError, match="num_microbatches"):
        microbatch_grad_stats(model, nn.functional.mse_loss, x, y, num_microbatches=1)
    with pytest.raises(ValueError, match="unknown"):
        per_sample_grad_stats(model, nn.functional.mse_loss, x, y, param_names=["nope"])


@pytest.mark.parametrize(("batch", "chunk_size"), [(2, None), (2, 1), (7, 1), (7, 3), (7, None)])
def test_per_sample_stats_keep_float64_precision(batch: int, chunk_size: int | None) -> None:
    """Down to B=2 and chunks of 1, and accumulated in the parameters' float64 (not float32)."""
    torch.manual_seed(14)
    model = mlp()
    x, y = torch.randn(batch, 5, dtype=DTYPE), torch.randint(0, 3, (batch,))
    names = [k for k, _ in model.named_parameters()]
    ref = reference_stats(flat(loop_per_sample_grads(model, ce_loss, x, y), names))
    assert_stats_close(per_sample_grad_stats(model, ce_loss, x, y, chunk_size=chunk_size), ref, rel=1e-10)


def test_per_sample_stats_edge_arguments() -> None:
    torch.manual_seed(15)
    model = mlp()
    x, y = torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grad_stats(model, ce_loss, x, y, chunk_size=0)
    nothing = per_sample_grad_stats(model, ce_loss, x, y, param_names=[])
    assert (nothing.small_sqr_norm, nothing.big_sqr_norm, nothing.n) == (0.0, 0.0, 4)


def test_per_sample_stats_with_dropout_draw_a_mask_per_example() -> None:
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3)).to(DTYPE).train()
    x, y = torch.randn(8, 5, dtype=DTYPE), torch.randint(0, 3, (8,))
    stats = per_sample_grad_stats(model, ce_loss, x, y)  # default randomness="different"
    assert stats.n == 8 and math.isfinite(stats.grad_sqr) and stats.small_sqr_norm > 0
    with pytest.raises(RuntimeError):
        per_sample_grad_stats(model, ce_loss, x, y, randomness="error")


# --------------------------------------------------------------------------------------------------
# NoiseMeter: one step's measurement, against per-example gradients from torch.func
# --------------------------------------------------------------------------------------------------


def _reference_stats(
    model: nn.Module, x: Tensor, y: Tensor, names: list[str], loss_fn=None
) -> tuple[float, float]:
    """Unbiased (|G|², tr Σ) of the named parameters from exact per-example gradients: tr Σ is the
    Bessel-corrected variance summed over coordinates, |G|² the squared mean minus tr Σ / B."""
    loss_fn = loss_fn or nn.functional.mse_loss
    flat_grads = flat(func_per_sample_grads(model, loss_fn, x, y), names).double()
    trace = float(flat_grads.var(dim=0, unbiased=True).sum())
    return float(flat_grads.mean(dim=0).pow(2).sum()) - trace / len(x), trace


class _Scaled(nn.Module):
    """Two Linear layers and a parameter no rule covers (an output scale, multiplied in)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
        self.scale = nn.Parameter(torch.tensor([1.5]))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.scale


def _microbatch_reference(
    model: nn.Module, param: nn.Parameter, x: Tensor, y: Tensor, *, parts: int, usable: int
) -> tuple[float, float]:
    """Unbiased (|G|², tr Σ) of ``param`` from ``parts`` equal micro-batches of the first ``usable``
    rows, by plain autograd: the micro-batch gradients' squared mean, and their Bessel-corrected
    spread times the rows in a micro-batch (a mean of m rows has 1/m of the per-row variance)."""
    size = usable // parts
    grads = torch.stack(
        [
            torch.autograd.grad(nn.functional.mse_loss(model(xs), ys), param)[0].double().reshape(-1)
            for xs, ys in zip(x[:usable].split(size), y[:usable].split(size), strict=True)
        ]
    )
    trace = float(grads.var(dim=0, unbiased=True).sum()) * size
    return float(grads.mean(dim=0).pow(2).sum()) - trace / usable, trace


def _meter(model: nn.Module, **kwargs) -> NoiseMeter:
    return NoiseMeter(dict(model.named_parameters()), module=model, **kwargs)


def _step(meter, model, x, y, *, measure=True, fallback=True, loss_fn=None) -> tuple[float, float] | None:
    """One training step as the callback drives the meter."""
    loss_fn = loss_fn or nn.functional.mse_loss
    meter.begin_step(measure, (x, y), fallback=fallback)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    meter.before_backward()
    loss.backward()
    meter.after_backward()
    meter.before_optimizer_step()
    estimate = meter.estimate(global_rows=len(x))
    meter.end_step()
    return estimate


def _mse_of_batch(model: nn.Module):
    return lambda batch: nn.functional.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("batch", [2, 3, 32])
@pytest.mark.parametrize("inplace_relu", [False, True])
def test_noise_meter_matches_torch_func_with_cross_entropy(batch: int, inplace_relu: bool) -> None:
    torch.manual_seed(0)
    model = mlp(inplace_relu)
    x, y = torch.randn(batch, 5, dtype=DTYPE), torch.randint(0, 3, (batch,))
    meter = _meter(model)
    names = [k for k, _ in model.named_parameters()]
    estimate = _step(meter, model, x, y, loss_fn=ce_loss)
    assert estimate == pytest.approx(_reference_stats(model, x, y, names, ce_loss), rel=1e-8)
    assert meter.measured_fraction == 1.0 and meter.inexact == ()


@pytest.mark.parametrize("grad_from_params", [True, False])
def test_noise_meter_measures_every_parameter_exactly_and_leaves_grad_alone(grad_from_params: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 1)).double()
    x, y = torch.randn(24, 5, dtype=DTYPE), torch.randn(24, 1, dtype=DTYPE)
    meter = _meter(model, grad_from_params=grad_from_params)
    estimate = _step(meter, model, x, y)
    names = [n for n, _ in model.named_parameters()]
    assert estimate == pytest.approx(_reference_stats(model, x, y, names), rel=1e-9)
    assert meter.last_estimate == estimate and meter.measuring
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()  # the same step unwatched: the same .grad
    for got, want in zip(plain, model.parameters(), strict=True):
        assert torch.equal(got, want.grad)
    assert _step(meter, model, x, y, measure=False) is None and not meter.measuring
    assert meter.last_estimate is None
    meter.remove()
    assert torch._C._len_torch_function_stack() == 0


def test_a_sum_loss_gives_the_noise_scale_of_the_mean_loss() -> None:
    """Summing the loss over rows scales every gradient by B: |G|² and tr Σ by B², their ratio not."""
    torch.manual_seed(1)
    model = mlp()
    x, y = torch.randn(16, 5, dtype=DTYPE), torch.randint(0, 3, (16,))
    mean = _step(_meter(model), model, x, y, loss_fn=ce_loss)
    total = _step(
        _meter(model),
        model,
        x,
        y,
        loss_fn=lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum"),
    )
    assert mean is not None and total is not None
    assert total[0] == pytest.approx(16**2 * mean[0], rel=1e-9)
    assert total[1] / total[0] == pytest.approx(mean[1] / mean[0], rel=1e-9)


def test_closed_form_linear_regression_measured_by_the_meter() -> None:
    model, batch, loss_fn, true_grad_sqr, true_trace = regression_problem()
    ema = NoiseScaleEMA(decay=0.995)
    meter = _meter(model)
    for _ in range(600):
        x, y = batch(128)
        estimate = _step(meter, model, x, y, loss_fn=loss_fn)
        assert estimate is not None
        ema.update(*estimate)
    assert ema.grad_sqr == pytest.approx(true_grad_sqr, rel=0.1)
    assert ema.grad_var == pytest.approx(true_trace, rel=0.1)
    assert ema.gns == pytest.approx(true_trace / true_grad_sqr, rel=0.1)


def test_noise_meter_adds_the_micro_batch_part_on_fallback_steps_only() -> None:
    torch.manual_seed(1)
    model = _Scaled().double()
    x, y = torch.randn(32, 5, dtype=DTYPE), torch.randn(32, 1, dtype=DTYPE)
    meter = _meter(model, batch_loss=_mse_of_batch(model), fallback_microbatches=4)
    linear = [n for n, _ in model.named_parameters() if n != "scale"]
    linear_part = _reference_stats(model, x, y, linear)
    micro_sqr, micro_trace = _microbatch_reference(model, model.scale, x, y, parts=4, usable=32)
    expected = (linear_part[0] + micro_sqr, linear_part[1] + micro_trace)
    assert _step(meter, model, x, y) == pytest.approx(expected, rel=1e-9)
    assert meter.inexact == ("scale",) and "no per-example rule" in meter.reasons["scale"]
    assert meter.measured_fraction == pytest.approx(50 / 51)
    assert _step(meter, model, x, y, fallback=False) is None, "a partial estimate would bias the EMAs"
    assert _step(meter, model, x[:1], y[:1]) is None, "one row cannot be split into micro-batches"
    meter.remove()

    without_loss = _meter(model)  # no loss to run micro-batches: the exact part alone
    assert not without_loss.can_fall_back
    assert _step(without_loss, model, x, y) == pytest.approx(linear_part, rel=1e-9)
    without_loss.remove()


def test_the_micro_batches_slice_dict_batches_and_keep_what_is_shared() -> None:
    """Any batch form: a dict batch's per-row tensors are sliced, a tensor shared by all rows is kept."""
    torch.manual_seed(3)
    model = _Scaled().double()
    x, y = torch.randn(12, 5, dtype=DTYPE), torch.randn(12, 1, dtype=DTYPE)
    shift = torch.tensor(0.25, dtype=DTYPE)

    def batch_loss(batch: dict) -> Tensor:
        return nn.functional.mse_loss(model(batch["x"]) + batch["shift"], batch["y"])

    meter = _meter(model, batch_loss=batch_loss, fallback_microbatches=3)
    meter.begin_step(True, {"x": x, "y": y, "shift": shift})
    model.zero_grad(set_to_none=True)
    batch_loss({"x": x, "y": y, "shift": shift}).backward()
    meter.after_backward()
    meter.before_optimizer_step()
    estimate = meter.estimate(global_rows=12)
    grads = torch.stack(
        [
            torch.autograd.grad(nn.functional.mse_loss(model(xs) + shift, ys), model.scale)[0].reshape(-1)
            for xs, ys in zip(x.split(4), y.split(4), strict=True)
        ]
    )
    trace = float(grads.var(dim=0, unbiased=True).sum()) * 4
    exact = _reference_stats(model, x, y - shift, [n for n, _ in model.named_parameters() if n != "scale"])
    expected = (exact[0] + float(grads.mean(0).pow(2).sum()) - trace / 12, exact[1] + trace)
    assert estimate == pytest.approx(expected, rel=1e-9)


def test_a_fresh_noise_meter_measures_nothing_until_told() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    meter = _meter(model)
    assert meter.measuring is False and meter.last_estimate is None and meter.measured_fraction is None
    assert meter.inexact == ("0.weight", "0.bias", "1.weight", "1.bias")
    assert (
        meter.grad_from_params is True
        and meter.fallback_microbatches == BatchSizeOptions.fallback_microbatches
    )
    assert meter.estimate(global_rows=4) is None
    meter.remove()


class _OnlyScale(nn.Module):
    """No parameter any rule covers: every parameter is left to the micro-batches."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.7], dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :1] * self.scale


def test_noise_meter_on_a_network_no_rule_covers() -> None:
    torch.manual_seed(2)
    model = _OnlyScale()
    x, y = torch.randn(30, 2, dtype=DTYPE), torch.randn(30, 1, dtype=DTYPE)
    alone = _meter(model)
    assert _step(alone, model, x, y) is None, "no rule, no loss: nothing measurable"
    assert alone.exact == () and alone.measured_fraction == 0.0
    meter = _meter(model, batch_loss=_mse_of_batch(model), fallback_microbatches=2)
    # 2 micro-batches of 15 rows (30 divides evenly); with 4 parts the 2 leftover rows are left out
    for parts, usable in ((2, 30), (4, 28)):
        meter.fallback_microbatches = parts
        expected = _microbatch_reference(model, model.scale, x, y, parts=parts, usable=usable)
        assert _step(meter, model, x, y) == pytest.approx(expected, rel=1e-9), parts


def test_the_fallbacks_own_forwards_inside_a_watched_step_are_not_recorded() -> None:
    """Micro-batches run plain forwards while a step may be watched: measurements_suspended keeps them out."""
    from lightning_batch.plugin.per_example import PerExampleNorms

    torch.manual_seed(17)
    model = SmallCNN().to(DTYPE)
    x, y = torch.randn(8, 1, 6, 6, dtype=DTYPE), torch.randint(0, 2, (8,))
    norms = PerExampleNorms(dict(model.named_parameters()))
    norms.start(8)
    loss = ce_loss(model(x), y)
    microbatch_grad_stats(model, ce_loss, x, y, num_microbatches=4, vectorize=False)
    microbatch_grad_stats(model, ce_loss, x, y, num_microbatches=4, vectorize=True)
    norms.stop()
    loss.backward()
    result = norms.finish()
    names = [k for k, _ in model.named_parameters()]
    assert result is not None and sorted(result.exact) == sorted(names)
    expected = flat(loop_per_sample_grads(model, ce_loss, x, y), names).pow(2).sum(1)
    torch.testing.assert_close(result.per_example, expected, rtol=1e-9, atol=1e-12)


def test_a_thread_that_never_ran_a_fallback_measures() -> None:
    import threading

    torch.manual_seed(18)
    model = mlp()
    x, y = torch.randn(8, 5, dtype=DTYPE), torch.randint(0, 3, (8,))
    found: list[object] = []

    def measure() -> None:
        try:
            found.append(_step(_meter(model), model, x, y, loss_fn=ce_loss) is not None)
        except Exception as exc:  # reported below
            found.append(exc)

    thread = threading.Thread(target=measure)
    thread.start()
    thread.join()
    assert found == [True]


def test_the_ema_row_is_nan_until_measured_then_its_estimates() -> None:
    ema = NoiseScaleEMA(0.5)
    assert all(math.isnan(v) for v in ema.as_row().values()) and set(ema.as_row()) == {
        "gns",
        "grad_sqr",
        "grad_var",
    }
    ema.update(2.0, 10.0)
    ema.update(4.0, 30.0)
    assert ema.as_row() == {"gns": ema.gns, "grad_sqr": ema.grad_sqr, "grad_var": ema.grad_var}


# -- NoiseMeter: accumulation, ranks, batch norms, batch forms (gaps `make mutate` found) ----------------


def test_with_accumulated_grad_the_meter_reads_this_backwards_part_only():
    """grad_from_params=False (gradient accumulation): .grad already holds earlier micro-batches'; the
    estimate is this step's alone, as if .grad had started empty, and equals the reference."""
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()
    x, y = torch.randn(12, 5, dtype=DTYPE), torch.randn(12, 1, dtype=DTYPE)
    names = [n for n, _ in model.named_parameters()]
    meter = _meter(model, grad_from_params=False)
    nn.functional.mse_loss(model(x * 3), y).backward()  # an earlier micro-batch's gradient in .grad
    meter.begin_step(True, (x, y))
    loss = nn.functional.mse_loss(model(x), y)
    meter.before_backward()
    loss.backward()
    meter.after_backward()
    meter.before_optimizer_step()
    assert meter.estimate(global_rows=12) == pytest.approx(_reference_stats(model, x, y, names), rel=1e-9)


def test_the_step_gradient_counts_all_ranks_rows_and_a_one_row_step_gives_nothing():
    """grad_from_params: .grad is the all-ranks mean over ``global_rows``, the per-example norms this
    rank's: n is the global rows. With accumulation n is this step's rows. One row: no variance."""
    torch.manual_seed(22)
    model = nn.Linear(4, 1).double()
    x, y = torch.randn(6, 4, dtype=DTYPE), torch.randn(6, 1, dtype=DTYPE)
    s, t = None, None
    estimates = {}
    for from_params in (True, False):
        meter = _meter(model, grad_from_params=from_params)
        meter.begin_step(True, (x, y))
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        meter.after_backward()
        meter.before_optimizer_step()
        estimates[from_params] = meter.estimate(global_rows=12)
        result = meter._result
        s = float(result.per_example.mean())
        t = float(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert estimates[True] == pytest.approx(unbiased_grad_stats(s, t, 12, 1))
    assert estimates[False] == pytest.approx(unbiased_grad_stats(s, t, 6, 1))
    assert _step(_meter(model), model, x[:1], y[:1]) is None


def test_the_first_parameter_without_a_gradient_does_not_hide_the_others():
    torch.manual_seed(23)
    unused, model = nn.Linear(3, 3).double(), nn.Linear(4, 1).double()
    params = {"unused.weight": unused.weight, **{f"m.{n}": p for n, p in model.named_parameters()}}
    meter = NoiseMeter(params, module=model)
    x, y = torch.randn(8, 4, dtype=DTYPE), torch.randn(8, 1, dtype=DTYPE)
    estimate = _step(meter, model, x, y)
    assert estimate == pytest.approx(_reference_stats(model, x, y, ["weight", "bias"]), rel=1e-9)


class _Normalised(nn.Module):
    """A batch norm in training mode after a linear layer, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.head = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bn(self.lin(x))))


def test_parameters_before_a_batch_norm_take_micro_batches_of_four_rows_and_leave_its_statistics(monkeypatch):
    """The coupled parameters' micro-batches hold at least MIN_NORMALISED_ROWS rows (12 rows and 8
    parts asked: 3 parts of 4); the batch norm's running statistics are as an unmeasured step leaves them."""
    from lightning_batch.plugin.noise import MIN_NORMALISED_ROWS

    calls = []
    real = noise_module.looped_microbatch_stats

    def recorded(losses, params, small_batch, restore=None, weights=None):
        calls.append((len(losses), small_batch, restore))
        return real(losses, params, small_batch, restore, weights)

    monkeypatch.setattr(noise_module, "looped_microbatch_stats", recorded)
    torch.manual_seed(24)
    model = _Normalised().double()
    x, y = torch.randn(12, 3, dtype=DTYPE), torch.randn(12, 1, dtype=DTYPE)
    meter = _meter(model, batch_loss=_mse_of_batch(model), fallback_microbatches=8)
    before = {k: v.clone() for k, v in model.named_buffers()}
    assert _step(meter, model, x, y) is not None
    assert MIN_NORMALISED_ROWS == 4 and set(meter.inexact) == {"lin.weight", "lin.bias"}
    assert calls == [(3, 4, model)]
    plain = _Normalised().double()
    plain.load_state_dict({**model.state_dict(), **before})
    nn.functional.mse_loss(plain(x), y).backward()  # the same step, unmeasured
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, dict(plain.named_buffers())[name])
    free = _meter(_Scaled().double(), batch_loss=lambda batch: batch[0].sum(), fallback_microbatches=8)
    calls.clear()
    _step(free, free.module, torch.randn(12, 5, dtype=DTYPE), torch.randn(12, 1, dtype=DTYPE))
    assert [(n, b) for n, b, _ in calls] == [(8, 1)], "no batch norm: micro-batches of one row"


def test_a_transformer_layer_built_sequence_first_is_found_through_the_module():
    """As many tokens as examples: only the module tells that dimension 1 holds the examples. With it
    the estimate equals one computed from each example's own gradient; without it, it does not."""
    torch.manual_seed(25)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=False).double()
    x = torch.randn(3, 3, 8, dtype=DTYPE)  # (tokens, examples, features), 3 of each
    params = dict(layer.named_parameters())

    def measured(meter: NoiseMeter) -> tuple[float, float] | None:
        meter.begin_step(True, x.transpose(0, 1))
        layer.zero_grad()
        layer(x).pow(2).mean().backward()
        meter.after_backward()
        meter.before_optimizer_step()
        return meter.estimate(global_rows=3)

    per_example = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(layer(x[:, i : i + 1]).pow(2).mean(), list(params.values()))
                ]
            )
            for i in range(3)
        ]
    )
    expected = reference_stats(per_example)
    aware = measured(NoiseMeter(params, module=layer))
    assert aware == pytest.approx((expected["grad_sqr"], expected["trace_sigma"]), rel=1e-8)
    blind = measured(NoiseMeter(params))
    assert blind is None or blind != pytest.approx(aware, rel=1e-3)


def test_batch_rows_and_slices_of_every_form():
    from lightning_batch.plugin.noise import batch_rows, slice_batch

    assert batch_rows(torch.tensor(3.0)) is None and batch_rows(torch.zeros(5)) == 5
    assert batch_rows(7) is None and batch_rows("text") is None and batch_rows(object()) is None
    assert batch_rows([["a"], (torch.zeros(2, 3),)]) == 2
    part = slice_batch((torch.arange(6), torch.arange(12).view(6, 2), torch.tensor(1.0)), slice(2, 4), rows=6)
    assert part[0].tolist() == [2, 3] and part[1].tolist() == [[4, 5], [6, 7]] and part[2].item() == 1.0


def test_a_step_of_one_row_is_not_measured_and_reasons_start_empty():
    model = nn.Linear(2, 1)
    meter = _meter(model)
    assert meter.reasons == {}
    meter.begin_step(True, (torch.zeros(1, 2), torch.zeros(1, 1)))
    assert meter.measuring, "one row is still a step to watch (its rows add to the ranks' n)"
    meter.begin_step(True, (torch.zeros(0, 2), torch.zeros(0, 1)))
    assert not meter.measuring, "no row: nothing to measure"


def test_a_step_with_nothing_exact_records_each_parameters_reason():
    torch.manual_seed(26)
    model = _OnlyScale()
    x, y = torch.randn(6, 2, dtype=DTYPE), torch.randn(6, 1, dtype=DTYPE)
    meter = _meter(model)
    assert _step(meter, model, x, y) is None
    assert meter.reasons == {"scale": "used by mul, which has no per-example rule"}
    untouched = nn.Linear(2, 2).double()
    silent = NoiseMeter({"w": untouched.weight, **dict(model.named_parameters())}, module=model)
    _step(silent, model, x, y)
    assert silent.reasons["w"] == "not used by a function with a per-example rule"


def test_the_window_in_samples_by_hand_from_its_first_measurements():
    """half_life = max(min_half_life (0 by default), share x samples so far, 1e-12); a measurement n
    samples later keeps 0.5 ** (n / half_life) of the past. By hand for share 0.25, one sample apart."""
    ema = NoiseScaleEMA(half_life_share=0.25)
    ema.update(2.0, 10.0, samples=1)  # half-life 0.25: the past (nothing) keeps 0.0625
    ema.update(4.0, 30.0, samples=1)  # half-life 0.5: keeps 0.25
    weight = 0.25 * 0.9375 + 0.75
    assert ema.grad_sqr == pytest.approx((0.25 * 0.9375 * 2.0 + 0.75 * 4.0) / weight)
    assert ema.grad_var == pytest.approx((0.25 * 0.9375 * 10.0 + 0.75 * 30.0) / weight)


def test_a_first_measurement_zero_samples_in_keeps_the_average_defined():
    ema = NoiseScaleEMA(half_life_share=0.25)
    ema.update(2.0, 10.0, samples=0)  # the past keeps everything: the average's weight stays 0
    assert ema.grad_sqr == 0.0 and ema.grad_var == 0.0 and ema.gns is None


def test_a_state_from_before_the_window_loads_with_no_samples_seen():
    ema = NoiseScaleEMA(half_life_share=0.25)
    ema.load_state_dict({"decay": 0.9, "ema_grad_sqr": 0.0, "ema_trace_sigma": 0.0, "num_updates": 0})
    ema.update(2.0, 10.0, samples=1)
    ema.update(4.0, 30.0, samples=1)  # half-life 0.25 x (1 + 1): as from a fresh start
    fresh = NoiseScaleEMA(half_life_share=0.25)
    fresh.update(2.0, 10.0, samples=1)
    fresh.update(4.0, 30.0, samples=1)
    assert ema.grad_sqr == pytest.approx(fresh.grad_sqr)


def test_a_measured_step_without_any_gradient_and_a_second_optimizer_step():
    """A backward that reaches none of the parameters leaves nothing to read; a second optimizer step in
    one batch (manual optimization) does not measure the step again."""
    model = nn.Linear(3, 1).double()
    meter = _meter(model)
    x = torch.randn(4, 3, dtype=DTYPE)
    meter.begin_step(True, (x, x))
    model.zero_grad(set_to_none=True)
    (x.requires_grad_() * 2).sum().backward()  # not through the model
    meter.after_backward()
    meter.before_optimizer_step()
    assert meter.estimate(global_rows=4) is None
    y = torch.randn(4, 1, dtype=DTYPE)
    meter.begin_step(True, (x.detach(), y))
    nn.functional.mse_loss(model(x.detach()), y).backward()
    meter.after_backward()
    meter.before_optimizer_step()
    first = meter.estimate(global_rows=4)
    meter.before_optimizer_step()  # the same batch's second optimizer step
    assert first is not None and meter.estimate(global_rows=4) == first


def test_micro_batch_gradients_of_bfloat16_parameters_add_up_in_float32():
    from lightning_batch.plugin.noise import looped_microbatch_stats

    torch.manual_seed(27)
    model = nn.Linear(64, 1).to(torch.bfloat16)
    x, y = torch.randn(64, 64).to(torch.bfloat16), torch.randn(64, 1).to(torch.bfloat16)
    parts = [
        (
            lambda j=j: nn.functional.mse_loss(
                model(x[8 * j : 8 * j + 8]).float(), y[8 * j : 8 * j + 8].float()
            )
        )
        for j in range(8)
    ]
    grads = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(), list(model.parameters()))]).double()
            for loss in parts
        ]
    )
    stats = looped_microbatch_stats(parts, list(model.parameters()), small_batch=8)
    assert stats.small_sqr_norm == pytest.approx(float(grads.pow(2).sum(1).mean()), rel=1e-5)
    assert stats.big_sqr_norm == pytest.approx(float(grads.mean(0).pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("vectorize", [True, False])
def test_microbatch_stats_of_no_parameter_are_refused_in_one_line(vectorize: bool) -> None:
    net = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="no trainable parameter to measure"):
        microbatch_grad_stats(
            net,
            nn.functional.mse_loss,
            torch.randn(8, 3),
            torch.randn(8, 1),
            4,
            param_names=[],
            vectorize=vectorize,
        )
