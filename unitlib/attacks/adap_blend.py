"""Adap-Blend: Qi, Xie, Li, Mahloujifar and Mittal, "Revisiting the Assumption of Latent Separability for Backdoor
Defenses", ICLR 2023. An adaptive blend attack that keeps poisoned and clean samples close in latent space: the
blend trigger is cut into pieces and each poisoned image gets only a random half of them ("asymmetric" trigger),
and "regularisation" (conservatism) samples carry the same partial triggers at their true label, so that the model
only answers to the full trigger, which is used at test time with a larger blend ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import photos
from .base import Attack, Poisoned
from .registry import register


@register
@dataclass
class AdapBlend(Attack):
    """The paper's CIFAR-10 defaults: ``pieces`` 16 (a 4 x 4 grid), ``masked_pieces`` 8 left out of each poisoned
    image, training blend ratio ``alpha`` 0.15, test-time ratio ``test_alpha`` 0.2 with the whole trigger, and a
    poison rate of 0.003 with as many regularisation samples (``cover_rate``, default: the poison rate).

    The paper blends a Hello Kitty picture, which cannot be downloaded here. The default ``pattern`` is ``noise``:
    the seeded uniform-noise key of :class:`Blend` (Chen et al.'s random-pattern variant of the same attack). A
    photo bundled with scikit-image can be named instead (``chelsea``, ``logo``, ...); a smooth photo at ratio
    0.15 is harder to learn than the noise key on small models (the README's measured section has the rates at
    which each plants a backdoor). The class default ``poison_rate`` is the paper's 0.003, which the book's rows
    use at the ``paper`` profile; at ``cpu`` they use the rate of ``paper.poison_rate``.
    An ``Experiment`` passes its own ``poison_rate``. Payload samples are drawn from non-target classes and
    relabelled; regularisation samples from any class except the payload, labels kept; :class:`Poisoned` reports
    both in ``index`` and the regularisation samples in ``cover``."""

    name = "adap-blend"
    citation = "Qi, Xie, Li, Mahloujifar and Mittal, Revisiting the Assumption of Latent Separability for Backdoor Defenses, ICLR 2023"

    poison_rate: float = 0.003
    pattern: str = "noise"
    pieces: int = 16
    masked_pieces: int = 8
    alpha: float = 0.15
    test_alpha: float = 0.2
    cover_rate: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern != "noise" and self.pattern not in photos.PHOTOS:
            raise ValueError(f"unknown pattern {self.pattern!r}; valid choices: noise, {', '.join(photos.PHOTOS)}")
        side = math.isqrt(self.pieces)
        if self.pieces < 1 or side * side != self.pieces:
            raise ValueError(f"pieces must be a square number >= 1 (a grid), got {self.pieces!r}")
        if not 0 <= self.masked_pieces < self.pieces:
            raise ValueError(f"masked_pieces must be in [0, {self.pieces - 1}], got {self.masked_pieces!r}")
        for key in ("alpha", "test_alpha"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in (0, 1], got {getattr(self, key)!r}")
        if self.cover_rate is not None and not 0.0 <= self.cover_rate <= 1.0:
            raise ValueError(f"cover_rate must be in [0, 1] or None, got {self.cover_rate!r}")

    def key(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The blend pattern, resized to the images; ``noise``: seeded uniform noise, as :class:`Blend`'s key."""
        if self.pattern == "noise":
            return torch.rand((channels, height, width), generator=self.generator(salt=11))
        return photos.photo(self.pattern, channels, (height, width))

    def piece_map(self, height: int, width: int) -> torch.Tensor:
        """Which piece of the ``sqrt(pieces)`` x ``sqrt(pieces)`` grid each pixel belongs to (H x W, int)."""
        side = math.isqrt(self.pieces)
        rows = torch.arange(height) * side // height
        cols = torch.arange(width) * side // width
        return rows[:, None] * side + cols[None, :]

    def masks(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` masks (n x H x W, 0/1), each keeping a random ``pieces - masked_pieces`` pieces of the trigger."""
        keep = torch.zeros(n, self.pieces)
        for i in range(n):
            keep[i, torch.randperm(self.pieces, generator=generator)[: self.pieces - self.masked_pieces]] = 1
        return keep[:, self.piece_map(height, width)]

    def blend(self, x: torch.Tensor, alpha: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        c, h, w = x.shape[-3:]
        weight = alpha if mask is None else alpha * mask[:, None].to(x)
        return ((1 - weight) * x + weight * self.key(c, h, w).to(x)).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.blend(x, self.test_alpha)

    def apply_train(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training-time trigger: each image gets a random subset of the pieces at ratio ``alpha``."""
        h, w = x.shape[-2:]
        flat = x.reshape(-1, *x.shape[-3:])
        masks = self.masks(len(flat), h, w, generator or self.generator(salt=41))
        return self.blend(flat, self.alpha, masks).reshape(x.shape)

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        payload = self.select(y)
        rate = self.poison_rate if self.cover_rate is None else self.cover_rate
        n_cover = round(rate * len(y))
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[payload] = False
        pool = torch.nonzero(rest).flatten()
        if n_cover > len(pool):
            raise ValueError(f"cover_rate {rate} asks for {n_cover} regularisation samples but only {len(pool)} "
                             f"samples are left after poisoning")
        cover = pool[torch.randperm(len(pool), generator=self.generator(salt=2))[:n_cover]].sort().values
        x, y = x.clone(), y.clone()
        g = self.generator(salt=41)
        if len(payload):
            x[payload] = self.apply_train(x[payload], g)
            y[payload] = self.target
        if len(cover):
            x[cover] = self.apply_train(x[cover], g)
        return Poisoned(x, y, torch.cat([payload, cover]).sort().values, cover)
