"""Plain ``nn.Module`` models: no Lightning here, so they train in any loop.

Example:
    >>> import torch
    >>> model = build_model("mlp", n_features=4, n_outputs=3, hidden=[8], activation="gelu")
    >>> model(torch.zeros(2, 4)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATION_LAYERS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class LinearRegression(nn.Module):
    """The seed's model, y = w·x + b (``n_features`` inputs, ``n_outputs`` targets)."""

    def __init__(self, n_features: int, n_outputs: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class SoftmaxRegression(nn.Module):
    """Multinomial logistic regression: one linear layer giving class logits (softmax is in the loss)."""

    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class MLP(nn.Module):
    """Linear → activation → dropout, per hidden width, then a linear head."""

    def __init__(
        self,
        n_features: int,
        n_outputs: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        init: str = "default",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATION_LAYERS:
            raise ValueError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATION_LAYERS)}")
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATION_LAYERS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)
        initialize(self, init, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def initialize(model: nn.Module, scheme: str, activation: str = "relu") -> None:
    """Re-initialise the weights of every Linear layer: ``default`` (PyTorch's), ``xavier`` or ``kaiming``.

    Xavier keeps the activation variance for tanh-like units; Kaiming (He) for ReLU-like units: the
    usual first remedy against vanishing or exploding gradients in deeper MLPs.
    """
    if scheme == "default":
        return
    if scheme not in ("xavier", "kaiming"):
        raise ValueError(f"unknown init {scheme!r}; use default, xavier or kaiming")
    gain_name = "tanh" if activation == "tanh" else "relu"
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if scheme == "xavier":
                nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain(gain_name))
            else:
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


def build_model(
    name: str,
    n_features: int,
    n_outputs: int,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    dropout: float = 0.0,
    init: str = "default",
) -> nn.Module:
    """A model by name: ``linear``, ``softmax`` or ``mlp``."""
    if name == "linear":
        model: nn.Module = LinearRegression(n_features, n_outputs)
    elif name == "softmax":
        model = SoftmaxRegression(n_features, n_outputs)
    elif name == "mlp":
        return MLP(n_features, n_outputs, hidden, activation, dropout, init)
    else:
        raise ValueError(f"unknown model {name!r}; use linear, softmax or mlp")
    initialize(model, init, activation)
    return model
