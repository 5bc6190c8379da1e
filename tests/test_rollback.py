"""A training loss that blows up is caught before it becomes inf: the run rolls back to its last good
window, halves the lr and goes on (``on_nan="rollback"``, the run's default)."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from lightning_batch import TabularDataModule, TaskModule, build_model
from lightning_batch.tabular.task_module import BLOWUP_FACTOR, NonFiniteLossError
from tests.conftest import quiet_trainer


def _fit(on_nan: str, lr: float) -> TaskModule:
    dm = TabularDataModule(data="synthetic-regression", rows=2000, features=8, batch_size=32, seed=0)
    dm.setup()
    torch.manual_seed(0)
    module = TaskModule(build_model("mlp", dm.n_features, 1, hidden=[32]), lr=lr, log_every=5, on_nan=on_nan)
    quiet_trainer(3, limit_val_batches=0).fit(module, datamodule=dm)
    return module


def test_a_diverging_fit_fails_without_rollback():
    with pytest.raises(NonFiniteLossError):
        _fit("fail", lr=3.0)


def test_a_diverging_fit_rolls_back_halves_the_lr_and_finishes(caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_batch.tabular.task_module"):
        module = _fit("rollback", lr=3.0)
    assert module.rollbacks >= 1
    events = [r.getMessage() for r in caplog.records if "rolled back to step" in r.getMessage()]
    assert len(events) == module.rollbacks
    # Each event halves the lr: the lr the fit ends at is 3 / 2^rollbacks (no schedule here).
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3.0 / 2**module.rollbacks)
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    # Caught on the way up, not only at inf: at least one event saw a finite loss over the threshold.
    seen = [float(re.search(r"loss reached (\S+) \(lowest window mean (\S+)\)", e).group(1)) for e in events]
    assert any(math.isfinite(v) for v in seen), seen


def test_a_fit_that_does_not_blow_up_never_rolls_back():
    module = _fit("rollback", lr=0.05)
    assert module.rollbacks == 0 and module._step["floor"] > 0
    assert BLOWUP_FACTOR == 1000.0
