"""Bad inputs and interrupted runs: a damaged cache is set aside and the work redone, the book refuses parameters a
notebook does not have and keeps the last good notebook when a run fails, and a run killed at any moment leaves no
worker process behind and no temporary file after the next run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
import torch
from PIL import Image

from unitlib import data, tempfiles
from unitlib.book import build
from unitlib.book import cli as book_cli
from unitlib.train import Recipe

LINUX_POOL = sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) > 1


# -- the training recipe -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0, got -1.0"),
    ({"label_smoothing": 2.0}, "label_smoothing must be in [0, 1), got 2.0"),
])
def test_recipe_refuses_values_training_cannot_use(changes, message):
    with pytest.raises(ValueError) as e:
        Recipe(**changes)
    assert message in str(e.value)


# -- a damaged attack cache -------------------------------------------------------------------------------------------
def test_a_truncated_attack_cache_is_set_aside_and_the_trigger_learned_again(tmp_path, monkeypatch):
    from unitlib import attacks

    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(200, 3, 32, 32, generator=g), torch.arange(200) % 10
    params = dict(surrogate_epochs=1, surrogate_width=8, surrogate_size=None, steps=20, candidates=4)
    first = attacks.get("trojan", **params)
    first.prepare(x, y)
    cached = sorted((tmp_path / "attacks").glob("*.safetensors"))
    assert [p.name.split("-")[0] for p in cached] == ["surrogate", "trojan"]
    for path in cached:  # both the surrogate model and the trigger, cut short as by a kill
        path.write_bytes(path.read_bytes()[:100])
    again = attacks.get("trojan", **params)
    with pytest.warns(UserWarning) as caught:
        again.prepare(x, y)
    messages = [str(w.message) for w in caught]
    for path in cached:
        assert any(str(path) in m and "could not be read" in m for m in messages), messages
        assert path.exists() and len(path.read_bytes()) > 100  # learned again and cached again
    assert len(list((tmp_path / "attacks").glob("*.corrupt-*"))) == 2
    assert torch.equal(again.apply(x[:4]), first.apply(x[:4]))


# -- the book's parameters and a failed run ---------------------------------------------------------------------------
NOTEBOOK = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A fixture section

```{code-cell} ipython3
:tags: [parameters]

profile = "smoke"   # which profile
fail = False        # raise in the next cell
```

```{code-cell} ipython3
assert not fail, "failing on purpose"
print(f"ran with {profile}")
```
"""


@pytest.fixture
def fixture_book(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "a9_fixture.md").write_text(NOTEBOOK)
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "plain.md").write_text(NOTEBOOK.split("```{code-cell}")[0])
    monkeypatch.setattr(build, "ROOT", tmp_path)
    monkeypatch.setattr(build, "PAGES", ["plain"])
    monkeypatch.setattr(build, "SECTIONS", ["a9_fixture"])
    return tmp_path


def test_book_knows_each_notebooks_parameters(fixture_book):
    assert build.parameters("a9_fixture") == ["profile", "fail"]
    assert build.parameters("plain") == []


def test_book_refuses_an_unknown_parameter_and_lists_the_valid_ones(fixture_book, capsys):
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'profil' for a9_fixture; its parameters: "
                                         r"profile, fail"):
        build.execute("a9_fixture", {"profil": "cpu"}, out=fixture_book / "out.ipynb")
    with pytest.raises(ValueError, match=r"plain takes no parameters .*'x'"):
        build.execute("plain", {"x": 1}, out=fixture_book / "out.ipynb")
    assert not (fixture_book / "out.ipynb").exists()
    # a name is never pasted into the notebook as code
    with pytest.raises(ValueError, match="unknown parameter"):
        build.execute("a9_fixture", {"import os; os.remove('x'); y": 1}, out=fixture_book / "out.ipynb")


