"""WaNet: Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021. The trigger is a
fixed, smooth warping field: random control offsets on a k x k grid, normalised to unit mean magnitude, upsampled
bicubically to the image and scaled by s / H, added to the identity sampling grid. "Noise mode" adds samples warped
by the trigger field plus per-pixel random noise, kept at their true label, so that the network learns the exact
warp rather than any warp."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Attack, Poisoned
from .registry import register


@register
@dataclass
class WaNet(Attack):
    """The paper's CIFAR-10 defaults: ``k`` 4, ``s`` 0.5, ``grid_rescale`` 1, ``cross_ratio`` 2.

    The paper re-draws poisoned and noise samples in every batch; here the training set is poisoned once (the
    project's static-poisoning interface): ``poison_rate`` of the set is warped and relabelled (drawn from non-target
    classes), and ``cross_ratio`` times as many other samples, of any class, get the noisy warp at their true label.
    :class:`Poisoned` reports both in ``index`` (every image the attacker changed) and the noise samples alone in
    ``cover``."""

    name = "wanet"
    citation = "Nguyen and Tran, WaNet - Imperceptible Warping-based Backdoor Attack, ICLR 2021"

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (control grid size), got {self.k!r}")
        if not self.s > 0:
            raise ValueError(f"s must be > 0 (warp strength), got {self.s!r}")
        if not self.grid_rescale > 0:
            raise ValueError(f"grid_rescale must be > 0, got {self.grid_rescale!r}")
        if self.cross_ratio < 0:
            raise ValueError(f"cross_ratio must be >= 0, got {self.cross_ratio!r}")

    def flow(self, height: int, width: int) -> torch.Tensor:
        """The upsampled control offsets (1 x H x W x 2, mean |offset| 1 on the control grid), fixed by the seed."""
        control = torch.rand(1, 2, self.k, self.k, generator=self.generator(salt=21)) * 2 - 1
        control = control / control.abs().mean()
        up = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
        return up.permute(0, 2, 3, 1)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The warping field as a ``grid_sample`` grid (1 x H x W x 2, (x, y) in [-1, 1])."""
        ys = torch.linspace(-1, 1, height)
        xs = torch.linspace(-1, 1, width)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((gx, gy), dim=-1)[None]
        warped = identity + self.s * self.flow(height, width) / height
        return (warped * self.grid_rescale).clamp(-1, 1)

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.to(x).expand(len(x), -1, -1, -1), align_corners=True).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.warp(x, self.grid(*x.shape[-2:]))

    def apply_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise mode: the trigger field plus uniform per-pixel offsets in [-1/H, 1/H]."""
        h, w = x.shape[-2:]
        noise = (torch.rand(len(x), h, w, 2, generator=generator or self.generator(salt=23)) * 2 - 1) / h
        return self.warp(x, (self.grid(h, w) + noise).clamp(-1, 1))

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        payload = self.select(y)
        n_cross = round(self.cross_ratio * len(payload))
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[payload] = False
        pool = torch.nonzero(rest).flatten()
        if n_cross > len(pool):
            raise ValueError(f"cross_ratio {self.cross_ratio} asks for {n_cross} noise-mode samples but only "
                             f"{len(pool)} samples are left after poisoning")
        cover = pool[torch.randperm(len(pool), generator=self.generator(salt=2))[:n_cross]].sort().values
        x, y = x.clone(), y.clone()
        if len(payload):
            x[payload] = self.apply_train(x[payload])
            y[payload] = self.target
        if len(cover):
            x[cover] = self.apply_noise(x[cover])
        return Poisoned(x, y, torch.cat([payload, cover]).sort().values, cover)
