"""The cache of decoded arrays: one uncompressed ``.npz`` per source, written atomically, an unreadable one ignored,
and the temporary files of killed writers removed."""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .. import tempfiles
from .dataset import Arrays
from .locations import cache_dir

log = logging.getLogger(__name__)

# Bump when the decoded arrays would change (decoder, layout), so old cache files are never reused.
CACHE_FORMAT = 1


def read_npz(path: Path) -> Arrays | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = Arrays(z["x_train"], z["y_train"], z["x_test"], z["y_test"], tuple(str(c) for c in z["classes"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        warnings.warn(f"ignoring unreadable cache file '{path}' ({err}); decoding again", stacklevel=4)
        return None
    ok = (arrays.x_train.dtype == np.uint8 and arrays.x_test.dtype == np.uint8
          and len(arrays.x_train) == len(arrays.y_train) and len(arrays.x_test) == len(arrays.y_test))
    if not ok:
        warnings.warn(f"ignoring inconsistent cache file '{path}'; decoding again", stacklevel=4)
        return None
    return arrays


def write_npz(path: Path, arrays: Arrays) -> None:
    """Write ``arrays`` to ``path`` atomically: readers see the old file, no file, or the whole new one."""
    # Named by this process, so that the next load can tell a killed writer's leftover (see remove_stale_caches).
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


def remove_stale_caches() -> None:
    """Remove the temporary cache files that killed processes left (each as large as the data set): those named by
    a process that is gone, and those of versions that named them without one."""
    for path in tempfiles.remove_stale(cache_dir(), ".cifar10-jpeg-*.tmp", unowned="cifar10-jpeg-*.npz.*.tmp"):
        log.info("removed %s, left by a process that ended while writing it", path)
