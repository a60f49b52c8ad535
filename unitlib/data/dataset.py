"""The data set as uint8 tensors (:class:`Dataset`), the decoded arrays a loader returns, and images as floats."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .splits import balanced_subset

SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False, repr=False)  # eq on tensors is ambiguous; repr would print every pixel
class Dataset:
    """A labelled image data set: uint8 images (N x C x H x W) with int64 labels, train and test splits."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        for split in SPLITS:
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{self.name}: x_{split} must be uint8 N x C x H x W, got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise ValueError(f"{self.name}: y_{split} must be int64 with one label per image "
                                 f"({len(x)}), got {y.dtype} {tuple(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise ValueError(f"{self.name}: y_{split} has labels outside 0..{len(self.classes) - 1}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train images are {tuple(self.x_train.shape[1:])}, "
                             f"test images {tuple(self.x_test.shape[1:])}")

    @functools.cached_property
    def digest(self) -> str:
        """sha256 over every image and label of both splits (shapes and dtypes included): what a cached model and a
        record were made from, whatever the data set's name."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's shape: channels, height, width."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
                f"shape={self.shape}, classes={self.classes})")


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1] from uint8 in [0, 255]."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {x_uint8.dtype}")
    return x_uint8.to(torch.float32).div_(255)


class Arrays(NamedTuple):
    """A decoded data set as numpy arrays (N x C x H x W uint8 images, int64 labels)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


def from_arrays(name: str, arrays: Arrays, size: int | None) -> Dataset:
    """A ``Dataset`` holding copies of ``arrays``, the training set cut to a balanced ``size`` (seed 0)."""
    x_train, y_train = arrays.x_train, arrays.y_train
    if size is not None:
        if size > len(y_train):
            raise ValueError(f"size={size} exceeds the {len(y_train)} training images of {name}")
        idx = balanced_subset(torch.from_numpy(y_train), size, torch.Generator().manual_seed(0)).numpy()
        x_train, y_train = x_train[idx], y_train[idx]
    # Copies: the arrays are cached for the whole process, and attacks modify training images in place.
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.array(x_train, copy=True)),
        y_train=torch.from_numpy(np.array(y_train, dtype=np.int64, copy=True)),
        x_test=torch.from_numpy(np.array(arrays.x_test, copy=True)),
        y_test=torch.from_numpy(np.array(arrays.y_test, dtype=np.int64, copy=True)),
        classes=tuple(arrays.classes),
    )
