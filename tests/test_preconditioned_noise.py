"""The noise scale of an adaptive optimizer's step: gradients divided by its preconditioner √v̂ + ε.

The reference is independent of the code under test: per-example gradients from ``torch.func``
(float64), the preconditioner computed here from the optimizer's state by Adam's own formula, and
McCandlish et al.'s two-batch estimators written out.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_batch import DynamicBatchSize
from lightning_batch.plugin.noise import NoiseMeter
from lightning_batch.plugin.preconditioner import Preconditioner, resolve_noise_gradients
from tests.conftest import measured_step


class SequenceNet(nn.Module):
    """Every exact rule: an embedding, a convolution, a linear layer on sequences, a layer norm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.norm(torch.tanh(self.proj(h))).mean(dim=1)
        return self.head(h)


class ScaledNet(SequenceNet):
    """A parameter no per-example rule covers (an elementwise scale): measured by micro-batches."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.scale


def _batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (rows, 5), generator=g), torch.randint(0, 3, (rows,), generator=g)


def _trained(net: nn.Module, optimizer_cls, **kwargs) -> torch.optim.Optimizer:
    """A few steps, so the optimizer has a second moment for every parameter."""
    optimizer = optimizer_cls(net.parameters(), lr=0.01, **kwargs)
    for seed in range(3):
        ids, y = _batch(16, 100 + seed)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(ids), y).backward()
        optimizer.step()
    return optimizer


def _adam_inverse_square_preconditioner(
    net: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """1 / (√(v / (1 - β₂ᵗ)) + ε)², from the state as Adam's step reads it."""
    group = optimizer.param_groups[0]
    out = {}
    for name, p in net.named_parameters():
        state = optimizer.state[p]
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
        out[name] = (v_hat.sqrt() + group["eps"]) ** -2
    return out


def _two_batch(small_sqr: float, big_sqr: float, small: int, big: int) -> tuple[float, float]:
    """McCandlish et al.'s unbiased |G|² and tr(Σ) from the mean squared norms at two batch sizes."""
    grad_sqr = (big * big_sqr - small * small_sqr) / (big - small)
    trace = (small_sqr - big_sqr) / (1 / small - 1 / big)
    return grad_sqr, trace


def _per_example_reference(net, names, ids, y, weights) -> tuple[float, float]:
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss_of_one(p, ids_i, y_i):
        return nn.functional.cross_entropy(functional_call(net, p, (ids_i[None],)), y_i[None])

    per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, ids, y)
    squares = sum((per_example[n].pow(2) * weights[n]).flatten(1).sum(1) for n in names)
    mean = {n: per_example[n].mean(0) for n in names}
    big = sum(float((mean[n].pow(2) * weights[n]).sum()) for n in names)
    return _two_batch(float(squares.mean()), big, 1, len(ids))


