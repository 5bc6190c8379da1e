"""Plain ``nn.Module`` models: no Lightning here, so they train in any loop.

Examples:
    >>> import torch
    >>> model = build_model("mlp", n_features=4, n_outputs=3, hidden=[8], activation="gelu")
    >>> model(torch.zeros(2, 4)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from lightning_batch.errors import UserError

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


class CNN(nn.Module):
    """A small convolutional classifier for square single-channel images given as flat rows.

    Tabular data reaches every model as ``(N, features)`` rows, so the network reshapes each row of
    ``side × side`` pixels (digits: 64 features → 1×8×8) itself. Each entry of ``channels`` is one
    block: 3×3 convolution (padding 1) → activation → 2×2 max-pool (while the image is at least 2
    pixels wide); then dropout and a linear head over the flattened maps.

    >>> net = CNN(64, 10, channels=(8, 16))
    >>> net(torch.zeros(5, 64)).shape
    torch.Size([5, 10])
    >>> net.image_side
    8
    """

    def __init__(
        self,
        n_features: int,
        n_outputs: int,
        channels: Sequence[int] = (32, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        init: str = "default",
    ) -> None:
        super().__init__()
        side = image_side(n_features)
        if side is None:
            raise ValueError(
                f"the CNN needs square images (a square number of features, like digits' 64), got {n_features}"
            )
        if activation not in ACTIVATION_LAYERS:
            raise ValueError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATION_LAYERS)}")
        self.image_side = side
        layers: list[nn.Module] = []
        width, size = 1, side
        for out in channels:
            layers += [nn.Conv2d(width, out, kernel_size=3, padding=1), ACTIVATION_LAYERS[activation]()]
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            width = out
        layers.append(nn.Flatten())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width * size * size, n_outputs))
        self.net = nn.Sequential(*layers)
        initialize(self, init, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, self.image_side, self.image_side))


def image_side(n_features: int) -> int | None:
    """The side of a square single-channel image with ``n_features`` pixels, or None.

    >>> image_side(64), image_side(30)
    (8, None)
    """
    side = math.isqrt(n_features)
    return side if side * side == n_features and side >= 2 else None


def initialize(model: nn.Module, scheme: str, activation: str = "relu") -> None:
    """Re-initialise every Linear and Conv2d weight: ``default`` (PyTorch's), ``xavier`` or ``kaiming``.

    Xavier keeps the activation variance for tanh-like units; Kaiming (He) for ReLU-like units: the
    usual first remedy against vanishing or exploding gradients in deeper networks. PyTorch's own
    default (Kaiming-uniform with ``a=√5``, i.e. weights ~ U(±1/√fan_in)) shrinks the signal by
    about √3 a layer, which is what lets a deep tanh MLP's first layers starve.
    """
    if scheme == "default":
        return
    if scheme not in ("xavier", "kaiming"):
        raise ValueError(f"unknown init {scheme!r}; use default, xavier or kaiming")
    gain_name: Literal["tanh", "relu"] = "tanh" if activation == "tanh" else "relu"
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain(gain_name))
            else:
                nn.init.kaiming_uniform_(module.weight, nonlinearity=gain_name)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(
    name: str,
    n_features: int,
    n_outputs: int,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    dropout: float = 0.0,
    init: str = "default",
    channels: Sequence[int] = (32, 64),
) -> nn.Module:
    """A model by name: ``linear``, ``softmax``, ``mlp`` or ``cnn``."""
    if name == "cnn":
        return CNN(n_features, n_outputs, channels, activation, dropout, init)
    if name == "linear":
        model: nn.Module = LinearRegression(n_features, n_outputs)
    elif name == "softmax":
        model = SoftmaxRegression(n_features, n_outputs)
    elif name == "mlp":
        return MLP(n_features, n_outputs, hidden, activation, dropout, init)
    else:
        raise ValueError(f"unknown model {name!r}; use linear, softmax, mlp or cnn")
    initialize(model, init, activation)
    return model


def check_model_for_data(model: str | None, n_features: int) -> None:
    """Refuse in one line a model the data cannot feed (the CNN needs square single-channel images)."""
    if model == "cnn" and image_side(n_features) is None:
        raise UserError(
            f"--model cnn needs square single-channel images (a square number of pixel features, like "
            f"--data digits' 8x8 = 64); this data has {n_features} features; use --model mlp"
        )
