"""Temporary files of a killed process. Every cache, record, checkpoint and executed notebook is written to a
temporary file beside its destination and moved into place, so a reader never sees half a file; the temporary name
carries the writer's process id (``.<name>.<pid>.tmp``, ``.<name>.<pid>.<thread>.tmp``), so that a later process can
tell the leftovers of a dead writer from the file of a live one and remove them."""

from __future__ import annotations

import fnmatch
import os
import re
import time
from pathlib import Path

# When this process started (to the import of the library): a leftover is older than the run that removes it.
STARTED = time.time()
# A file with no process id in its name is taken for a leftover only once it has not changed for this long: a writer
# that is alive keeps changing its file.
QUIET_SECONDS = 600.0
_PID = re.compile(r"\.(\d+)(?:\.\d+)?\.tmp(?:\.ipynb)?$")


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """The temporary file beside ``path`` that this process writes before moving it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


def alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):  # not a valid process id at all
        return False
    return True


def remove_stale(directory: str | os.PathLike, pattern: str = "*.tmp*", *, unowned: str | None = None) -> list[Path]:
    """Remove the temporary files in ``directory`` (those matching ``pattern`` whose name carries a process id)
    that a process that no longer runs left there before this one started. ``unowned`` is a pattern of temporary
    names that carry no process id (written by older versions); those count as a dead writer's. Returns what was
    removed. Files of a live process, and files changed since this process started, are never touched."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    paths = set(directory.glob(pattern)) | (set(directory.glob(unowned)) if unowned else set())
    removed = []
    for path in sorted(paths):
        match = _PID.search(path.name)
        if match is not None:
            left, cutoff = not alive(int(match[1])), STARTED
        else:
            left = unowned is not None and fnmatch.fnmatch(path.name, unowned)
            cutoff = min(STARTED, time.time() - QUIET_SECONDS)
        try:
            if left and path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:  # gone already (another process cleaning up), or not ours to remove
            continue
    return removed
