"""Data augmentation against overfitting, applied to whole training batches (never val/test).

Specs are ``name:value`` strings, as ``--augment`` takes them:

- ``noise:S``  Gaussian feature noise, ``x + S * N(0, 1)`` (features are standardised, so S is in σ);
- ``mixup:A``  mixup (Zhang et al. 2018): ``λ ~ Beta(A, A)`` per batch, each row mixed with a
  shuffled partner, targets mixed with the same λ (class targets become soft probabilities, which
  ``F.cross_entropy`` accepts);
- ``shift:K``  images (a square number of features, e.g. digits' 8×8): each image moved by up to K
  pixels in each direction, zeros shifted in; one gather per batch, no per-sample Python loop.

Examples:
    >>> import torch
    >>> aug = Augmenter.parse(["noise:0.1", "mixup:0.2"])
    >>> [a.name for a in aug.steps]
    ['noise', 'mixup']
    >>> x, y = aug(torch.zeros(4, 3), torch.zeros(4, 1), n_classes=None)
    >>> x.shape, y.shape
    (torch.Size([4, 3]), torch.Size([4, 1]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from lightning_batch.config import AUGMENT_KINDS, parse_augment
from lightning_batch.errors import UserError

KINDS = AUGMENT_KINDS


@dataclass(frozen=True)
class AugmentStep:
    name: str
    value: float


@dataclass
class Augmenter:
    """The configured augmentations, applied in order to a training batch."""

    steps: list[AugmentStep] = field(default_factory=list)

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...] | None) -> Augmenter:
        """From ``--augment`` specs (``noise:0.05``, ...); a bad one is a one-line error."""
        return cls([AugmentStep(name, value) for name, value in parse_augment(specs)])

    def check_features(self, n_features: int) -> None:
        """Refuse ``shift`` on data that is not square images."""
        if any(s.name == "shift" for s in self.steps) and math.isqrt(n_features) ** 2 != n_features:
            raise UserError(
                f"--augment shift needs image data (a square number of features, like digits' 64); "
                f"this data has {n_features} features"
            )

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, n_classes: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for step in self.steps:
            if step.name == "noise":
                x = x + step.value * torch.randn_like(x)
            elif step.name == "shift":
                x = shift_images(x, int(step.value))
            else:
                x, y = mixup(x, y, step.value, n_classes)
        return x, y


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float, n_classes: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows mixed with a shuffled partner by one λ ~ Beta(alpha, alpha); targets mixed alike."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(len(x), device=x.device)
    mixed_x = lam * x + (1 - lam) * x[partner]
    if n_classes is not None:  # class indices -> probabilities
        if y.dtype != torch.long:  # already soft (an earlier mixup)
            soft = y
        else:
            soft = F.one_hot(y, n_classes).to(x.dtype)
        return mixed_x, lam * soft + (1 - lam) * soft[partner]
    return mixed_x, lam * y + (1 - lam) * y[partner]


def shift_images(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each flattened square image moved by a random (dy, dx) in [-k, k]², zeros filled in."""
    n, features = x.shape
    side = math.isqrt(features)
    images = F.pad(x.view(n, side, side), (k, k, k, k))
    offsets = torch.randint(0, 2 * k + 1, (n, 2), device=x.device)
    span = torch.arange(side, device=x.device)
    rows = (offsets[:, 0:1] + span)[:, :, None]  # (n, side, 1)
    cols = (offsets[:, 1:2] + span)[:, None, :]  # (n, 1, side)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return images[batch, rows, cols].reshape(n, features)
