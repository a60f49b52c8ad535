"""Model registry: ``build(name, num_classes=..., in_channels=..., width=..., activation=...)``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .activations import ACTIVATION_TYPES, ACTIVATIONS, make_activation
from .resnet import preact_resnet18, resnet18, resnet34, resnet50, resnet101
from .resnet_mini import ResNetMini
from .small_cnn import SmallCNN

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "preact-resnet18": preact_resnet18,
    "resnet-mini": ResNetMini,
    "small-cnn": SmallCNN,
}
DEFAULT_WIDTH = {"resnet18": 64, "resnet34": 64, "resnet50": 64, "resnet101": 64, "preact-resnet18": 64, "resnet-mini": 32, "small-cnn": 32}


# CIFAR-10 channel statistics; models take [0, 1] pixels so that triggers act in pixel space.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel standardisation as the model's first layer (saved with it as buffers)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[:, None, None])
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: int | None = None,
    activation: str = "relu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Sequential:
    """A classifier by registry name taking [0, 1] images: ``normalize`` then ``net``. ``width`` scales the
    channels (``None``: the architecture's default)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")
    if width is not None and width < 2:
        raise ValueError(f"width must be >= 2, got {width!r}")
    make_activation(activation)  # validates the name before building anything
    if mean is None or std is None:
        mean, std = (CIFAR_MEAN, CIFAR_STD) if in_channels == 3 else ((0.5,) * in_channels, (0.25,) * in_channels)
    net = MODELS[name](
        num_classes=num_classes, in_channels=in_channels, width=width or DEFAULT_WIDTH[name], activation=activation
    )
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


__all__ = ["ACTIVATIONS", "ACTIVATION_TYPES", "MODELS", "Normalize", "build", "make_activation"]
