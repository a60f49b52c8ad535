"""Data sets as uint8 tensors, and the class-balanced index splits the attacks and defenses draw from.

Three data sets, all N x C x H x W uint8 with int64 labels:

- ``cifar10``: the original CIFAR-10 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", tech.
  report, 2009) in torchvision's python-pickle layout, downloaded through torchvision where there is internet.
- ``cifar10-jpeg``: an offline, LOSSY copy of CIFAR-10 as 60,000 JPEG files in one ``cifar10-jpeg.tar.xz``
  archive. Decoded once, then cached as an ``.npz``. Results computed on it must name it, never plain ``cifar10``.
- ``synthetic``: ten classes generated in code, learnable by a tiny CNN in seconds, for tests and smoke runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import io
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import tarfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import tempfiles

__all__ = ["DATASETS", "Dataset", "balanced_subset", "cache_dir", "defense_split", "load", "to_float"]

DATASETS = ("cifar10", "cifar10-jpeg", "synthetic")

log = logging.getLogger(__name__)

# The repository root is the parent of the package directory; the shared data folder sits beside it.
_REPO_ROOT = Path(__file__).resolve().parent.parent
_SHARED_DATA_DIR = _REPO_ROOT.parent / "shared" / "data"

_JPEG_ARCHIVE = "cifar10-jpeg.tar.xz"
_JPEG_FOLDER = "cifar10-jpeg"
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_SPLITS = ("train", "test")
# Bump when the decoded arrays would change (decoder, layout), so old cache files are never reused.
_CACHE_FORMAT = 1
# Images per task sent to a decoding worker; a pool starts only once the first chunk is full, so tiny archives
# never pay for starting processes.
_DECODE_CHUNK = 1000
_PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_META = "batches.meta"

_SYNTHETIC_TRAIN = 2000
_SYNTHETIC_TEST = 500
_SYNTHETIC_CLASSES = tuple(f"pattern{i}" for i in range(10))


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
        for split in _SPLITS:
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


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1] from uint8 in [0, 255]."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {x_uint8.dtype}")
    return x_uint8.to(torch.float32).div_(255)


def balanced_subset(
    y: torch.Tensor, n: int, generator: torch.Generator, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """``n`` sorted indices into ``y``, as equal per class as possible, none in ``exclude``, drawn with ``generator``.

    A class with too few samples left after ``exclude`` gives all it has and the others make up the difference;
    which classes get the remainder when ``n`` does not divide evenly is drawn at random too.
    """
    y = _check_labels(y)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    available = ~_exclusion_mask(exclude, len(y))
    classes = torch.unique(y)
    pools = [torch.nonzero((y == c) & available).flatten() for c in classes]
    caps = torch.tensor([len(p) for p in pools], dtype=torch.int64)
    if n > int(caps.sum()):
        raise ValueError(f"n={n} but only {int(caps.sum())} samples are available "
                         f"({len(y)} in total, {len(y) - int(caps.sum())} excluded)")
    quota = _water_fill(caps, n, generator)
    picked = [pool[torch.randperm(len(pool), generator=generator)[:q]]
              for pool, q in zip(pools, quota.tolist(), strict=True)]
    return torch.sort(torch.cat(picked)).values


def defense_split(
    y: torch.Tensor, clean_fraction: float, *, exclude: torch.Tensor | None, seed: int, val_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's clean data, split into (optimise, validate) sorted index tensors.

    The defender holds ``round(clean_fraction * len(y))`` training samples, balanced per class and never any index
    in ``exclude`` (the poisoned samples); each class's share is split so that ``val_fraction`` of it validates.
    """
    y = _check_labels(y)
    _check_fraction("clean_fraction", clean_fraction)
    _check_fraction("val_fraction", val_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    n_clean = round(clean_fraction * len(y))
    if n_clean < 1:
        raise ValueError(f"clean_fraction={clean_fraction} of {len(y)} training samples is no sample at all")
    generator = torch.Generator().manual_seed(seed)
    clean = balanced_subset(y, n_clean, generator, exclude)
    optimise, validate = [], []
    for c in torch.unique(y).tolist():
        members = clean[y[clean] == c]
        if len(members) < 2:
            raise ValueError(f"clean_fraction={clean_fraction} gives {len(members)} clean sample(s) of class {c}; "
                             "each class needs at least 2 (one to optimise, one to validate): raise clean_fraction")
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        validate.append(members[:n_val])
        optimise.append(members[n_val:])
    return torch.sort(torch.cat(optimise)).values, torch.sort(torch.cat(validate)).values


# --------------------------------------------------------------------------------------------------- helpers


class _Arrays(NamedTuple):
    """A decoded data set as numpy arrays (N x C x H x W uint8 images, int64 labels)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


def _check_labels(y: torch.Tensor) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"labels must be a 1-D integer tensor, got {getattr(y, 'dtype', type(y))} "
                        f"{tuple(getattr(y, 'shape', ()))}")
    return y.to(torch.int64)


def _check_fraction(label: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{label} must be a fraction strictly between 0 and 1, got {value!r}")


def _exclusion_mask(exclude: torch.Tensor | None, n: int) -> torch.Tensor:
    """A bool mask of the excluded samples, from indices (or from a bool mask of length ``n``)."""
    mask = torch.zeros(n, dtype=torch.bool)
    if exclude is None:
        return mask
    exclude = torch.as_tensor(exclude)
    if exclude.numel() == 0:  # also an empty list, which torch reads as float
        return mask
    if exclude.dtype == torch.bool:
        if exclude.shape != (n,):
            raise ValueError(f"exclude as a bool mask must have shape ({n},), got {tuple(exclude.shape)}")
        return exclude.clone()
    if exclude.dtype.is_floating_point:
        raise TypeError(f"exclude must hold integer indices (or be a bool mask), got {exclude.dtype}")
    exclude = exclude.flatten().to(torch.int64)
    if len(exclude) and (int(exclude.min()) < 0 or int(exclude.max()) >= n):
        raise ValueError(f"exclude holds indices outside 0..{n - 1} "
                         f"(min {int(exclude.min())}, max {int(exclude.max())})")
    mask[exclude] = True
    return mask


def _water_fill(caps: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Per-class counts summing to ``n``, each at most its cap, as equal as the caps allow."""
    quota = torch.zeros_like(caps)
    remaining = n
    while remaining:
        open_ = torch.nonzero(quota < caps).flatten()
        share = remaining // len(open_)
        if share == 0:
            # Fewer samples left than open classes: a random subset of them gets one more.
            lucky = open_[torch.randperm(len(open_), generator=generator)[:remaining]]
            quota[lucky] += 1
            break
        grant = torch.minimum(caps[open_] - quota[open_], torch.tensor(share))
        quota[open_] += grant
        remaining -= int(grant.sum())
    return quota


def _tensors(name: str, arrays: _Arrays, size: int | None) -> Dataset:
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


def cache_dir() -> Path:
    """Where decoded data and trained models are cached: ``$UNITLIB_CACHE`` or ``~/.cache/unitlib``."""
    return Path(os.environ.get("UNITLIB_CACHE") or Path.home() / ".cache" / "unitlib").expanduser()


def _default_dirs() -> list[Path]:
    """Where data are searched without an explicit root: ``$UNITLIB_DATA``, then the shared data folder."""
    env = os.environ.get("UNITLIB_DATA")
    return ([Path(env).expanduser()] if env else []) + [_SHARED_DATA_DIR]


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------------------------ cifar10 (original)


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
def _cifar10_arrays(folder: str, stamps: tuple[tuple[str, int, int], ...]) -> _Arrays:
    del stamps  # part of the cache key only: a changed file means a fresh read
    d = Path(folder)
    train = [_read_images(d / f) for f in _CIFAR_TRAIN]
    x_test, y_test = _read_images(d / _CIFAR_TEST)
    names = _read_batch(d / _CIFAR_META).get("label_names")
    if not isinstance(names, list) or not names:
        raise ValueError(f"{d / _CIFAR_META}: expected a non-empty list under 'label_names', got {names!r}")
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    arrays = _Arrays(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                     x_test, y_test, classes)
    for split in _SPLITS:
        y = getattr(arrays, f"y_{split}")
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"{d}: {split} labels outside 0..{len(classes) - 1}")
    return arrays


