"""``cifar10-jpeg``: the offline, lossy JPEG copy of CIFAR-10, one ``cifar10-jpeg.tar.xz`` archive (or its unpacked
folder), streamed and decoded once, then read from the cache."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from .cache import CACHE_FORMAT, read_npz, remove_stale_caches, write_npz
from .dataset import SPLITS, Arrays, Dataset, from_arrays
from .decode import decode_all, sigterm_as_exit
from .locations import cache_dir, default_dirs, file_stamp

log = logging.getLogger(__name__)

JPEG_ARCHIVE = "cifar10-jpeg.tar.xz"
_JPEG_FOLDER = "cifar10-jpeg"
_JPEG_SUFFIXES = (".jpg", ".jpeg")


class _JpegSource(NamedTuple):
    kind: str  # "archive" (a tar file, any compression) or "folder" (the unpacked cifar10-jpeg/ folder)
    path: Path


def _is_jpeg_folder(path: Path) -> bool:
    return all((path / split).is_dir() for split in SPLITS)


def _jpeg_source_in(place: Path) -> _JpegSource | None:
    """The archive or unpacked folder that ``place`` is or holds (the archive first), or None."""
    if place.is_file():
        return _JpegSource("archive", place)
    if (place / JPEG_ARCHIVE).is_file():
        return _JpegSource("archive", place / JPEG_ARCHIVE)
    for folder in (place / _JPEG_FOLDER, place):
        if _is_jpeg_folder(folder):
            return _JpegSource("folder", folder)
    return None


def _find_jpeg_source(root: Path | None) -> _JpegSource:
    # An explicit root is the only place looked at: silently reading another copy would hide a wrong path.
    places = [root] if root is not None else default_dirs()
    for place in places:
        source = _jpeg_source_in(place)
        if source is not None:
            return source
    searched = ", ".join(f"'{p}'" for p in places)
    env = os.environ.get("UNITLIB_DATA")
    raise FileNotFoundError(
        f"{JPEG_ARCHIVE} (or its unpacked '{_JPEG_FOLDER}/' folder) not found; searched {searched}"
        + ("" if root is not None else f" (UNITLIB_DATA is {'set to ' + repr(env) if env else 'not set'})")
        + f". To fix: pass root= a directory holding {JPEG_ARCHIVE} or '{_JPEG_FOLDER}/', or the archive's path; "
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
    if len(parts) < 3 or parts[-3] not in SPLITS or not parts[-1].lower().endswith(_JPEG_SUFFIXES):
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
                         f"replace it with an intact copy of {JPEG_ARCHIVE}") from err


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for split in SPLITS for p in (folder / split).glob("*/*")
                  if p.is_file() and p.suffix.lower() in _JPEG_SUFFIXES)


def _folder_entries(files: list[Path]) -> Iterator[tuple[tuple[str, str, str], bytes]]:
    for p in files:
        yield (p.parent.parent.name, p.parent.name, p.name), p.read_bytes()


def _file_order(name: str) -> tuple[int, int, str]:
    # Numeric names in numeric order (0000.jpg, 0001.jpg, ...; also unpadded ones), any others after, by name.
    stem = name.rsplit(".", 1)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _assemble(keys: list[tuple[str, str, str]], images: np.ndarray, where: str) -> Arrays:
    """Arrays in class order (folder names, alphabetical), each class's files in name order."""
    classes = {split: sorted({c for s, c, _ in keys if s == split}) for split in SPLITS}
    if not classes["train"]:
        raise ValueError(f"{where}: no images in the layout {_JPEG_FOLDER}/{{train,test}}/<class>/NNNN.jpg")
    if classes["train"] != classes["test"]:
        raise ValueError(f"{where}: train classes {classes['train']} differ from test classes {classes['test']}")
    index = {c: i for i, c in enumerate(classes["train"])}
    out = {}
    for split in SPLITS:
        rows = [i for i, k in enumerate(keys) if k[0] == split]
        rows.sort(key=lambda i: (index[keys[i][1]], _file_order(keys[i][2])))
        out[f"x_{split}"] = np.ascontiguousarray(images[rows].transpose(0, 3, 1, 2))
        out[f"y_{split}"] = np.array([index[keys[i][1]] for i in rows], dtype=np.int64)
    return Arrays(**out, classes=tuple(classes["train"]))


@functools.lru_cache(maxsize=2)
def _jpeg_arrays(kind: str, path: str, stamp: object) -> Arrays:
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
    cache = cache_dir() / f"cifar10-jpeg-v{CACHE_FORMAT}-{digest[:20]}.npz"
    if cache.is_file():
        arrays = read_npz(cache)
        if arrays is not None:
            return arrays
    log.info("decoding %s once; cache: %s", source, cache)
    with sigterm_as_exit():
        if kind == "archive":
            keys, images = decode_all(_archive_entries(source), None, f"decoding {source.name}")
        else:
            keys, images = decode_all(_folder_entries(files), len(files), f"decoding {source.name}/")
        arrays = _assemble(keys, images, str(source))
        write_npz(cache, arrays)
    return arrays


def load_cifar10_jpeg(root: Path | None, size: int | None) -> Dataset:
    source = _find_jpeg_source(root)
    remove_stale_caches()
    resolved = source.path.resolve()
    if source.kind == "archive":
        stamp: object = file_stamp(resolved)
    else:  # every file's size and time: the folder's own mtime misses edits inside class folders
        stamp = tuple(file_stamp(p)[1:] for p in _folder_files(resolved))
    return from_arrays("cifar10-jpeg", _jpeg_arrays(source.kind, str(resolved), stamp), size)
