"""Augmentation: training batches change, validation and test batches never do."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from mlflow import MlflowClient

from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.tabular.augment import Augmenter, mixup, shift_images
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.training import build_module, train

from .conftest import quiet_trainer


class _SeenInputs(Callback):
    """Records what the model's forward received, per stage."""

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def on_fit_start(self, trainer, pl_module):
        def hook(module, args):
            stage = "train" if pl_module.training else "val"
            self.seen[stage].append(args[0].detach().clone())

        pl_module.model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("spec", [["noise:0.1"], ["mixup:0.4"], ["noise:0.05", "mixup:0.2"]])
def test_train_batches_change_and_validation_batches_do_not(spec):
    torch.manual_seed(0)  # mixup's λ ~ Beta(0.4, 0.4) is near 0 or 1 now and then: a fixed draw
    cfg = RunConfig(data="wine", epochs=1, batch_size=16, augment=spec).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    module = build_module(cfg, dm)
    seen = _SeenInputs()
    quiet_trainer(1, [seen]).fit(module, datamodule=dm)
    train_rows = torch.cat(seen.seen["train"])
    val_rows = torch.cat(seen.seen["val"])
    # Every validation row is exactly a row of the validation split, in order; training rows are not rows of
    # the training split.
    torch.testing.assert_close(val_rows, dm.val_set.features)
    originals = dm.train_set.features
    distance = torch.cdist(train_rows, originals).min(dim=1).values
    assert (distance > 1e-4).float().mean() > 0.75


def test_mixup_mixes_inputs_and_targets_with_the_same_lambda():
    torch.manual_seed(0)
    w = torch.randn(5, 1)
    x = torch.randn(64, 5)
    mixed_x, mixed_y = mixup(x, x @ w, alpha=0.4, n_classes=None)
    torch.testing.assert_close(mixed_y, mixed_x @ w)  # a linear target stays consistent
    labels = torch.randint(0, 3, (64,))
    _, soft = mixup(x, labels, alpha=0.4, n_classes=3)
    assert soft.shape == (64, 3)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(64))


def test_shift_moves_each_image_by_at_most_k_pixels():
    torch.manual_seed(1)
    images = torch.zeros(200, 64)
    images[:, 3 * 8 + 4] = 1.0  # one lit pixel at row 3, column 4
    shifted = shift_images(images, 1).view(200, 8, 8)
    rows, cols = torch.nonzero(shifted, as_tuple=True)[1:]
    assert shifted.sum() == 200  # nothing falls off an 8x8 image when the pixel is inside
    assert rows.sub(3).abs().max() <= 1 and cols.sub(4).abs().max() <= 1
    assert len({(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}) == 9  # all 9 offsets occur


@pytest.mark.parametrize(
    "spec, fragment",
    [
        (["blur:1"], "unknown augmentation"),
        (["noise:x"], "not a number"),
        (["mixup:-1"], "positive"),
        (["shift:0.5"], "whole pixels"),
    ],
)
def test_bad_augmentations_are_one_line_errors(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        Augmenter.parse(spec)


def test_shift_needs_images(tracking_uri: str):
    with pytest.raises(UserError, match="needs image data"):
        train(RunConfig(data="wine", augment=["shift:1"], tracking_uri=tracking_uri))


def test_augmentation_is_a_param_of_the_run(tracking_uri: str):
    result = train(
        RunConfig(data="digits", epochs=1, augment=["shift:1", "noise:0.05"], tracking_uri=tracking_uri)
    )
    params = MlflowClient(tracking_uri).get_run(result.run_id).data.params
    assert params["augment"] == "['shift:1', 'noise:0.05']"
