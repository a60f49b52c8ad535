"""``synthetic``: ten classes generated in code, learnable by a tiny CNN in seconds, for tests and smoke runs."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import Arrays, Dataset, from_arrays

_SYNTHETIC_TRAIN = 2000
_SYNTHETIC_TEST = 500
_SYNTHETIC_CLASSES = tuple(f"pattern{i}" for i in range(10))


def _smooth_noise(n: int, size: int, generator: torch.Generator, grid: int = 4) -> torch.Tensor:
    """``n`` smooth colour fields (n x 3 x size x size), zero mean and unit std each: bilinear upsampled noise."""
    coarse = torch.randn(n, 3, grid, grid, generator=generator)
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    fine = fine - fine.mean(dim=(1, 2, 3), keepdim=True)
    return fine / fine.std(dim=(1, 2, 3), keepdim=True)


def _synthetic_split(n: int, seed: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images: a class template, blended with another class's, shifted, rescaled and noised."""
    num_classes, side, margin = len(_SYNTHETIC_CLASSES), 32, 4
    # The templates come from their own fixed seed so that train and test share them.
    templates = _smooth_noise(num_classes, side + 2 * margin, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    # A share of a random other class (up to 45%) makes some images genuinely ambiguous: high, not perfect accuracy.
    other = (labels + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    mix = 0.45 * torch.rand(n, 1, 1, 1, generator=g)
    shifts = torch.randint(0, 2 * margin + 1, (n, 2), generator=g)
    contrast = 35 + 25 * torch.rand(n, 1, 1, 1, generator=g)
    brightness = 128 + 20 * torch.randn(n, 1, 1, 1, generator=g)
    out = torch.empty(n, 3, side, side, dtype=torch.uint8)
    # In chunks: the float intermediates of a large request would otherwise need gigabytes.
    for lo in range(0, n, chunk):
        s = slice(lo, min(lo + chunk, n))
        m = s.stop - s.start
        blended = (1 - mix[s]) * templates[labels[s]] + mix[s] * templates[other[s]]
        rows = (shifts[s, 0, None] + torch.arange(side))[:, None, :, None]
        cols = (shifts[s, 1, None] + torch.arange(side))[:, None, None, :]
        crops = blended[torch.arange(m)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        pixels = brightness[s] + contrast[s] * crops + 20 * torch.randn(m, 3, side, side, generator=g)
        out[s] = pixels.round().clamp(0, 255).to(torch.uint8)
    return out.numpy(), labels.numpy()


@functools.lru_cache(maxsize=4)
def _synthetic_arrays(n_train: int) -> Arrays:
    x_train, y_train = _synthetic_split(n_train, seed=1)
    x_test, y_test = _synthetic_split(_SYNTHETIC_TEST, seed=2)
    return Arrays(x_train, y_train, x_test, y_test, _SYNTHETIC_CLASSES)


def load_synthetic(root: Path | None, size: int | None) -> Dataset:
    del root  # generated in code: no files
    return from_arrays("synthetic", _synthetic_arrays(size or _SYNTHETIC_TRAIN), None)