def test_real_sections_refuse_a_typo_before_running(capsys):
    assert book_cli.main(["section", "a1_attacks", "-p", "attack", "nonexistent", "--no-html"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown parameter(s) 'attack' for a1_attacks; its parameters: profile, attacks")


def test_a_failed_run_keeps_the_last_good_notebook(fixture_book):
    import papermill

    out = fixture_book / "build" / "a9_fixture.ipynb"
    build.execute("a9_fixture", {"profile": "cpu"}, out=out)
    good = out.read_text()
    assert "ran with cpu" in good
    with pytest.raises(papermill.PapermillExecutionError, match="failing on purpose") as e:
        build.execute("a9_fixture", {"fail": True}, out=out)
    assert out.read_text() == good
    failed = out.with_name("a9_fixture.failed.ipynb")
    assert str(failed) in "\n".join(getattr(e.value, "__notes__", []))
    assert any(o.get("ename") == "AssertionError" for c in nbformat.read(failed, as_version=4).cells
               for o in c.get("outputs", []))
    assert sorted(p.name for p in out.parent.iterdir()) == ["a9_fixture.failed.ipynb", "a9_fixture.ipynb"]
    build.execute("a9_fixture", {"profile": "paper"}, out=out)
    assert "ran with paper" in out.read_text() and not failed.exists()


# -- temporary files of killed processes ------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _old(path: Path, text: str = "x") -> Path:
    path.write_text(text)
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    return path


def test_remove_stale_takes_only_dead_writers_leftovers(tmp_path):
    dead = _dead_pid()
    gone = [_old(tmp_path / f".model.safetensors.{dead}.tmp"), _old(tmp_path / f".ckpt.safetensors.{dead}.1234.tmp"),
            _old(tmp_path / f".a1_attacks.{dead}.tmp.ipynb"), _old(tmp_path / "legacy.npz.k3j_x9a1.tmp")]
    kept = [_old(tmp_path / f".mine.json.{os.getpid()}.tmp"),  # a live writer's
            tmp_path / f".fresh.json.{dead}.tmp",  # written after this process started
            _old(tmp_path / "record.json"), _old(tmp_path / "unowned.npz.abc.tmp")]
    kept[1].write_text("x")
    removed = tempfiles.remove_stale(tmp_path, unowned="legacy.npz.*.tmp")
    assert sorted(removed) == sorted(gone)
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _archive(folder: Path) -> Path:
    """A tiny cifar10-jpeg archive: ten classes, three training and one test image each."""
    path = folder / "cifar10-jpeg.tar.xz"
    with tarfile.open(path, "w:xz") as tf:
        for split, n in (("train", 3), ("test", 1)):
            for c in range(10):
                for i in range(n):
                    blob = _jpeg((25 * c, 80 * i, 100))
                    info = tarfile.TarInfo(f"cifar10-jpeg/{split}/class{c}/{i:04d}.jpg")
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    return path


CHILD = textwrap.dedent("""\
    import sys, time
    import numpy as np
    from unitlib import data
    from unitlib.data import decode as decoding

    decoding._DECODE_CHUNK = 4
    decode = decoding._decode_jpegs

    def slow_decode(names, blobs):  # runs in the workers
        time.sleep(3)
        return decode(names, blobs)

    def stalled_savez(f, **arrays):  # the cache write stops halfway
        f.write(b"x" * 4096)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)

    if sys.argv[2] == "decode":
        decoding._decode_jpegs = slow_decode
    else:
        np.savez = stalled_savez
    data.load("cifar10-jpeg", root=sys.argv[1])
""")


def _child(tmp_path: Path, phase: str) -> subprocess.Popen:
    _archive(tmp_path)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "UNITLIB_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path), phase], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(condition, seconds: float = 60.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not LINUX_POOL, reason="decoding workers run on Linux with two or more cores")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_decoding_workers_end_with_a_killed_parent(tmp_path, sig):
    child = _child(tmp_path, "decode")
    workers: list[int] = []
    try:
        assert _wait(lambda: _children(child.pid)), "no decoding worker started"
        workers = _children(child.pid)
        child.send_signal(sig)
        child.wait(timeout=60)
        assert _wait(lambda: not any(_running(w) for w in workers), 20), f"orphaned workers {workers}"
        if sig == signal.SIGTERM:  # shut down like Ctrl-C, with the exit status of a SIGTERM
            assert child.returncode == 128 + signal.SIGTERM
    finally:
        child.kill()
        child.wait()
        for pid in workers:  # whatever the outcome, this test leaves no process behind
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and POSIX signals")
def test_a_killed_cache_write_leaves_no_temp_file_after_the_next_load(tmp_path, monkeypatch):
    child = _child(tmp_path, "write")
    try:
        assert child.stdout.readline().strip() == "writing"
        temps = list((tmp_path / "cache").glob("*.tmp"))
        assert len(temps) == 1
        child.kill()
        child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert temps[0].exists()
    # The next run, in a process started after the kill, removes it (and writes a whole cache).
    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfiles, "STARTED", time.time())
    assert len(data.load("cifar10-jpeg", root=tmp_path).x_train) == 30
    assert not list((tmp_path / "cache").glob("*.tmp"))
    assert len(list((tmp_path / "cache").glob("cifar10-jpeg-*.npz"))) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_sigterm_during_the_cache_write_removes_the_temp_file(tmp_path):
    child = _child(tmp_path, "write")
    try:
        assert child.stdout.readline().strip() == "writing"
        child.terminate()
        child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 128 + signal.SIGTERM
    assert not list((tmp_path / "cache").glob("*.tmp"))
