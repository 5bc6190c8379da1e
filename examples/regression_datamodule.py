"""Regression with your own LightningDataModule, and DynamicBatchSize choosing the batch size.

What to copy into your project:

1. Keep the batch size where Lightning's ``BatchSizeFinder`` looks for it, a ``batch_size``
   attribute of the DataModule, and build the training loader from it with ``shuffle=True``.
   That size is where ``DynamicBatchSize`` starts; it rebuilds the loader when the fit starts
   so the size can change mid-epoch, every row still trained once per epoch.
2. Nothing in the LightningModule: the callback measures the parameters its optimizer updates and
   probes the memory ceiling through ``training_step``. The ``forward`` and ``loss(prediction,
   target)`` here are optional; with them, the probe's trial steps skip ``training_step``'s logging.
3. Add the callback: ``pl.Trainer(callbacks=[DynamicBatchSize()])``. The default policy,
   ``goodput``, times steps at two batch sizes and picks the one that makes the most progress
   per second; the default lr rule, AdaScale, rescales the SGD learning rate to match.

Run it::

    python examples/regression_datamodule.py --epochs 4
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_batch import DynamicBatchSize


class SyntheticRegression(pl.LightningDataModule):
    """y = X·w + noise, with ``rows`` rows of ``features`` Gaussian features; 80/20 train/val."""

    def __init__(
        self, batch_size: int = 32, rows: int = 8192, features: int = 16, noise: float = 0.5, seed: int = 0
    ) -> None:
        super().__init__()
        self.batch_size = batch_size  # the starting batch size, as for Lightning's BatchSizeFinder
        self.rows, self.features, self.noise, self.seed = rows, features, noise, seed

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.rows, self.features, generator=generator)
        self.weights = torch.randn(self.features, 1, generator=generator)
        y = x @ self.weights + self.noise * torch.randn(self.rows, 1, generator=generator)
        self.train_set, self.val_set = random_split(TensorDataset(x, y), [0.8, 0.2], generator=generator)

    def target_variance(self) -> float:
        """What always predicting the mean would score: |w|² + noise²."""
        return float(self.weights.pow(2).sum()) + self.noise**2

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1024)


class Regressor(pl.LightningModule):
    """A one-hidden-layer MLP trained with SGD on the mean squared error."""

    def __init__(self, features: int = 16, hidden: int = 32, lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(prediction, target)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    data = SyntheticRegression(batch_size=32, rows=args.rows, seed=args.seed)
    resize = DynamicBatchSize()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[resize],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(Regressor(), datamodule=data)
    seconds = time.perf_counter() - started

    val_loss = float(trainer.callback_metrics["val_loss"])
    print(
        f"val MSE {val_loss:.3f} (target variance {data.target_variance():.2f}, noise floor {data.noise**2:.2f})"
    )
    print(f"batch size {data.batch_size} -> {resize.batch_size} in {seconds:.1f} s; decisions:")
    for decision in resize.decisions:
        print(f"  step {decision['step']:>4}: {decision['from']} -> {decision['to']}  ({decision['reason']})")
    return {"trainer": trainer, "callback": resize, "data": data, "val_loss": val_loss}


if __name__ == "__main__":
    main()
