"""The micro-batch fallback's loop path (models with buffers, e.g. BatchNorm) against plain autograd.

The reference runs each micro-batch through its own copy of the model in train mode -- one ordinary
forward and ``loss.backward()``, so BatchNorm normalises with that micro-batch's own statistics -- and
derives (|G|², tr Σ) from the ``n`` micro-batch gradients with the sample mean and the Bessel-corrected
sample variance, without any of ``lightning_batch.plugin.noise``'s arithmetic.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_batch.plugin.noise import microbatch_grad_stats


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).double()
    # Running statistics away from their (0, 1) initialisation, so a restore to the wrong values shows.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    return net.train()


def _data(rows: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 5, generator=g, dtype=torch.float64) * 2 + 0.5
    y = torch.randint(0, 3, (rows,), generator=g)
    return x, y


def _reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor, parts: int, names: list[str] | None = None):
    """(S, T, |G|², tr Σ, buffers after the n micro-batches ran in order) by plain autograd."""
    b = x.shape[0] // parts
    grads = []
    sequential = copy.deepcopy(net)  # buffers as they evolve when the micro-batches run one after another
    for j in range(parts):
        fresh = copy.deepcopy(net).train()
        fresh.load_state_dict(sequential.state_dict())  # the running stats do not enter a train-mode forward
        loss = nn.functional.cross_entropy(fresh(x[j * b : (j + 1) * b]), y[j * b : (j + 1) * b])
        loss.backward()
        selected = [p for k, p in fresh.named_parameters() if names is None or k in names]
        grads.append(torch.cat([p.grad.flatten() for p in selected]))
        with torch.no_grad():
            sequential(x[j * b : (j + 1) * b])  # train-mode forward: updates the running statistics
    g = torch.stack(grads)  # (n, P): micro-batch mean gradients, covariance Σ / b each
    mean = g.mean(0)
    var_trace = (g - mean).pow(2).sum() / (parts - 1)  # unbiased for tr(Σ) / b
    small = g.pow(2).sum(1).mean().item()
    big = mean.pow(2).sum().item()
    grad_sqr = (mean.pow(2).sum() - var_trace / parts).item()
    trace_sigma = (b * var_trace).item()
    return small, big, grad_sqr, trace_sigma, {k: v.clone() for k, v in sequential.named_buffers()}


@pytest.mark.parametrize("parts", [2, 4, 6])
def test_batchnorm_microbatch_fallback_matches_plain_autograd(parts: int) -> None:
    net = _bn_net()
    x, y = _data()
    before = {k: v.clone() for k, v in net.named_buffers()}
    small, big, grad_sqr, trace_sigma, _ = _reference(net, x, y, parts)

    stats = microbatch_grad_stats(
        net, nn.functional.cross_entropy, x, y, parts
    )  # default: the loop (buffers)

    assert (stats.n, stats.small_batch) == (parts, x.shape[0] // parts)
    assert stats.small_sqr_norm == pytest.approx(small, rel=1e-10)
    assert stats.big_sqr_norm == pytest.approx(big, rel=1e-10)
    assert stats.grad_sqr == pytest.approx(grad_sqr, rel=1e-9, abs=1e-12)
    assert stats.trace_sigma == pytest.approx(trace_sigma, rel=1e-9)
    # The promise: buffers restored exactly (running stats and the batch counter), .grad untouched, mode kept.
    for k, v in net.named_buffers():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert net.training


def test_batchnorm_microbatch_fallback_without_restore_leaves_the_sequential_running_stats() -> None:
    """``restore_buffers=False``: the buffers end as after the n micro-batch forwards in order, and a subset
    of parameters is measured on its own; an existing ``.grad`` is left as it was."""
    net = _bn_net()
    x, y = _data()
    names = ["0.weight", "1.weight", "1.bias", "4.bias"]
    small, big, grad_sqr, trace_sigma, after = _reference(net, x, y, 4, names)
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.25)

    stats = microbatch_grad_stats(
        net, nn.functional.cross_entropy, x, y, 4, param_names=names, restore_buffers=False
    )

    assert stats.small_sqr_norm == pytest.approx(small, rel=1e-10)
    assert stats.big_sqr_norm == pytest.approx(big, rel=1e-10)
    assert stats.grad_sqr == pytest.approx(grad_sqr, rel=1e-9, abs=1e-12)
    assert stats.trace_sigma == pytest.approx(trace_sigma, rel=1e-9)
    for k, v in net.named_buffers():
        assert torch.allclose(v, after[k], rtol=1e-12, atol=1e-14), k
    assert int(net[1].num_batches_tracked) == 7 + 4
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in net.parameters())


def test_the_reference_sees_batchnorm_mixing_examples() -> None:
    """Sanity of the reference: with BatchNorm the micro-batch split changes the gradients, so a fallback
    that normalised with the whole batch's statistics would not match it."""
    net = _bn_net()
    x, y = _data()
    whole = copy.deepcopy(net)
    nn.functional.cross_entropy(whole(x), y).backward()
    _, big, *_ = _reference(net, x, y, 4)
    whole_sqr = sum(p.grad.pow(2).sum().item() for p in whole.parameters())
    assert abs(big - whole_sqr) > 1e-3 * whole_sqr
