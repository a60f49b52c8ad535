"""SIG: Barni, Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label
Poisoning", ICIP 2019. Clean-label: target-class training images get a horizontal sinusoidal signal added,
v(i, j) = delta * sin(2 pi j f / m) over columns j = 0..m-1, the same on every row and channel; labels stay."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Attack
from .registry import register


@register
@dataclass
class SIG(Attack):
    """The sinusoidal signal of the paper with its defaults, ``delta`` 20 (of 255) and ``frequency`` 6 periods
    across the image. The paper also studies a stronger signal at test time; ``test_delta`` (default: ``delta``)
    sets it. The UNIT authors' companion code poisons 8% of the training set for SIG (pass ``poison_rate``)."""

    name = "sig"
    clean_label = True
    citation = "Barni, Kallas and Tondi, A New Backdoor Attack in CNNs by Training Set Corruption Without Label Poisoning, ICIP 2019"

    delta: float = 20.0
    frequency: float = 6.0
    test_delta: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("delta", "test_delta"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value <= 255.0:
                raise ValueError(f"{key} must be in (0, 255] (pixel levels of 255), got {value!r}")
        if not self.frequency > 0:
            raise ValueError(f"frequency must be > 0 (periods across the image), got {self.frequency!r}")

    def signal(self, height: int, width: int, delta: float | None = None) -> torch.Tensor:
        """The additive signal (H x W, in [0, 1] pixel units): delta/255 * sin(2 pi j f / width) along columns."""
        delta = self.delta if delta is None else delta
        j = torch.arange(width, dtype=torch.float32)
        row = delta / 255.0 * torch.sin(2 * math.pi * j * self.frequency / width)
        return row.expand(height, width)

    def _add(self, x: torch.Tensor, delta: float) -> torch.Tensor:
        h, w = x.shape[-2:]
        return (x + self.signal(h, w, delta).to(x)).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, self.test_delta if self.test_delta is not None else self.delta)

    def apply_train(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, self.delta)