@pytest.mark.parametrize("amsgrad", [False, True])
def test_preconditioned_per_example_estimate_matches_its_float64_reference(amsgrad: bool):
    torch.manual_seed(0)
    net = SequenceNet().double()
    adam = _trained(net, torch.optim.AdamW, amsgrad=amsgrad)
    params = dict(net.named_parameters())
    ids, y = _batch(24, 7)
    meter = NoiseMeter(params, module=net, preconditioner=Preconditioner(params, [adam]).weights)
    got = measured_step(net, meter, ids, y)
    assert meter.measured_fraction == 1.0, meter.reasons

    weights = _adam_inverse_square_preconditioner(net, adam)
    if amsgrad:  # the running maximum of v is what AMSGrad divides by
        group = adam.param_groups[0]
        for name, p in params.items():
            state = adam.state[p]
            v_hat = state["max_exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
            weights[name] = (v_hat.sqrt() + group["eps"]) ** -2
    want = _per_example_reference(net, list(params), ids, y, weights)
    assert got == pytest.approx(want, rel=1e-9)

    # The weights matter: the raw estimate is a different number.
    raw = measured_step(net, NoiseMeter(params, module=net), ids, y)
    assert raw[1] / raw[0] != pytest.approx(got[1] / got[0], rel=0.05)


def test_preconditioned_micro_batch_estimate_of_uncovered_parameters_matches_its_reference():
    """Exact parameters per example, the elementwise scale from micro-batches: both preconditioned."""
    torch.manual_seed(1)
    net = ScaledNet().double()
    adam = _trained(net, torch.optim.Adam)
    params = dict(net.named_parameters())
    ids, y = _batch(24, 8)

    def batch_loss(batch):
        return nn.functional.cross_entropy(net(batch[0]), batch[1])

    meter = NoiseMeter(
        params,
        module=net,
        batch_loss=batch_loss,
        fallback_microbatches=4,
        preconditioner=Preconditioner(params, [adam]).weights,
    )
    got = measured_step(net, meter, ids, y)
    assert meter.inexact == ("scale",)

    weights = _adam_inverse_square_preconditioner(net, adam)
    exact = _per_example_reference(net, [n for n in params if n != "scale"], ids, y, weights)
    parts = [
        torch.autograd.grad(nn.functional.cross_entropy(net(ids[j : j + 6]), y[j : j + 6]), net.scale)[0]
        for j in range(0, 24, 6)
    ]
    small = sum(float((g.pow(2) * weights["scale"]).sum()) for g in parts) / 4
    big = float(((sum(parts) / 4).pow(2) * weights["scale"]).sum())
    fallback = _two_batch(small, big, 6, 24)
    assert got == pytest.approx((exact[0] + fallback[0], exact[1] + fallback[1]), rel=1e-9)


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs", "denominator"),
    [
        (torch.optim.RMSprop, {}, lambda s, g: s["square_avg"].sqrt() + g["eps"]),
        (
            torch.optim.RMSprop,
            {"centered": True},
            lambda s, g: (s["square_avg"] - s["grad_avg"] ** 2).sqrt() + g["eps"],
        ),
        (torch.optim.Adagrad, {}, lambda s, g: s["sum"].sqrt() + g["eps"]),
        (torch.optim.Adamax, {}, lambda s, g: s["exp_inf"]),
        (
            torch.optim.NAdam,
            {},
            lambda s, g: (s["exp_avg_sq"] / (1 - g["betas"][1] ** float(s["step"]))).sqrt() + g["eps"],
        ),
    ],
)
def test_each_adaptive_optimizer_is_divided_by_what_its_step_divides_by(optimizer_cls, kwargs, denominator):
    torch.manual_seed(2)
    net = nn.Linear(4, 2).double()
    optimizer = _trained_linear(net, optimizer_cls, **kwargs)
    got = Preconditioner(dict(net.named_parameters()), [optimizer]).weights()
    for name, p in net.named_parameters():
        want = denominator(optimizer.state[p], optimizer.param_groups[0]) ** -2
        torch.testing.assert_close(got[name], want)


def _trained_linear(net: nn.Module, optimizer_cls, **kwargs) -> torch.optim.Optimizer:
    optimizer = optimizer_cls(net.parameters(), lr=0.01, **kwargs)
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(8, 4, dtype=torch.float64)).pow(2).mean().backward()
        optimizer.step()
    return optimizer


def test_sgd_and_unknown_optimizers_measure_raw_gradients():
    net = nn.Linear(3, 1)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    assert resolve_noise_gradients("auto", [sgd]) == ("raw", [])
    assert Preconditioner(dict(net.named_parameters()), [sgd]).weights() == {}
    adadelta = torch.optim.Adadelta(net.parameters())
    assert resolve_noise_gradients("auto", [adadelta]) == ("raw", [])
    assert resolve_noise_gradients("preconditioned", [adadelta]) == ("preconditioned", ["Adadelta"])
    assert resolve_noise_gradients("raw", [torch.optim.AdamW(net.parameters())]) == ("raw", [])


class Params(Logger):
    name, version = "params", 0

    def __init__(self) -> None:
        super().__init__()
        self.params: dict = {}

    def log_hyperparams(self, params, *args, **kwargs):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        pass


class AdamWClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = SequenceNet()

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


@pytest.mark.parametrize(("choice", "logged"), [("auto", "preconditioned"), ("raw", "raw")])
def test_a_fit_logs_which_noise_scale_itmeasured_step(choice: str, logged: str):
    ids, _ = _batch(512, 3)
    y = ids[:, 0] % 3  # learnable: the mean gradient stands out of the noise
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, y), batch_size=16)
    resize = DynamicBatchSize(policy="noise", noise_gradients=choice, probe_memory=False, measure_every=2)
    logger = Params()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        callbacks=[resize],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(AdamWClassifier(), loader)
    assert logger.params["gns_gradients"] == logged
    assert resize.ema.num_updates >= 4 and resize.ema.gns is not None