def _load_cifar10(root: Path | None, size: int | None) -> Dataset:
    # Without a root, a download goes to $UNITLIB_DATA, else the cache; searched too, so it is found next time.
    target = root if root is not None else Path(os.environ.get("UNITLIB_DATA") or cache_dir())
    dirs = [root] if root is not None else list(dict.fromkeys([*_default_dirs(), target]))
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
                f"load('cifar10-jpeg') with the archive {_JPEG_ARCHIVE} (a lossy JPEG copy)."
            ) from err
        folder = _find_cifar10([target])
        if folder is None:
            raise FileNotFoundError(f"torchvision reported a download into '{target}' but '{_CIFAR_FOLDER}' with "
                                    f"all batch files is not there; delete '{target / _CIFAR_FOLDER}' and retry")
    stamps = tuple(_stamp(folder / f) for f in (*_CIFAR_TRAIN, _CIFAR_TEST, _CIFAR_META))
    return _tensors("cifar10", _cifar10_arrays(str(folder.resolve()), stamps), size)


# ------------------------------------------------------------------------------------ cifar10-jpeg (offline)


class _JpegSource(NamedTuple):
    kind: str  # "archive" (a tar file, any compression) or "folder" (the unpacked cifar10-jpeg/ folder)
    path: Path


def _is_jpeg_folder(path: Path) -> bool:
    return all((path / split).is_dir() for split in _SPLITS)


