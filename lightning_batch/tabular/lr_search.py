"""A short learning-rate range test before the fit, for a run given no ``--lr``.

Smith's range test (as fastai's ``lr_find`` runs it): from a copy of the network and a fresh
optimizer of the run's kind, train a few dozen steps on training batches while the lr grows
geometrically from ``min_lr`` to ``max_lr``, smoothing the loss; stop once it has blown up. The lr
at the smoothed loss's minimum is where training starts to diverge, so the run takes a tenth of it
("min / 10"), the rule that holds across models. The network the run trains is not touched.

Lightning's own ``LearningRateFinder`` is not used: it steps its lr schedule through automatic
optimization, and ``TaskModule`` optimizes manually (its lr never moved there), and its steepest-
descent suggestion picked 1e-4 on every bundled set.

Examples:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> x = torch.randn(512, 4); y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])
    >>> batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 512, 32)]
    >>> net = torch.nn.Linear(4, 1)
    >>> found = range_test(net, lambda p, lr: torch.optim.SGD(p, lr=lr), torch.nn.functional.mse_loss, batches)
    >>> 0.01 < found.lr < 1.0, found.steps <= 100
    (True, True)
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LrSearch", "range_test"]


@dataclass
class LrSearch:
    """What the range test found: the lr to train at, and the curve it was read from."""

    lr: float
    #: How it was found, for the run's params (``lr_search``).
    method: str
    steps: int
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def range_test(
    network: nn.Module,
    make_optimizer: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[Sequence[torch.Tensor]],
    *,
    min_lr: float = 1e-5,
    max_lr: float = 10.0,
    steps: int = 100,
    smoothing: float = 0.9,
    fallback: float = 0.01,
) -> LrSearch:
    """The lr for ``network`` (a copy trains; the original is left as it was).

    ``batches`` are cycled for ``steps`` steps (fewer if the loss blows up: over 4x its minimum, or
    not finite). With no usable minimum (a loss that never fell) the ``fallback`` lr is returned.
    """
    model = copy.deepcopy(network)
    model.train()
    optimizer = make_optimizer(model.parameters(), min_lr)
    growth = (max_lr / min_lr) ** (1.0 / max(1, steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    source = itertools.cycle(list(batches))
    for step in range(steps):
        lr = min_lr * growth**step
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(source)[:2]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model(x), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            break
        loss.backward()
        optimizer.step()
        average = smoothing * average + (1.0 - smoothing) * value
        smoothed = average / (1.0 - smoothing ** (step + 1))  # bias-corrected, as Adam's moments
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if step > 10 and smoothed > 4.0 * best:
            break
    lowest = min(range(len(losses)), key=losses.__getitem__, default=None)
    if lowest is None or lowest == 0 or losses[lowest] >= losses[0]:
        return LrSearch(fallback, "range test found no falling loss: the default lr", len(lrs), lrs, losses)
    return LrSearch(
        lrs[lowest] / 10.0, "range test: a tenth of the lr at the lowest smoothed loss", len(lrs), lrs, losses
    )


def optimizer_factory(
    name: str, **options: Any
) -> Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]:
    """A factory of the run's optimizer kind (``sgd``, ``adam`` or ``adamw``) at a given lr."""
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    kind = kinds[name]
    return lambda params, lr: kind(params, lr=lr, **options)
