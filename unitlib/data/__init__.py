"""Data sets as uint8 tensors, and the class-balanced index splits the attacks and defenses draw from.

Three data sets, all N x C x H x W uint8 with int64 labels:

- ``cifar10``: the original CIFAR-10 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", tech.
  report, 2009) in torchvision's python-pickle layout, downloaded through torchvision where there is internet.
- ``cifar10-jpeg``: an offline, LOSSY copy of CIFAR-10 as 60,000 JPEG files in one ``cifar10-jpeg.tar.xz``
  archive. Decoded once, then cached as an ``.npz``. Results computed on it must name it, never plain ``cifar10``.
- ``synthetic``: ten classes generated in code, learnable by a tiny CNN in seconds, for tests and smoke runs.

One module per concern: :mod:`.dataset` (the tensors), :mod:`.splits` (balanced subsets, the defender's split),
:mod:`.locations` (where data are found and cached), :mod:`.cache` (decoded arrays on disk), :mod:`.decode` (JPEG
decoding in worker processes), and one module per data set (:mod:`.cifar10`, :mod:`.cifar10_jpeg`,
:mod:`.synthetic`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .cifar10 import load_cifar10
from .cifar10_jpeg import load_cifar10_jpeg
from .dataset import Dataset, to_float
from .locations import cache_dir
from .splits import balanced_subset, defense_split
from .synthetic import load_synthetic

__all__ = ["DATASETS", "Dataset", "balanced_subset", "cache_dir", "defense_split", "load", "to_float"]

DATASETS = ("cifar10", "cifar10-jpeg", "synthetic")


def load(name: str, root: str | os.PathLike | None = None, *, size: int | None = None) -> Dataset:
    """Load the data set ``name`` (one of ``DATASETS``) as uint8 tensors.

    ``root`` says where the files are (ignored by ``synthetic``); without it, ``$UNITLIB_DATA`` and then
    ``../shared/data`` beside the repository are searched. ``size`` sets the number of training images: a
    class-balanced subset drawn with seed 0 for the real data sets (the test set stays whole), the number generated
    for ``synthetic``. Each call returns fresh tensors, so modifying them in place never affects a later load.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int (number of training images) or None, got {size!r}")
    return _LOADERS[name](Path(root).expanduser() if root is not None else None, size)


_LOADERS: dict[str, Callable[[Path | None, int | None], Dataset]] = {
    "cifar10": load_cifar10,
    "cifar10-jpeg": load_cifar10_jpeg,
    "synthetic": load_synthetic,
}

assert tuple(_LOADERS) == DATASETS
