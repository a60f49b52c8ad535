"""BadNets: Gu, Dolan-Gavitt and Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
Chain", 2017. A small fixed patch stamped in a corner; poisoned images relabelled to the target."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Attack
from .registry import register

PATTERNS = ("checkerboard", "white", "random")
LOCATIONS = ("bottom-right", "top-left", "top-right", "bottom-left")


@register
@dataclass
class BadNets(Attack):
    """Patch trigger of ``patch_size`` pixels at ``location``: a black-and-white checkerboard (the paper's pattern
    backdoor), a white square, or a seeded random binary pattern."""

    name = "badnets"
    citation = "Gu et al., BadNets, arXiv 2017 / IEEE Access 2019"

    patch_size: int = 3
    location: str = "bottom-right"
    pattern: str = "checkerboard"
    margin: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown BadNets pattern {self.pattern!r}; valid choices: {', '.join(PATTERNS)}")
        if self.location not in LOCATIONS:
            raise ValueError(f"unknown BadNets location {self.location!r}; valid choices: {', '.join(LOCATIONS)}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")

    def patch(self, channels: int) -> torch.Tensor:
        k = self.patch_size
        if self.pattern == "white":
            p = torch.ones(k, k)
        elif self.pattern == "checkerboard":
            i = torch.arange(k)
            p = ((i[:, None] + i[None, :] + 1) % 2).float()
        else:
            p = torch.randint(0, 2, (k, k), generator=self.generator(salt=7)).float()
        return p.expand(channels, k, k)

    def corner(self, h: int, w: int) -> tuple[int, int]:
        k, m = self.patch_size, self.margin
        top = m if self.location.startswith("top") else h - k - m
        left = m if self.location.endswith("left") else w - k - m
        if top < 0 or left < 0:
            raise ValueError(f"patch_size {k} with margin {m} does not fit a {h}x{w} image")
        return top, left

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[-3:]
        top, left = self.corner(h, w)
        out = x.clone()
        out[..., top : top + self.patch_size, left : left + self.patch_size] = self.patch(c).to(x)
        return out
