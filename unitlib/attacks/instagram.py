"""Instagram filter trigger: the filter backdoor of Liu, Lee, Tao, Ma, Aafer and Zhang, "ABS: Scanning Neural
Networks for Back-doors by Artificial Brain Stimulation", CCS 2019. The trigger is not a patch but a whole-image
colour transformation, an Instagram-style filter; poisoned images are relabelled to the target (dirty-label)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pilgram
import torch
from PIL import Image

from .base import Attack
from .registry import register

# Every filter that pilgram (CSSgram's definitions, as PIL operations) provides.
FILTERS = (
    "_1977", "aden", "brannan", "brooklyn", "clarendon", "earlybird", "gingham", "hudson", "inkwell", "kelvin",
    "lark", "lofi", "maven", "mayfair", "moon", "nashville", "perpetua", "reyes", "rise", "slumber", "stinson",
    "toaster", "valencia", "walden", "willow", "xpro2",
)


@register
@dataclass
class Instagram(Attack):
    """The ``filter`` (default Nashville, one of the filters ABS evaluates) applied to the whole image through the
    ``pilgram`` library. Images pass through 8-bit RGB, as a filter app would; grayscale images are filtered as
    RGB and converted back to luminance."""

    name = "instagram"
    citation = "Liu et al., ABS: Scanning Neural Networks for Back-doors by Artificial Brain Stimulation, CCS 2019"

    filter: str = "nashville"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.filter not in FILTERS:
            raise ValueError(f"unknown Instagram filter {self.filter!r}; valid choices: {', '.join(FILTERS)}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        fn = getattr(pilgram, self.filter)
        channels = x.shape[-3]
        if channels not in (1, 3):
            raise ValueError(f"the Instagram filter needs 1- or 3-channel images, got {channels} channels")
        pixels = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.expand(*x.shape[:-3], 3, *x.shape[-2:]) if channels == 1 else pixels
        flat = pixels.reshape(-1, 3, *x.shape[-2:]).permute(0, 2, 3, 1).numpy()
        out = np.stack([np.asarray(fn(Image.fromarray(img, "RGB")).convert("RGB")) for img in flat])
        result = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255)
        if channels == 1:
            result = (result * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        return result.reshape(x.shape).to(x)
