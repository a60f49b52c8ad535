"""JPEG files decoded to one uint8 array, in chunks spread over forked worker processes (Linux) that end with the
process that started them; a progress bar at a terminal only."""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

# Images per task sent to a decoding worker; a pool starts only once the first chunk is full, so tiny archives
# never pay for starting processes.
_DECODE_CHUNK = 1000
_PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>


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
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (sigterm_as_exit), if it had one


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
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


def decode_all(entries: Iterable[tuple[tuple[str, str, str], bytes]], total: int | None,
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
