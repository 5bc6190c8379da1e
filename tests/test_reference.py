"""This project's training against independent references: the seed's plain loop and least squares."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn, optim

from lightning_batch.config import RunConfig
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.training import build_module

from .conftest import quiet_trainer


@pytest.mark.parametrize("scale_target", [True, False])
def test_one_epoch_of_minibatch_sgd_matches_the_seed_loop(scale_target: bool):
    """Seed section 5: nn.Linear, MSELoss, SGD(lr=0.01), B=32, sequential batches, one epoch; by
    default on the target standardised with the train split's mean and standard deviation."""
    cfg = RunConfig(
        scale_target=scale_target,
        data="synthetic-regression",
        rows=3000,
        features=5,
        noise=0.3,
        batch_size=32,
        lr=0.01,
        epochs=1,
        shuffle=False,
        seed=7,
    ).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    pl.seed_everything(cfg.seed, verbose=False)
    module = build_module(cfg, dm)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}

    # The seed's code, verbatim in spirit: a plain loop over slices of the training tensors.
    x_train, y_train = dm.train_set.features, dm.train_set.targets
    if scale_target:  # as StandardScaler would: the population standard deviation, in float64
        y64 = y_train.double()
        y_train = ((y64 - y64.mean()) / y64.std(unbiased=False)).float()
    reference = nn.Linear(x_train.shape[1], 1)
    reference.load_state_dict({k.removeprefix("linear."): v for k, v in initial.items()})
    criterion = nn.MSELoss()
    optimizer = optim.SGD(reference.parameters(), lr=0.01)
    batch_size = 32
    for i in range(0, len(x_train), batch_size):
        inputs, targets = x_train[i : i + batch_size], y_train[i : i + batch_size]
        optimizer.zero_grad()
        loss = criterion(reference(inputs), targets)
        loss.backward()
        optimizer.step()

    quiet_trainer(1, limit_val_batches=0).fit(module, datamodule=dm)
    ours = module.model.linear
    assert module.samples_seen == len(x_train)
    torch.testing.assert_close(ours.weight, reference.weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias, reference.bias, rtol=1e-5, atol=1e-5)
    # and training did move the parameters (the comparison is not between two untouched models)
    assert not torch.allclose(ours.weight, initial["linear.weight"])


def test_full_batch_gd_converges_to_least_squares():
    cfg = RunConfig(
        data="synthetic-regression",
        rows=2000,
        features=6,
        noise=0.5,
        correlation=0.3,
        batch_size="full",
        lr=0.3,
        epochs=300,
        val_every=300,
        seed=1,
    ).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    module = build_module(cfg, dm)
    quiet_trainer(cfg.epochs, check_val_every_n_epoch=cfg.val_every).fit(module, datamodule=dm)
    assert module.samples_seen == 300 * len(dm.train_set)  # one step per epoch: full-batch GD

    x = dm.train_set.features.double().numpy()
    y = dm.train_set.targets.double().numpy().ravel()
    design = np.hstack([x, np.ones((len(x), 1))])
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    # The network fits the standardised target: its weights in the target's units are w·s and b·s + m.
    mean, scale = dm.target_scaling
    learned = np.concatenate(
        [
            module.model.linear.weight.detach().double().numpy().ravel() * scale,
            module.model.linear.bias.detach().double().numpy() * scale + mean,
        ]
    )
    relative = np.linalg.norm(learned - solution) / np.linalg.norm(solution)
    assert relative < 1e-3, relative


def test_sgd_is_batch_size_one():
    cfg = RunConfig(
        data="synthetic-regression", rows=200, features=2, batch_size=1, epochs=1, seed=0
    ).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    module = build_module(cfg, dm)
    trainer = quiet_trainer(1, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == len(dm.train_set)