def _jpeg_source_in(place: Path) -> _JpegSource | None:
    """The archive or unpacked folder that ``place`` is or holds (the archive first), or None."""
    if place.is_file():
        return _JpegSource("archive", place)
    if (place / _JPEG_ARCHIVE).is_file():
        return _JpegSource("archive", place / _JPEG_ARCHIVE)
    for folder in (place / _JPEG_FOLDER, place):
        if _is_jpeg_folder(folder):
            return _JpegSource("folder", folder)
    return None


def _find_jpeg_source(root: Path | None) -> _JpegSource:
    # An explicit root is the only place looked at: silently reading another copy would hide a wrong path.
    places = [root] if root is not None else _default_dirs()
    for place in places:
        source = _jpeg_source_in(place)
        if source is not None:
            return source
    searched = ", ".join(f"'{p}'" for p in places)
    env = os.environ.get("UNITLIB_DATA")
    raise FileNotFoundError(
        f"{_JPEG_ARCHIVE} (or its unpacked '{_JPEG_FOLDER}/' folder) not found; searched {searched}"
        + ("" if root is not None else f" (UNITLIB_DATA is {'set to ' + repr(env) if env else 'not set'})")
        + f". To fix: pass root= a directory holding {_JPEG_ARCHIVE} or '{_JPEG_FOLDER}/', or the archive's path; "
        f"or set the UNITLIB_DATA environment variable to such a directory; or, with internet access, use "
        f"load('cifar10') for the original CIFAR-10 through torchvision."
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _split_key(name: str) -> tuple[str, str, str] | None:
    """(split, class, file name) for an image at ``.../{train,test}/<class>/<file>.jpg``, else None."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if len(parts) < 3 or parts[-3] not in _SPLITS or not parts[-1].lower().endswith(_JPEG_SUFFIXES):
        return None
    return parts[-3], parts[-2], parts[-1]


def _archive_entries(path: Path) -> Iterator[tuple[tuple[str, str, str], bytes]]:
    # Stream mode reads the archive once, front to back; members are read as bytes, never extracted to disk.
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                key = _split_key(member.name) if member.isfile() else None
                if key is not None:
                    f = tf.extractfile(member)
                    assert f is not None  # a regular file always has data
                    yield key, f.read()
    except (tarfile.TarError, EOFError, OSError) as err:  # lzma and gzip report damage as OSError / EOFError
        raise ValueError(f"'{path}' is not a readable tar archive ({type(err).__name__}: {err}); "
                         f"replace it with an intact copy of {_JPEG_ARCHIVE}") from err


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for split in _SPLITS for p in (folder / split).glob("*/*")
                  if p.is_file() and p.suffix.lower() in _JPEG_SUFFIXES)


def _folder_entries(files: list[Path]) -> Iterator[tuple[tuple[str, str, str], bytes]]:
    for p in files:
        yield (p.parent.parent.name, p.parent.name, p.name), p.read_bytes()


def _decode_jpegs(names: list[str], blobs: list[bytes]) -> np.ndarray:
    """Decode JPEG files to one uint8 array, N x H x W x 3 (RGB); every image must have the first one's size."""
    images = []
    for name, blob in zip(names, blobs, strict=True):
        try:
            with Image.open(io.BytesIO(blob), formats=("JPEG",)) as im:
                rgb = np.asarray(im.convert("RGB"))
        except Exception as err:
            raise ValueError(f"cannot decode '{name}' as a JPEG image: {err}") from err
        if images and rgb.shape != images[0].shape:
            raise ValueError(f"'{name}' is {rgb.shape[1]} x {rgb.shape[0]} pixels but '{names[0]}' is "
                             f"{images[0].shape[1]} x {images[0].shape[0]}: all images must have one size")
        images.append(rgb)
    return np.stack(images)


def _start_pool() -> ProcessPoolExecutor | None:
    """Worker processes for decoding, or None where a pool would not pay off or is unavailable."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    # Linux fork only: spawn would re-run an unguarded script's top level (and import torch) in every worker,
    # and fork is unsafe on macOS.
    if cores < 2 or not sys.platform.startswith("linux"):
        return None
    # A forked child inherits other threads' locks but not the threads: in a process that runs threads (a Jupyter
    # kernel's I/O threads, say) a child can wait forever on a lock that nothing will release. Decode in-process there.
    # (tqdm's monitor thread is harmless: the children never touch tqdm.)
    from tqdm._monitor import TMonitor

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not isinstance(t, TMonitor)]
    if others:
        log.info("decoding in this process: %d other thread(s) running, forking would be unsafe", len(others))
        return None
    try:
        return ProcessPoolExecutor(max_workers=min(cores, 8), mp_context=multiprocessing.get_context("fork"),
                                   initializer=_die_with_parent, initargs=(os.getpid(),))
    except (OSError, ValueError) as err:
        log.warning("decoding in this process: cannot start worker processes (%s)", err)
        return None


def _die_with_parent(parent: int) -> None:
    """Run first in each decoding worker: the worker ends when the process that started it does, however that one
    ends (a SIGKILL included, which runs no clean-up), instead of waiting forever on the task queue."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # Linux: the kernel kills this process when its parent dies
    except (OSError, AttributeError) as err:
        log.warning("decoding worker %d: cannot ask to end with its parent (%s)", os.getpid(), err)
    if os.getppid() != parent:  # the parent was gone before the request took effect
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (_sigterm_as_exit), if it had one


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While decoding and writing the cache, SIGTERM (a plain ``kill``) raises SystemExit in the main thread, so the
    worker pool is shut down and the temporary cache file removed as for Ctrl-C. A handler someone else installed is
    left alone, as is every thread but the main one (only it can install a handler)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    received: list[int] = []

    def exit_(signum: int, frame: object) -> None:
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if received:  # the SystemExit was raised inside a finaliser, which Python ignores: end now
        raise SystemExit(128 + received[0])


def _interactive() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _decode_all(entries: Iterable[tuple[tuple[str, str, str], bytes]], total: int | None,
                desc: str) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """Decode every entry: keys in input order and their images (N x H x W x 3), chunks spread over processes."""
    keys: list[tuple[str, str, str]] = []
    parts: list[np.ndarray | Future] = []
    pool: ProcessPoolExecutor | None = None
    started = False
    chunk: list[tuple[tuple[str, str, str], bytes]] = []
    unseen: dict[int, int] = {}  # position in ``parts`` -> images, for chunks not yet counted on the bar

    def show_finished(bar: tqdm) -> None:
        for i in [i for i in unseen if not isinstance(parts[i], Future) or parts[i].done()]:
            bar.update(unseen.pop(i))

    def flush(bar: tqdm) -> None:
        nonlocal pool, started
        names = ["/".join(k) for k, _ in chunk]
        blobs = [b for _, b in chunk]
        keys.extend(k for k, _ in chunk)
        if not started and len(chunk) == _DECODE_CHUNK:
            pool, started = _start_pool(), True
        parts.append(pool.submit(_decode_jpegs, names, blobs) if pool else _decode_jpegs(names, blobs))
        unseen[len(parts) - 1] = len(blobs)
        chunk.clear()
        show_finished(bar)

    # A progress bar for a person at a terminal only: in a notebook, a log or CI it would be a page of debris.
    with tqdm(total=total, desc=desc, unit="img", disable=not _interactive()) as bar:
        try:
            for entry in entries:
                chunk.append(entry)
                if len(chunk) == _DECODE_CHUNK:
                    flush(bar)
            if chunk:
                flush(bar)
            arrays = []
            for p in parts:
                arrays.append(p.result() if isinstance(p, Future) else p)
                show_finished(bar)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    if not arrays:
        return keys, np.zeros((0, 0, 0, 3), np.uint8)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{desc}: images of several sizes ({sorted(shapes)}); all images must have one size")
    return keys, np.concatenate(arrays)


def _file_order(name: str) -> tuple[int, int, str]:
    # Numeric names in numeric order (0000.jpg, 0001.jpg, ...; also unpadded ones), any others after, by name.
    stem = name.rsplit(".", 1)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _assemble(keys: list[tuple[str, str, str]], images: np.ndarray, where: str) -> _Arrays:
    """Arrays in class order (folder names, alphabetical), each class's files in name order."""
    classes = {split: sorted({c for s, c, _ in keys if s == split}) for split in _SPLITS}
    if not classes["train"]:
        raise ValueError(f"{where}: no images in the layout {_JPEG_FOLDER}/{{train,test}}/<class>/NNNN.jpg")
    if classes["train"] != classes["test"]:
        raise ValueError(f"{where}: train classes {classes['train']} differ from test classes {classes['test']}")
    index = {c: i for i, c in enumerate(classes["train"])}
    out = {}
    for split in _SPLITS:
        rows = [i for i, k in enumerate(keys) if k[0] == split]
        rows.sort(key=lambda i: (index[keys[i][1]], _file_order(keys[i][2])))
        out[f"x_{split}"] = np.ascontiguousarray(images[rows].transpose(0, 3, 1, 2))
        out[f"y_{split}"] = np.array([index[keys[i][1]] for i in rows], dtype=np.int64)
    return _Arrays(**out, classes=tuple(classes["train"]))


def _read_npz(path: Path) -> _Arrays | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = _Arrays(z["x_train"], z["y_train"], z["x_test"], z["y_test"], tuple(str(c) for c in z["classes"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        warnings.warn(f"ignoring unreadable cache file '{path}' ({err}); decoding again", stacklevel=4)
        return None
    ok = (arrays.x_train.dtype == np.uint8 and arrays.x_test.dtype == np.uint8
          and len(arrays.x_train) == len(arrays.y_train) and len(arrays.x_test) == len(arrays.y_test))
    if not ok:
        warnings.warn(f"ignoring inconsistent cache file '{path}'; decoding again", stacklevel=4)
        return None
    return arrays


def _write_npz(path: Path, arrays: _Arrays) -> None:
    """Write ``arrays`` to ``path`` atomically: readers see the old file, no file, or the whole new one."""
    # Named by this process, so that the next load can tell a killed writer's leftover (see _remove_stale_caches).
    tmp = tempfiles.temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")
    except OSError as err:
        warnings.warn(f"cannot write the cache '{path}' ({err}): the next process decodes again; "
                      f"set UNITLIB_CACHE to a writable directory", stacklevel=4)
        return
    try:
        with f:
            # Uncompressed: reading it back is then a plain copy (zlib would cost about a second per load).
            np.savez(f, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test,
                     y_test=arrays.y_test, classes=np.array(arrays.classes, dtype=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_caches() -> None:
    """Remove the temporary cache files that killed processes left (each as large as the data set): those named by
    a process that is gone, and those of versions that named them without one."""
    for path in tempfiles.remove_stale(cache_dir(), ".cifar10-jpeg-*.tmp", unowned="cifar10-jpeg-*.npz.*.tmp"):
        log.info("removed %s, left by a process that ended while writing it", path)


@functools.lru_cache(maxsize=2)
def _jpeg_arrays(kind: str, path: str, stamp: object) -> _Arrays:
    """The decoded JPEG data set: from the ``.npz`` cache when it matches the source, else decoded and cached."""
    del stamp  # part of the in-process cache key only
    source = Path(path)
    if kind == "archive":
        digest = _sha256(source)
        files: list[Path] = []
    else:
        files = _folder_files(source)
        listing = "\n".join(f"{p.relative_to(source).as_posix()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                            for p in files)
        digest = "dir-" + hashlib.sha256(listing.encode()).hexdigest()
    # Named by the content (archive) or listing (folder) hash, so a changed source never meets a stale cache.
    cache = cache_dir() / f"cifar10-jpeg-v{_CACHE_FORMAT}-{digest[:20]}.npz"
    if cache.is_file():
        arrays = _read_npz(cache)
        if arrays is not None:
            return arrays
    log.info("decoding %s once; cache: %s", source, cache)
    with _sigterm_as_exit():
        if kind == "archive":
            keys, images = _decode_all(_archive_entries(source), None, f"decoding {source.name}")
        else:
            keys, images = _decode_all(_folder_entries(files), len(files), f"decoding {source.name}/")
        arrays = _assemble(keys, images, str(source))
        _write_npz(cache, arrays)
    return arrays


def _load_cifar10_jpeg(root: Path | None, size: int | None) -> Dataset:
    source = _find_jpeg_source(root)
    _remove_stale_caches()
    resolved = source.path.resolve()
    if source.kind == "archive":
        stamp: object = _stamp(resolved)
    else:  # every file's size and time: the folder's own mtime misses edits inside class folders
        stamp = tuple(_stamp(p)[1:] for p in _folder_files(resolved))
    return _tensors("cifar10-jpeg", _jpeg_arrays(source.kind, str(resolved), stamp), size)


# ------------------------------------------------------------------------------------ synthetic


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
def _synthetic_arrays(n_train: int) -> _Arrays:
    x_train, y_train = _synthetic_split(n_train, seed=1)
    x_test, y_test = _synthetic_split(_SYNTHETIC_TEST, seed=2)
    return _Arrays(x_train, y_train, x_test, y_test, _SYNTHETIC_CLASSES)


def _load_synthetic(root: Path | None, size: int | None) -> Dataset:
    del root  # generated in code: no files
    return _tensors("synthetic", _synthetic_arrays(size or _SYNTHETIC_TRAIN), None)


_LOADERS: dict[str, Callable[[Path | None, int | None], Dataset]] = {
    "cifar10": _load_cifar10,
    "cifar10-jpeg": _load_cifar10_jpeg,
    "synthetic": _load_synthetic,
}
assert tuple(_LOADERS) == DATASETS
