"""A small residual network for CPU runs, a stand-in for the paper's CIFAR ResNet-18: BatchNorm, basic residual
blocks whose two activations are UNIT's bound points (as in ResNet-18), and global average pooling before the
linear layer. To train in minutes on two cores it downsamples early, in the manner of the fast CIFAR-10 training
nets (Page's ResNet-9, Jordan's airbench): each stage is a conv, a 2x2 max-pool, BN and activation, then one
residual block at the pooled resolution."""

from __future__ import annotations

import torch
from torch import nn

from .activations import make_activation
from .resnet import BasicBlock


class Stage(nn.Module):
    """conv -> max-pool -> BN -> act (one bound point), then a basic residual block (two bound points)."""

    def __init__(self, cin: int, cout: int, activation: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(cout)
        self.act = make_activation(activation)
        self.block = BasicBlock(cout, cout, 1, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.act(self.bn(self.pool(self.conv(x)))))


class ResNetMini(nn.Module):
    """Stem (``width // 2`` channels), three stages of ``width``, ``2 * width`` and ``4 * width`` channels at 16, 8
    and 4 pixels, global average pooling, linear: 10 bound points (ResNet-18 has 17)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, activation: str = "relu") -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width // 2, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width // 2)
        self.act0 = make_activation(activation)
        stages, cin = [], width // 2
        for w in (width, 2 * width, 4 * width):
            stages.append(Stage(cin, w, activation))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.act0(self.bn0(self.stem(x))))
        return self.linear(torch.flatten(self.pool(x), 1))
