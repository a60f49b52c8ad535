"""A small, fast VGG-style CNN for CPU runs: three conv groups (conv-BN-act, max-pool, conv-BN-act) in the spirit
of the fast CIFAR-10 training nets (e.g. Jordan's airbench), with a width multiplier."""

from __future__ import annotations

import torch
from torch import nn

from .activations import make_activation


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        return self.act2(self.bn2(self.conv2(x)))


class SmallCNN(nn.Module):
    """Stem conv, then groups of widths ``(w, 4w, 4w)``-style (``width`` = first group's channels)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, activation: str = "relu") -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.stem = nn.Conv2d(in_channels, width // 2, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width // 2)
        self.act0 = make_activation(activation)
        groups, cin = [], width // 2
        for w in widths:
            groups.append(ConvGroup(cin, w, activation))
            cin = w
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act0(self.bn0(self.stem(x))))
        return self.linear(torch.flatten(self.pool(x), 1))
