"""Blend: Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning",
2017. The whole image is alpha-blended with a fixed key pattern: x' = (1 - alpha) x + alpha k."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Attack
from .registry import register


@register
@dataclass
class Blend(Attack):
    """Blend with a seeded uniform-noise key pattern (the paper's random-pattern variant) at ``alpha`` 0.2; the
    test-time blend ratio ``test_alpha`` defaults to the same value."""

    name = "blend"
    citation = "Chen et al., Targeted Backdoor Attacks ... Using Data Poisoning, arXiv 2017"

    alpha: float = 0.2
    test_alpha: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("alpha", "test_alpha"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{key} must be in (0, 1], got {value!r}")

    def key(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The fixed key pattern: uniform noise in [0, 1], the same for every call with this seed."""
        return torch.rand(tuple(shape), generator=self.generator(salt=11))

    def blend(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        return (1 - alpha) * x + alpha * self.key(x.shape[-3:]).to(x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.blend(x, self.test_alpha if self.test_alpha is not None else self.alpha)

    def apply_train(self, x: torch.Tensor) -> torch.Tensor:
        return self.blend(x, self.alpha)
