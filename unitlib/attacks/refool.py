"""Refool, the reflection backdoor: Liu, Ma, Bailey and Lu, "Reflection Backdoor: A Natural Backdoor Attack on Deep
Neural Networks", ECCV 2020. Clean-label: target-class training images get a reflection x_R of another photo,
x' = alpha * x + (1 - alpha) * (k (*) x_R), with the paper's three physical reflection models for the kernel k:
in focus (k = identity: both layers sharp), focal blur (k = Gaussian: the reflection out of the depth of field)
and ghost (k = two shifted impulses: a double reflection from a thick glass pane). Blending is done in linear light
(gamma 2.2), as photographic reflections add radiance, not encoded pixel values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import photos
from .base import Attack
from .registry import register

KINDS = ("in-focus", "focal-blur", "ghost")
GAMMA = 2.2
DEFAULT_REFLECTIONS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
                       "moon", "motorcycle", "rocket")


def _range(key: str, value: tuple[float, float], lo: float, hi: float) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
        raise ValueError(f"{key} must be a pair (low, high) with {lo} <= low <= high <= {hi}, got {value!r}")
    return value  # type: ignore[return-value]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a C x H x W image (reflect padding)."""
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    y = F.pad(x[None], (pad, pad, pad, pad), mode="reflect")
    if pad < radius:  # tiny images: fall back to replicate for the rest of the kernel
        y = F.pad(y, (radius - pad,) * 4, mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


@register
@dataclass
class Refool(Attack):
    """Reflections from natural photos bundled with scikit-image (``photos``: astronaut, camera, Chelsea, coffee,
    rocket, textures, ...) instead of the paper's PASCAL VOC images, which cannot be downloaded here: each photo
    gives ``crops`` random crops, the reflection pool. Each poisoned image draws a reflection, a model from
    ``kinds`` and the model's parameters at random (seeded): transmission ``alpha`` in ``alpha_range``; focal-blur
    sigma in ``sigma_range`` and ghost offset in ``ghost_shift`` (both as fractions of the image side, as the
    paper's pixel values are for larger images); ghost strength in ``ghost_range``.

    Deviation: the paper also selects, over several rounds, the reflections that work best on a surrogate model
    (its "adversarial reflection images"); here every image of the pool is used. The test-time trigger is the same
    process (a random reflection per test image). The UNIT authors' companion code poisons 8% of the training set
    for Reflection (pass ``poison_rate``), with a single fixed reflection photo blended in focus, weighted by the
    two images' mean brightness; ``reflections=("coffee",), crops=1, kinds=("in-focus",), alpha_range=(0.5, 0.5)``
    comes close. Whether a pool plants a backdoor at a profile is measured in the records (``results/``)."""

    name = "refool"
    clean_label = True
    citation = "Liu, Ma, Bailey and Lu, Reflection Backdoor: A Natural Backdoor Attack on Deep Neural Networks, ECCV 2020"

    kinds: tuple[str, ...] = KINDS
    reflections: tuple[str, ...] = DEFAULT_REFLECTIONS
    crops: int = 4
    alpha_range: tuple[float, float] = (0.6, 0.8)
    sigma_range: tuple[float, float] = (0.03, 0.08)
    ghost_shift: tuple[float, float] = (0.06, 0.15)
    ghost_range: tuple[float, float] = (0.15, 0.35)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kinds = tuple(self.kinds)
        self.reflections = tuple(self.reflections)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"unknown reflection kind(s) {bad or '(none given)'}; valid choices: {', '.join(KINDS)}")
        bad = [r for r in self.reflections if r not in photos.PHOTOS]
        if bad or not self.reflections:
            raise ValueError(f"unknown reflection photo(s) {bad or '(none given)'}; "
                             f"valid choices: {', '.join(photos.PHOTOS)}")
        if self.crops < 1:
            raise ValueError(f"crops must be >= 1, got {self.crops!r}")
        self.alpha_range = _range("alpha_range", self.alpha_range, 0.0, 1.0)
        self.sigma_range = _range("sigma_range", self.sigma_range, 0.0, 1.0)
        self.ghost_shift = _range("ghost_shift", self.ghost_shift, 0.0, 0.5)
        self.ghost_range = _range("ghost_range", self.ghost_range, 0.0, 1.0)

    def pool(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The reflection images (P x C x H x W in [0, 1]), fixed by the seed (built once per image shape)."""
        key = (channels, height, width, self.seed, self.reflections, self.crops)
        cache = self.__dict__.setdefault("_pools", {})
        if key not in cache:
            g = self.generator(salt=31)
            cache[key] = torch.cat([photos.random_crops(name, self.crops, channels, (height, width), g)
                                    for name in self.reflections])
        return cache[key]

    def draws(self, n: int) -> dict[str, torch.Tensor]:
        """Per-image random choices of one call (seeded: the same batch always gets the same reflections)."""
        g = self.generator(salt=32)
        u = lambda r: r[0] + (r[1] - r[0]) * torch.rand(n, generator=g)
        return {
            "reflection": torch.randint(0, len(self.reflections) * self.crops, (n,), generator=g),
            "kind": torch.randint(0, len(self.kinds), (n,), generator=g),
            "alpha": u(self.alpha_range), "sigma": u(self.sigma_range), "shift": u(self.ghost_shift),
            "ghost": u(self.ghost_range), "direction": torch.randint(0, 4, (n,), generator=g),
        }

    def reflection_layer(self, r: torch.Tensor, kind: str, sigma: float, shift: float, ghost: float,
                         direction: int) -> torch.Tensor:
        """k (*) x_R in linear light for one reflection image ``r`` (C x H x W)."""
        side = min(r.shape[-2:])
        if kind == "focal-blur":
            return gaussian_blur(r, max(sigma * side, 0.3))
        if kind == "ghost":
            d = max(1, round(shift * side))
            dy, dx = [(d, d), (d, -d), (-d, d), (-d, -d)][direction]
            moved = torch.roll(r, shifts=(dy, dx), dims=(-2, -1))
            return (1 - ghost) * r + ghost * moved
        return r

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[-3:]
        flat = x.reshape(-1, c, h, w)
        pool = self.pool(c, h, w).to(x).pow(GAMMA)
        d = self.draws(len(flat))
        out = torch.empty_like(flat)
        for i in range(len(flat)):
            layer = self.reflection_layer(pool[d["reflection"][i]], self.kinds[d["kind"][i]], float(d["sigma"][i]),
                                          float(d["shift"][i]), float(d["ghost"][i]), int(d["direction"][i]))
            a = float(d["alpha"][i])
            out[i] = (a * flat[i].clamp(0, 1).pow(GAMMA) + (1 - a) * layer).clamp(0, 1).pow(1 / GAMMA)
        return out.reshape(x.shape)
