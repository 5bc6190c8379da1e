"""The digits CNN: its image layout and its noise statistics under DynamicBatchSize.

The callback measures every parameter of the CNN exactly (the convolutions by their grouped
backward, the head by the linear rule). The reference here is independent: exact per-example
gradients from ``torch.func`` at the same parameters, with the unbiased estimates derived by hand;
where a part is measured by micro-batches, grouped by hand into the same micro-batches.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_batch.config import RunConfig
from lightning_batch.plugin.callback import DynamicBatchSize
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.tabular.networks import CNN, build_model
from lightning_batch.training import build_module

from .conftest import quiet_trainer


def test_a_flat_digits_row_is_read_as_its_8x8_image():
    """The CNN's reshape puts pixel (r, c) where scikit-learn's ``images[r, c]`` has it."""
    digits = load_digits()
    torch.manual_seed(0)
    net = CNN(64, 10, channels=(4,))
    conv = net.net[0]
    flat = torch.tensor(digits.data[:5], dtype=torch.float32)
    images = torch.tensor(digits.images[:5], dtype=torch.float32).unsqueeze(1)
    assert torch.equal(net.net[0](flat.view(-1, 1, 8, 8)), conv(images))
    assert net(flat).shape == (5, 10)


def test_cnn_shapes_init_and_bad_sizes():
    net = build_model("cnn", 64, 10, channels=[8, 16, 32], activation="tanh", init="xavier")
    assert net(torch.zeros(3, 64)).shape == (3, 10)  # 8 → 4 → 2 → 1 pixels
    assert net.net[-1].in_features == 32
    assert all(float(m.bias.detach().abs().sum()) == 0 for m in net.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="square images"):
        build_model("cnn", 30, 2)


def _unbiased_from_samples(gradients: torch.Tensor, examples_each: int) -> tuple[float, float]:
    """(|G|², tr Σ) from ``n`` gradient samples (rows), each the mean over ``examples_each`` iid examples,
    derived here from first principles rather than with the package's estimator.

    A row has mean ``G`` and covariance ``Σ / b``. The sample mean ``ḡ`` has ``E|ḡ|² = |G|² + tr Σ/(n b)``,
    and the sample covariance with Bessel's ``1/(n-1)`` is unbiased for ``Σ / b``, so
    ``tr Σ ≈ b · Σ_j |g_j - ḡ|² / (n-1)`` and ``|G|² ≈ |ḡ|² - tr Σ / (n b)``.
    """
    n = gradients.shape[0]
    mean = gradients.mean(0)
    sample_var_trace = (gradients - mean).pow(2).sum() / (n - 1)  # unbiased for tr(Σ)/b
    trace_sigma = examples_each * sample_var_trace
    grad_sqr = mean.pow(2).sum() - sample_var_trace / n
    return grad_sqr.item(), trace_sigma.item()


def _exact_reference(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, head: set[str], parts: int):
    """(|G|², tr Σ) from torch.func per-example gradients: the head's with b=1, n=B; the rest's from
    the mean gradients of ``parts`` contiguous micro-batches (b=B/parts)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    rows = x.shape[0]
    head_g = torch.cat([per_example[k].flatten(1) for k in params if k in head], 1).double()
    head_stats = _unbiased_from_samples(head_g, 1)
    if all(k in head for k in params):
        return head_stats
    usable = (rows // parts) * parts
    rest_g = torch.cat([per_example[k][:usable].flatten(1) for k in params if k not in head], 1).double()
    micro = rest_g.view(parts, usable // parts, -1).mean(1)
    rest_stats = _unbiased_from_samples(micro, usable // parts)
    return head_stats[0] + rest_stats[0], head_stats[1] + rest_stats[1]


def test_sample_variance_reference_on_a_hand_example():
    """The reference estimator itself, on numbers checked by hand: per-example gradients 1 and 3 have mean
    2 and sample variance 2, so tr Σ = 2 and |G|² = 4 - 2/2 = 3."""
    assert _unbiased_from_samples(torch.tensor([[1.0], [3.0]]), 1) == (3.0, 2.0)
    # Two micro-batch means of 2 examples each, in 2-D: mean (1, 1), spread 2·(1+1)/1 = 4 -> tr Σ = 2·4.
    assert _unbiased_from_samples(torch.tensor([[0.0, 2.0], [2.0, 0.0]]), 2) == (2.0 - 4.0 / 2, 8.0)


def test_dynamic_batch_size_measures_the_cnn_like_exact_per_example_gradients():
    """Every measured step of a real fit: the callback's (|G|², tr Σ) equal the torch.func reference
    taken at the parameters of that step (before the optimizer moved them) to 1e-4."""
    cfg = RunConfig(data="digits", model="cnn", channels=[4, 8], batch_size=24, lr=0.1, epochs=1)
    dm = TabularDataModule(cfg.validate())
    dm.setup()
    module = build_module(cfg, dm)
    callback = DynamicBatchSize(policy="fixed", measure_every=5, fallback_every=5, fallback_microbatches=6)
    seen: list[tuple[dict, torch.Tensor, torch.Tensor]] = []
    estimates: list[tuple[float, float] | None] = []
    exact: set[str] = set()

    class Record(Callback):
        """Before the step: the weights and rows it trains on; after DynamicBatchSize's batch end
        (it comes first in the list): the estimate its NoiseMeter measured."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            self.step = (state, batch[0].clone(), batch[1].clone())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if callback.measurement.meter.measuring:
                seen.append(self.step)
                estimates.append(callback.measurement.meter.last_estimate)
                exact.update(callback.measurement.meter.exact)

    quiet_trainer(1, [callback, Record()], limit_train_batches=21, limit_val_batches=0).fit(
        module, datamodule=dm
    )

    assert len(seen) == len(estimates) == 5  # steps 0, 5, 10, 15, 20
    reference_model = build_model("cnn", 64, 10, channels=[4, 8])
    names = {name for name, _ in reference_model.named_parameters()}
    assert exact == {f"model.{name}" for name in names}  # the convolutions and the head, all exact
    assert callback.measurement.measured_fraction == 1.0
    for (state, x, y), estimate in zip(seen, estimates, strict=True):
        reference_model.load_state_dict(state)
        expected = _exact_reference(reference_model, module.loss, x, y, names, parts=6)
        assert estimate is not None
        assert estimate == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert callback.ema.num_updates == 5 and callback.ema.gns is not None and math.isfinite(callback.ema.gns)
