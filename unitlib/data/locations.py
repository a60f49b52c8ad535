"""Where the data sets are looked for (``root=``, ``$UNITLIB_DATA``, ``../shared/data``) and where decoded data and
trained models are cached (``$UNITLIB_CACHE``)."""

from __future__ import annotations

import os
from pathlib import Path

# The repository root holds the package (this file is unitlib/data/locations.py); the shared data folder sits
# beside it.
_REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA_DIR = _REPO_ROOT.parent / "shared" / "data"


def cache_dir() -> Path:
    """Where decoded data and trained models are cached: ``$UNITLIB_CACHE`` or ``~/.cache/unitlib``."""
    return Path(os.environ.get("UNITLIB_CACHE") or Path.home() / ".cache" / "unitlib").expanduser()


def default_dirs() -> list[Path]:
    """Where data are searched without an explicit root: ``$UNITLIB_DATA``, then the shared data folder."""
    env = os.environ.get("UNITLIB_DATA")
    return ([Path(env).expanduser()] if env else []) + [SHARED_DATA_DIR]


def file_stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns
