"""Gradient health: the logged norms against a plain torch loop, and the vanishing-gradient warning."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from mlflow import MlflowClient
from torch import nn
from torch.nn import functional as F

from lightning_batch.config import RunConfig
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.tabular.gradient_health import GradientRatioAlarm, LayerGradNorms
from lightning_batch.training import build_module, train


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.parametrize("clip", [None, 0.35])
def test_logged_gradient_norms_match_a_plain_torch_loop(tracking_uri: str, clip: float | None):
    """Full-batch GD on an MLP, logged every step: each step's global norm, first/last layer norms,
    their ratio and (with clipping) the clipped norm and fraction equal a hand-written loop's."""
    cfg = RunConfig(
        data="iris",
        model="mlp",
        hidden=[16, 8],
        batch_size="full",
        lr=0.5,
        epochs=12,
        log_every=1,
        grad_clip=clip,
        tracking_uri=tracking_uri,
    ).validate()
    result = train(cfg)

    # The same initial weights: train() seeds and then builds the module, exactly like this.
    dm = TabularDataModule(cfg)
    dm.setup()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_module(cfg, dm).model
    x, y = dm.prepared.train.features, dm.prepared.train.targets
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    expected: dict[str, list[float]] = {k: [] for k in ("total", "first", "last", "clipped", "fraction")}
    for _ in range(cfg.epochs):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        per_layer = [torch.sqrt(m.weight.grad.pow(2).sum() + m.bias.grad.pow(2).sum()).item() for m in layers]
        total = sum(v * v for v in per_layer) ** 0.5
        scale = min(1.0, clip / (total + 1e-6)) if clip else 1.0
        with torch.no_grad():
            for p in model.parameters():
                p -= cfg.lr * scale * p.grad
        expected["total"].append(total)
        expected["first"].append(per_layer[0])
        expected["last"].append(per_layer[-1])
        expected["clipped"].append(total * scale)
        expected["fraction"].append(float(scale < 1.0))

    client = MlflowClient(tracking_uri)
    run = result.run_id
    assert _history(client, run, "grad_norm") == pytest.approx(expected["total"], rel=1e-4)
    assert _history(client, run, "grad_norm_first_layer") == pytest.approx(expected["first"], rel=1e-4)
    assert _history(client, run, "grad_norm_last_layer") == pytest.approx(expected["last"], rel=1e-4)
    ratios = [f / last for f, last in zip(expected["first"], expected["last"], strict=True)]
    assert _history(client, run, "grad_norm_ratio") == pytest.approx(ratios, rel=1e-4)
    if clip:
        assert _history(client, run, "grad_norm_mean") == pytest.approx(expected["total"], rel=1e-4)
        assert _history(client, run, "grad_norm_clipped_mean") == pytest.approx(expected["clipped"], rel=1e-4)
        assert _history(client, run, "clipped_fraction") == expected["fraction"]
        assert 0 < sum(expected["fraction"]) < cfg.epochs  # some steps clipped, some not: both paths ran
    else:
        assert client.get_metric_history(run, "clipped_fraction") == []


def test_clipping_means_over_a_window_of_steps(tracking_uri: str):
    """log_every=5: the clipped-norm figures are the window's means, the layer figures its last step's."""
    cfg = RunConfig(
        data="synthetic-regression",
        rows=2000,
        epochs=1,
        grad_clip=1e-3,
        log_every=5,
        tracking_uri=tracking_uri,
    )
    result = train(cfg)
    client = MlflowClient(tracking_uri)
    fraction = _history(client, result.run_id, "clipped_fraction")
    clipped = _history(client, result.run_id, "grad_norm_clipped_mean")
    assert fraction and all(v == 1.0 for v in fraction)
    assert clipped == pytest.approx([1e-3] * len(clipped), rel=1e-3)
    assert all(v > 1e-3 for v in _history(client, result.run_id, "grad_norm_mean"))


def test_a_deep_relu_mlp_warns_of_vanishing_gradients_and_kaiming_init_does_not(
    tracking_uri: str, caplog: pytest.LogCaptureFixture
):
    """Ten ReLU layers with PyTorch's default init starve the first layer (ratio ~1e-3): one warning
    line and a run tag; the same network with Kaiming init trains without one."""
    deep = dict(data="digits", model="mlp", hidden=[64] * 10, lr=0.1, epochs=2, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    with caplog.at_level(logging.WARNING, logger="lightning_batch"):
        starved = train(RunConfig(**deep))
    warnings = [r.getMessage() for r in caplog.records if "vanishing gradients" in r.getMessage()]
    assert len(warnings) == 1 and "--init kaiming" in warnings[0]
    tags = client.get_run(starved.run_id).data.tags
    assert tags["gradient_warning"].startswith("vanishing gradients")
    assert max(_history(client, starved.run_id, "grad_norm_ratio")) < 1 / 20

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_batch"):
        healthy = train(RunConfig(**deep, init="kaiming"))
    assert not [r for r in caplog.records if "gradients" in r.getMessage()]
    assert "gradient_warning" not in client.get_run(healthy.run_id).data.tags
    assert healthy.metrics["test_acc"] > starved.metrics["test_acc"] + 0.3


def test_the_alarm_needs_a_streak_warns_once_and_rearms():
    alarm = GradientRatioAlarm(limit=10, patience=3)
    assert [alarm.update(r, step=i) for i, r in enumerate([50, 50, 1.0, 50, 50])] == [None] * 5
    message = alarm.update(50, step=5)
    assert message is not None and message.startswith("exploding gradients") and "--grad-clip" in message
    assert alarm.update(80, step=6) is None  # one warning per episode
    assert alarm.update(float("nan"), step=7) is None  # no ratio: the streak is broken
    assert [alarm.update(0.01, step=8 + i) for i in range(3)][-1].startswith("vanishing gradients")
    assert len(alarm.warnings) == 2
    with pytest.raises(ValueError, match="above 1"):
        GradientRatioAlarm(limit=1)


def test_layer_norms_group_weight_and_bias_and_skip_frozen_or_unused_parameters():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2))
    net[2].weight.requires_grad_(False)
    norms = LayerGradNorms(net)
    assert norms.layer_names == ("0", "2", "3")
    net(torch.randn(6, 3)).pow(2).sum().backward()
    net[3].bias.grad = None  # an unused parameter has no gradient: it counts as zero
    per_layer, total = norms.compute()
    expected = [
        torch.cat([net[0].weight.grad.flatten(), net[0].bias.grad]).norm(),
        net[2].bias.grad.norm(),
        net[3].weight.grad.norm(),
    ]
    assert torch.allclose(per_layer, torch.stack(expected))
    assert torch.isclose(total, torch.stack(expected).norm())
