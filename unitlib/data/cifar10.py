"""``cifar10``: the original CIFAR-10 in torchvision's python-pickle layout (unpickled with only the numpy globals
an array needs), downloaded through torchvision where there is internet."""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .cifar10_jpeg import JPEG_ARCHIVE
from .dataset import SPLITS, Arrays, Dataset, from_arrays
from .locations import cache_dir, default_dirs, file_stamp

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_META = "batches.meta"


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], object]:
    """The globals a CIFAR-10 batch may name: what rebuilds a numpy array, under numpy 1.x and 2.x module names."""
    import _codecs

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 1.26 has no numpy._core
        from numpy.core import multiarray, numeric
    table: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Bytes pickled at protocol < 3 (python 2 files, python 3 files written with protocol 2) go through this.
        ("_codecs", "encode"): _codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        if hasattr(numeric, "_frombuffer"):  # arrays pickled at protocol 5
            table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches and nothing else: only the numpy globals that rebuild an array are allowed.

    A pickle can call any importable function while loading, so a tampered batch file could run code; refusing
    every other global closes that door.
    """

    def find_class(self, module: str, name: str) -> object:
        obj = _allowed_globals().get((module, name))
        if obj is None:
            valid = ", ".join(f"{m}.{n}" for m, n in _allowed_globals())
            raise pickle.UnpicklingError(f"refusing to unpickle global '{module}.{name}': a CIFAR-10 batch needs "
                                         f"only numpy arrays (allowed globals: {valid})")
        return obj


def _read_batch(path: Path) -> dict[str, object]:
    """One CIFAR-10 pickle batch as a dict with str keys (python 2 files have byte-string keys)."""
    try:
        with open(path, "rb") as f:
            # latin1 turns python 2 byte strings (the array data among them) back into the bytes they were.
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(f"{path}: {err}") from None
    if not isinstance(batch, dict):
        raise TypeError(f"{path}: expected a dict, got {type(batch).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in batch.items()}


def _read_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_batch(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be a uint8 array of N x 3072, got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but 'labels' has shape {labels.shape}")
    # Each row holds the red, green and blue planes one after another, each 32 x 32 row-major: C x H x W already.
    return data.reshape(-1, 3, 32, 32), labels


def _find_cifar10(dirs: Iterable[Path]) -> Path | None:
    for d in dirs:
        for candidate in (d / _CIFAR_FOLDER, d):
            if all((candidate / f).is_file() for f in (*_CIFAR_TRAIN, _CIFAR_TEST, _CIFAR_META)):
                return candidate
    return None


def _download_cifar10(target: Path) -> None:
    """Download and unpack the original CIFAR-10 into ``target`` through torchvision (needs internet)."""
    import torchvision.datasets

    target.mkdir(parents=True, exist_ok=True)
    torchvision.datasets.CIFAR10(str(target), train=True, download=True)


@functools.lru_cache(maxsize=2)
def _cifar10_arrays(folder: str, stamps: tuple[tuple[str, int, int], ...]) -> Arrays:
    del stamps  # part of the cache key only: a changed file means a fresh read
    d = Path(folder)
    train = [_read_images(d / f) for f in _CIFAR_TRAIN]
    x_test, y_test = _read_images(d / _CIFAR_TEST)
    names = _read_batch(d / _CIFAR_META).get("label_names")
    if not isinstance(names, list) or not names:
        raise ValueError(f"{d / _CIFAR_META}: expected a non-empty list under 'label_names', got {names!r}")
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    arrays = Arrays(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                     x_test, y_test, classes)
    for split in SPLITS:
        y = getattr(arrays, f"y_{split}")
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"{d}: {split} labels outside 0..{len(classes) - 1}")
    return arrays


def load_cifar10(root: Path | None, size: int | None) -> Dataset:
    # Without a root, a download goes to $UNITLIB_DATA, else the cache; searched too, so it is found next time.
    target = root if root is not None else Path(os.environ.get("UNITLIB_DATA") or cache_dir())
    dirs = [root] if root is not None else list(dict.fromkeys([*default_dirs(), target]))
    folder = _find_cifar10(dirs)
    if folder is None:
        try:
            _download_cifar10(target)
        except Exception as err:  # torchvision raises URLError, OSError, RuntimeError... all mean "no copy"
            searched = ", ".join(f"'{d}'" for d in dirs)
            raise FileNotFoundError(
                f"the original CIFAR-10 ('{_CIFAR_FOLDER}/' with data_batch_1..5, {_CIFAR_TEST}, {_CIFAR_META}) "
                f"is not in {searched}, and downloading it into '{target}' through torchvision "
                f"failed ({type(err).__name__}: {err}). To fix: run where there is internet access, so "
                f"load('cifar10') downloads it; or put an existing '{_CIFAR_FOLDER}' folder in one of those "
                f"directories (or pass its parent as root=, or set UNITLIB_DATA); or, offline, use "
                f"load('cifar10-jpeg') with the archive {JPEG_ARCHIVE} (a lossy JPEG copy)."
            ) from err
        folder = _find_cifar10([target])
        if folder is None:
            raise FileNotFoundError(f"torchvision reported a download into '{target}' but '{_CIFAR_FOLDER}' with "
                                    f"all batch files is not there; delete '{target / _CIFAR_FOLDER}' and retry")
    stamps = tuple(file_stamp(folder / f) for f in (*_CIFAR_TRAIN, _CIFAR_TEST, _CIFAR_META))
    return from_arrays("cifar10", _cifar10_arrays(str(folder.resolve()), stamps), size)
