"""Gradient health: per-layer gradient norms, and a warning when they vanish or explode.

A deep network whose first layer's gradient is a thousandth of its last layer's is not learning in
its first layers (vanishing gradients); the reverse is an explosion in the making. The usual
remedies are an initialisation matched to the activation (``--init kaiming`` for ReLU, ``xavier``
for tanh), another activation, and clipping (``--grad-clip``). :class:`LayerGradNorms` measures the
ratio; :class:`GradientRatioAlarm` turns a ratio that stays out of bounds into one warning line.

Measured on digits (SGD, lr 0.1, 200 steps): a 2-layer ReLU MLP and the CNN keep the first/last
ratio between 0.1 and 1.4; ten tanh layers with PyTorch's default init sit at 0.02-0.04 and ten
ReLU layers at 0.001, and neither learns (loss stays at ln 10); ``--init xavier`` (tanh) and
``--init kaiming`` (ReLU) bring them back to 0.4-5. Hence the default limit of 20.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> net(torch.randn(5, 3)).sum().backward()
    >>> norms = LayerGradNorms(net)
    >>> norms.layer_names
    ('0', '2')
    >>> per_layer, total = norms.compute()
    >>> bool(torch.isclose(total, per_layer.norm()))
    True
    >>> alarm = GradientRatioAlarm(limit=20, patience=2)
    >>> alarm.update(0.01, step=10) is None  # once is not a trend
    True
    >>> print(alarm.update(0.02, step=20))
    vanishing gradients: the first layer's gradient norm has been 0.02× the last layer's (limit 1/20) for 2 log intervals up to step 20; try --init kaiming (ReLU) or xavier (tanh), another --activation, or fewer layers
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["GradientRatioAlarm", "LayerGradNorms"]


class LayerGradNorms:
    """The gradient norm of each layer of ``model`` (every module that owns trainable parameters).

    Layers are taken in registration order, which for ``nn.Sequential`` stacks (the project's MLP
    and CNN) is input to output; ``first`` is the layer nearest the input, ``last`` the head. A
    layer's norm covers its weight and bias together. One fused ``_foreach_norm`` call over all
    gradients, then a scatter-add into layers: no Python loop over parameters per call.
    """

    def __init__(self, model: nn.Module) -> None:
        names: list[str] = []
        params: list[nn.Parameter] = []
        owners: list[int] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            names.append(name or type(module).__name__)
            params += own
            owners += [len(names) - 1] * len(own)
        self.layer_names = tuple(names)
        self.params = params
        self._owners = torch.tensor(owners, dtype=torch.long)

    def __bool__(self) -> bool:
        return bool(self.params)

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(per-layer norms, total norm)`` of the current ``.grad`` (a missing grad counts as 0).

        The total is the global norm that ``clip_grad_norm_`` clips, so it can be handed to
        ``torch.nn.utils.clip_grads_with_norm_`` without a second pass.
        """
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not present:
            zero = torch.zeros(len(self.layer_names))
            return zero, zero.sum()
        grads = [g for g in (self.params[i].grad for i in present) if g is not None]  # present: not None
        squares = torch.stack(torch._foreach_norm(grads)).float().pow(2)
        owners = self._owners[present].to(squares.device)
        per_layer = torch.zeros(len(self.layer_names), device=squares.device).index_add_(0, owners, squares)
        return per_layer.sqrt(), squares.sum().sqrt()


class GradientRatioAlarm:
    """One warning when the first/last layer gradient-norm ratio leaves ``[1/limit, limit]`` for
    ``patience`` log intervals in a row; it re-arms once the ratio is back in bounds."""

    def __init__(self, limit: float = 20.0, patience: int = 3) -> None:
        if not (math.isfinite(limit) and limit > 1):
            raise ValueError(f"the gradient-ratio limit must be a finite number above 1, got {limit}")
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.limit = float(limit)
        self.patience = int(patience)
        self._streak = 0
        self._warned = False
        #: Warnings given so far (each one a line of text).
        self.warnings: list[str] = []

    def update(self, ratio: float, step: int) -> str | None:
        """Record one log interval's ratio; returns the warning line when one is due."""
        if not math.isfinite(ratio) or 1 / self.limit <= ratio <= self.limit:
            self._streak = 0
            self._warned = False
            return None
        self._streak += 1
        if self._streak < self.patience or self._warned:
            return None
        self._warned = True
        if ratio < 1:
            size = "no gradient at all (dead units?)" if ratio == 0 else f"{ratio:.2g}× the last layer's"
            message = (
                f"vanishing gradients: the first layer's gradient norm has been {size} "
                f"(limit 1/{self.limit:g}) for {self._streak} log intervals up to step {step}; "
                "try --init kaiming (ReLU) or xavier (tanh), another --activation, or fewer layers"
            )
        else:
            message = (
                f"exploding gradients: the first layer's gradient norm has been {ratio:.2g}× the last "
                f"layer's (limit {self.limit:g}) for {self._streak} log intervals up to step {step}; "
                "try --grad-clip 1.0, a lower --lr, or --init xavier/kaiming"
            )
        self.warnings.append(message)
        return message
