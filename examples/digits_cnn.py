"""A small CNN on scikit-learn's handwritten digits, with DynamicBatchSize choosing the batch size.

A plain Lightning project: a ``Dataset`` that returns one ``(image, label)`` per index, a
``DataLoader(batch_size=..., shuffle=True, num_workers=2)``, a LightningModule with convolutions.
What to copy into your project is the callback line in ``main``: the callback measures every
parameter the optimizer updates, the convolutions and the linear head, exactly per example. The
module's ``forward`` and ``loss(prediction, target)`` are optional: they give the callback's memory
probe a cheaper trial step than ``training_step`` (which logs). The loader needs no change: when the fit starts, the callback rebuilds it on a sampler whose
batch size can change mid-epoch, keeping its workers, its shuffling and every row once per epoch.

The digits (1,797 8×8 images) ship with scikit-learn (``pip install scikit-learn``, or the
``lightning-batch[data]`` extra): nothing is downloaded. Run it::

    python examples/digits_cnn.py --epochs 5
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_batch import DynamicBatchSize


class Digits(Dataset):
    """scikit-learn's digits: a 1×8×8 float image in [0, 1] and its label (0-9), one per index."""

    def __init__(self, indices: torch.Tensor) -> None:
        digits = load_digits()
        self.images = torch.tensor(digits.images, dtype=torch.float32)[indices].unsqueeze(1) / 16.0
        self.labels = torch.tensor(digits.target)[indices]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr: float = 0.003) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),  # 16×8×8
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16×4×4
            nn.Conv2d(16, 32, kernel_size=3, padding=1),  # 32×4×4
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32×2×2
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(prediction, target)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.loss(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model(images)
        self.log("val_loss", self.loss(logits, labels))
        self.log("val_acc", (logits.argmax(dim=1) == labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="the starting batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    order = torch.randperm(len(load_digits().target), generator=torch.Generator().manual_seed(args.seed))
    train_set, val_set = Digits(order[:1400]), Digits(order[1400:])
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, num_workers=2, persistent_workers=True
    )
    val_loader = DataLoader(val_set, batch_size=256)

    # policy="noise": the batch follows the gradient noise scale B_noise (the batch beyond which
    # larger batches stop paying in progress per sample), measured every few steps. It needs no
    # step timing, so on a dataset of 1,400 rows it moves within the first epoch. The default,
    # "goodput", first times 20 steps at each of two sizes to also weigh speed: on a run this short
    # that is most of it. lr_rule="sqrt": lr × sqrt(B / B0), the usual rule for Adam (the default,
    # AdaScale, is derived for SGD). measure_every=10, twice as often as the default, so the
    # estimate settles within the first epoch's 88 steps; max_batch: a third of the training rows.
    resize = DynamicBatchSize(policy="noise", lr_rule="sqrt", measure_every=10, max_batch=512)
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
    trainer.fit(DigitsCNN(), train_dataloaders=train_loader, val_dataloaders=val_loader)
    seconds = time.perf_counter() - started

    val_acc = float(trainer.callback_metrics["val_acc"])
    print(f"val accuracy {val_acc:.3f} after {args.epochs} epochs in {seconds:.1f} s")
    print(f"batch size {args.batch_size} -> {resize.batch_size}; decisions:")
    for decision in resize.decisions:
        print(f"  step {decision['step']:>4}: {decision['from']} -> {decision['to']}  ({decision['reason']})")
    return {"trainer": trainer, "callback": resize, "val_acc": val_acc}


if __name__ == "__main__":
    main()
