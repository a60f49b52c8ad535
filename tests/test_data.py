"""Tests of unitlib.data on tiny fixtures built in tmp_path: no internet, seconds."""

import io
import os
import pickle
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unitlib import data
from unitlib.data import cifar10, cifar10_jpeg, decode, locations, synthetic

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
N_TRAIN, N_TEST = 3, 2  # images per class in the JPEG fixture
REAL_ARCHIVE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
USER_CACHE = os.environ.get("UNITLIB_CACHE") or str(Path.home() / ".cache" / "unitlib")  # before tests change it


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the user's data, cache or the shared data folder, nor another test's in-process cache."""
    monkeypatch.delenv("UNITLIB_DATA", raising=False)
    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(locations, "SHARED_DATA_DIR", tmp_path / "no-shared-data")
    for cached in (cifar10_jpeg._jpeg_arrays, cifar10._cifar10_arrays, synthetic._synthetic_arrays):
        cached.cache_clear()
    yield
    for cached in (cifar10_jpeg._jpeg_arrays, cifar10._cifar10_arrays, synthetic._synthetic_arrays):
        cached.cache_clear()


@pytest.fixture
def no_download(monkeypatch):
    """torchvision's CIFAR10 raises instead of reaching the network; records the roots it was asked for."""
    import torchvision.datasets

    calls = []

    def refuse(root, *args, **kwargs):
        calls.append(Path(root))
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", refuse)
    return calls


# ------------------------------------------------------------------------------------ cifar10-jpeg fixture


def _colour(cls: int, i: int) -> tuple[int, int, int]:
    # Flat colours survive JPEG almost exactly: class in red, position in green, so order is checkable.
    return 20 + 20 * cls, 30 + 50 * i, 120


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _make_archive(path: Path, shift: int = 0) -> dict[str, bytes]:
    """A tiny archive in the cifar10-jpeg layout; classes and files added out of order. Returns name -> bytes."""
    files = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for c in reversed(range(len(CLASSES))):
            for i in reversed(range(n)):
                r, g, b = _colour(c, i)
                files[f"cifar10-jpeg/{split}/{CLASSES[c]}/{i:04d}.jpg"] = _jpeg((r, g, (b + shift) % 256))
    with tarfile.open(path, "w:xz") as tf:
        readme = b"fixture\n"
        info = tarfile.TarInfo("cifar10-jpeg/README.md")
        info.size = len(readme)
        tf.addfile(info, io.BytesIO(readme))
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return files


def _decoded(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).transpose(2, 0, 1)


def _check_jpeg_dataset(ds: data.Dataset, files: dict[str, bytes]) -> None:
    assert ds.name == "cifar10-jpeg"
    assert ds.classes == CLASSES and ds.num_classes == 10 and ds.shape == (3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape == (10 * N_TRAIN, 3, 32, 32) and ds.x_test.shape == (10 * N_TEST, 3, 32, 32)
    assert ds.y_train.tolist() == [c for c in range(10) for _ in range(N_TRAIN)]
    assert ds.y_test.tolist() == [c for c in range(10) for _ in range(N_TEST)]
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = getattr(ds, f"x_{split}")
        for c in range(10):
            for i in range(n):
                blob = files[f"cifar10-jpeg/{split}/{CLASSES[c]}/{i:04d}.jpg"]
                assert np.array_equal(x[c * n + i].numpy(), _decoded(blob))


def test_jpeg_explicit_root_then_cache(tmp_path, monkeypatch):
    files = _make_archive(tmp_path / "cifar10-jpeg.tar.xz")
    ds = data.load("cifar10-jpeg", root=tmp_path)
    _check_jpeg_dataset(ds, files)
    caches = list((tmp_path / "cache").glob("cifar10-jpeg-*.npz"))
    assert len(caches) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))

    # In-process: the same arrays, no reading at all; fresh tensors each time.
    again = data.load("cifar10-jpeg", root=tmp_path)
    assert torch.equal(again.x_train, ds.x_train) and again.x_train.data_ptr() != ds.x_train.data_ptr()
    again.x_train.zero_()
    assert torch.equal(data.load("cifar10-jpeg", root=tmp_path).x_train, ds.x_train)

    # A new process (cleared in-process cache) reads the .npz and decodes nothing.
    cifar10_jpeg._jpeg_arrays.cache_clear()

    def fail(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(cifar10_jpeg, "decode_all", fail)
    cached = data.load("cifar10-jpeg", root=tmp_path / "cifar10-jpeg.tar.xz")  # the archive path itself
    assert torch.equal(cached.x_train, ds.x_train) and torch.equal(cached.y_test, ds.y_test)
    assert cached.classes == CLASSES


def test_jpeg_changed_archive_invalidates_cache(tmp_path):
    archive = tmp_path / "cifar10-jpeg.tar.xz"
    _make_archive(archive)
    first = data.load("cifar10-jpeg", root=tmp_path)
    files = _make_archive(archive, shift=60)
    os.utime(archive, ns=(1, 1))  # a different stamp even on a coarse-clock file system
    second = data.load("cifar10-jpeg", root=tmp_path)
    _check_jpeg_dataset(second, files)
    assert not torch.equal(first.x_train, second.x_train)
    assert len(list((tmp_path / "cache").glob("cifar10-jpeg-*.npz"))) == 2


def test_jpeg_via_env_and_unpacked_folder(tmp_path, monkeypatch):
    files = _make_archive(tmp_path / "cifar10-jpeg.tar.xz")
    monkeypatch.setenv("UNITLIB_DATA", str(tmp_path))
    _check_jpeg_dataset(data.load("cifar10-jpeg"), files)

    unpacked = tmp_path / "unpacked"
    for name, blob in files.items():
        (unpacked / name).parent.mkdir(parents=True, exist_ok=True)
        (unpacked / name).write_bytes(blob)
    cifar10_jpeg._jpeg_arrays.cache_clear()
    _check_jpeg_dataset(data.load("cifar10-jpeg", root=unpacked), files)
    _check_jpeg_dataset(data.load("cifar10-jpeg", root=unpacked / "cifar10-jpeg"), files)


def test_jpeg_size_is_balanced_subset(tmp_path):
    _make_archive(tmp_path / "cifar10-jpeg.tar.xz")
    full = data.load("cifar10-jpeg", root=tmp_path)
    small = data.load("cifar10-jpeg", root=tmp_path, size=20)
    assert torch.bincount(small.y_train).tolist() == [2] * 10
    assert torch.equal(small.x_test, full.x_test)
    assert torch.equal(data.load("cifar10-jpeg", root=tmp_path, size=20).x_train, small.x_train)
    with pytest.raises(ValueError, match="size=31"):
        data.load("cifar10-jpeg", root=tmp_path, size=31)
    with pytest.raises(ValueError, match="size must be a positive int"):
        data.load("cifar10-jpeg", root=tmp_path, size=0)


def test_jpeg_decodes_in_worker_processes(tmp_path, monkeypatch):
    # Chunks of 4 images: the pool starts, several chunks finish out of order, the result keeps the file order.
    monkeypatch.setattr(decode, "_DECODE_CHUNK", 4)
    pools = []
    start_pool = decode._start_pool
    monkeypatch.setattr(decode, "_start_pool", lambda: pools.append(start_pool()) or pools[-1])
    files = _make_archive(tmp_path / "cifar10-jpeg.tar.xz")
    _check_jpeg_dataset(data.load("cifar10-jpeg", root=tmp_path), files)
    assert len(pools) == 1
    if sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) > 1:
        assert pools[0] is not None


def test_no_worker_processes_forked_beside_other_threads():
    # A Jupyter kernel runs I/O threads; a forked child could block on a lock one of them held. Decode in-process.
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        assert decode._start_pool() is None
    finally:
        stop.set()
        thread.join()
    if sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) > 1:
        pool = decode._start_pool()
        assert pool is not None
        pool.shutdown()


def test_jpeg_damaged_archive(tmp_path):
    (tmp_path / "cifar10-jpeg.tar.xz").write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        data.load("cifar10-jpeg", root=tmp_path)


def test_jpeg_missing_says_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar10-jpeg", root=tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "UNITLIB_DATA" in str(err.value) and "load('cifar10')" in str(err.value)

    monkeypatch.setenv("UNITLIB_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar10-jpeg")
    message = str(err.value)
    assert "empty" in message and "no-shared-data" in message and "root=" in message


# ------------------------------------------------------------------------------------ cifar10 (pickle) fixture


def _write_batch(path: Path, obj: object, protocol: int) -> None:
    blob = pickle.dumps(obj, protocol=protocol)
    if protocol == 2:
        # Files written under python 2 / numpy 1.x name numpy.core, not numpy._core (text opcodes at protocol 2).
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(blob)


def _make_cifar(root: Path, per_batch: int = 4, protocol: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The torchvision pickle layout with random images; returns all train data (N x 3072) and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    datas, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        _write_batch(folder / name, {b"batch_label": b"fixture", b"data": x, b"labels": y}, protocol)
        datas.append(x)
        labels.extend(y)
    names = [c.encode() for c in CLASSES]
    _write_batch(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072}, protocol)
    return np.concatenate(datas), np.array(labels)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar10_pickles_round_trip(tmp_path, protocol):
    raw, labels = _make_cifar(tmp_path, protocol=protocol)
    ds = data.load("cifar10", root=tmp_path)
    assert ds.name == "cifar10" and ds.classes == CLASSES and ds.shape == (3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert len(ds.x_train) == 20 and len(ds.x_test) == 4
    assert ds.y_train.tolist() == labels[:20].tolist() and ds.y_test.tolist() == labels[20:].tolist()
    # Row layout: 1024 red values, then green, then blue, each plane row-major.
    img = ds.x_train[5].numpy()
    for c, h, w in [(0, 0, 0), (0, 0, 31), (0, 1, 0), (1, 0, 0), (2, 31, 31), (1, 17, 3)]:
        assert img[c, h, w] == raw[5, c * 1024 + h * 32 + w]
    assert np.array_equal(ds.x_test.numpy().reshape(4, -1), raw[20:])


def test_cifar10_channel_order(tmp_path):
    _make_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    red = np.zeros((1, 3072), np.uint8)
    red[0, :1024] = 255
    _write_batch(folder / "test_batch", {b"data": red, b"labels": [3]}, 2)
    ds = data.load("cifar10", root=folder)  # the batch folder itself is accepted as root too
    assert ds.x_test[0, 0].eq(255).all() and ds.x_test[0, 1:].eq(0).all()


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_malicious_pickle(tmp_path):
    _make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global '(posix|nt|os)\.system'") as err:
        data.load("cifar10", root=tmp_path)
    assert "data_batch_3" in str(err.value)
    assert not marker.exists()


def test_cifar10_missing_says_how_to_fix(tmp_path, no_download):
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar10", root=tmp_path)
    message = str(err.value)
    assert no_download == [tmp_path]
    assert "internet" in message and "cifar10-jpeg" in message and "no network in tests" in message


def test_cifar10_default_download_target(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("UNITLIB_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="cifar10-jpeg"):
        data.load("cifar10")
    assert no_download == [tmp_path / "data"]


# ------------------------------------------------------------------------------------ names, synthetic


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown dataset 'xyz'; valid choices: cifar10, cifar10-jpeg, synthetic"):
        data.load("xyz")


def test_synthetic_deterministic_and_balanced():
    ds = data.load("synthetic")
    assert ds.name == "synthetic" and ds.num_classes == 10 and ds.shape == (3, 32, 32)
    assert ds.x_train.shape == (2000, 3, 32, 32) and ds.x_test.shape == (500, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert torch.bincount(ds.y_train).tolist() == [200] * 10
    assert torch.bincount(ds.y_test).tolist() == [50] * 10
    synthetic._synthetic_arrays.cache_clear()
    again = data.load("synthetic")
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    small = data.load("synthetic", size=105)
    assert len(small.y_train) == 105 and torch.bincount(small.y_train).tolist() == [11] * 5 + [10] * 5
    assert torch.equal(small.x_test, ds.x_test)
    # Classes differ on average, and images vary within a class.
    means = torch.stack([ds.x_train[ds.y_train == c].float().mean(0) for c in range(10)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).add(torch.eye(10) * 1e9).min() > 100
    assert ds.x_train[ds.y_train == 0].float().std(0).mean() > 10


@pytest.mark.slow
def test_synthetic_learnable_not_trivial():
    torch.manual_seed(0)
    ds = data.load("synthetic")
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )
    x, xt = (data.to_float(ds.x_train) - 0.5) / 0.25, (data.to_float(ds.x_test) - 0.5) / 0.25
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(6):
        for b in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(net(x[b]), ds.y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (net(xt).argmax(1) == ds.y_test).float().mean().item()
    assert 0.85 < acc < 1.0


def test_to_float():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    out = data.to_float(x)
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([0.0, 128 / 255, 1.0]))
    with pytest.raises(TypeError, match="float32"):
        data.to_float(out)


# ------------------------------------------------------------------------------------ index splits


def _labels(per_class: int = 100, classes: int = 10) -> torch.Tensor:
    return torch.arange(per_class * classes) % classes


def test_balanced_subset():
    y = _labels()
    exclude = torch.arange(0, 1000, 3)
    idx = data.balanced_subset(y, 95, torch.Generator().manual_seed(0), exclude)
    assert idx.dtype == torch.int64 and len(idx) == 95 and torch.equal(idx, idx.sort().values)
    assert len(set(idx.tolist())) == 95 and not set(idx.tolist()) & set(exclude.tolist())
    counts = torch.bincount(y[idx], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(idx, data.balanced_subset(y, 95, torch.Generator().manual_seed(0), exclude))
    assert not torch.equal(idx, data.balanced_subset(y, 95, torch.Generator().manual_seed(1), exclude))
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[exclude] = True
    assert torch.equal(idx, data.balanced_subset(y, 95, torch.Generator().manual_seed(0), mask))
    for nothing in (None, [], torch.tensor([], dtype=torch.int64)):
        assert len(data.balanced_subset(y, 1000, torch.Generator(), nothing)) == 1000


def test_balanced_subset_short_class_and_errors():
    y = _labels()
    exclude = torch.nonzero(y == 4).flatten()[2:]  # class 4 keeps only 2 samples
    idx = data.balanced_subset(y, 20 * 10, torch.Generator().manual_seed(0), exclude)
    counts = torch.bincount(y[idx], minlength=10).tolist()
    assert counts[4] == 2 and sum(counts) == 200 and max(counts) - min(c for i, c in enumerate(counts) if i != 4) <= 1
    with pytest.raises(ValueError, match="n=1000 but only 902"):
        data.balanced_subset(y, 1000, torch.Generator(), exclude)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        data.balanced_subset(y, 0, torch.Generator())
    with pytest.raises(ValueError, match=re.escape("outside 0..999")):
        data.balanced_subset(y, 10, torch.Generator(), torch.tensor([1000]))


def test_defense_split():
    y = _labels(per_class=500)
    exclude = torch.arange(0, 5000, 7)
    opt, val = data.defense_split(y, 0.05, exclude=exclude, seed=3)
    assert len(opt) + len(val) == 250
    assert torch.bincount(y[opt], minlength=10).tolist() == [20] * 10
    assert torch.bincount(y[val], minlength=10).tolist() == [5] * 10
    for part in (opt, val):
        assert part.dtype == torch.int64 and torch.equal(part, part.sort().values)
        assert not set(part.tolist()) & set(exclude.tolist())
    assert not set(opt.tolist()) & set(val.tolist())
    again = data.defense_split(y, 0.05, exclude=exclude, seed=3)
    assert torch.equal(again[0], opt) and torch.equal(again[1], val)
    other = data.defense_split(y, 0.05, exclude=exclude, seed=4)
    assert not torch.equal(other[0], opt)
    opt, val = data.defense_split(y, 0.1, exclude=None, seed=0, val_fraction=0.5)
    assert len(opt) == len(val) == 250


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.5, -0.1, float("nan"), True])
def test_defense_split_bad_clean_fraction(bad):
    with pytest.raises(ValueError, match=rf"clean_fraction must be .* got {re.escape(repr(bad))}"):
        data.defense_split(_labels(), bad, exclude=None, seed=0)


def test_defense_split_bad_val_fraction_and_too_few():
    with pytest.raises(ValueError, match=r"val_fraction must be .* got 1\.0"):
        data.defense_split(_labels(), 0.1, exclude=None, seed=0, val_fraction=1.0)
    with pytest.raises(ValueError, match=re.escape("clean_fraction=0.01 gives 1 clean sample")):
        data.defense_split(_labels(), 0.01, exclude=None, seed=0)


# ------------------------------------------------------------------------------------ the real archive


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ARCHIVE.is_file(), reason=f"the real archive {REAL_ARCHIVE} is absent")
def test_real_cifar10_jpeg(monkeypatch):
    # The user's cache, not tmp_path: decoding the real archive takes tens of seconds, once per machine.
    monkeypatch.setenv("UNITLIB_CACHE", USER_CACHE)
    full = data.load("cifar10-jpeg", root=REAL_ARCHIVE.parent)
    assert full.classes == CLASSES and full.shape == (3, 32, 32)
    assert torch.bincount(full.y_train).tolist() == [5000] * 10
    assert torch.bincount(full.y_test).tolist() == [1000] * 10
    small = data.load("cifar10-jpeg", root=REAL_ARCHIVE.parent, size=1000)
    assert torch.bincount(small.y_train).tolist() == [100] * 10 and len(small.x_test) == 10_000


def test_the_public_names_stay_on_the_package():
    # unitlib.data is a package of modules by concern; what callers use is on the package itself
    assert sorted(data.__all__) == ["DATASETS", "Dataset", "balanced_subset", "cache_dir", "defense_split", "load",
                                    "to_float"]
    from unitlib.data import DATASETS, Dataset, balanced_subset, cache_dir, defense_split, load, to_float  # noqa: F401

    assert data.Dataset.__module__ == "unitlib.data.dataset" and data.load.__module__ == "unitlib.data"


def test_defense_split_names_a_class_the_attack_poisoned_entirely():
    y = _labels(per_class=50)
    everything_of_class_3 = torch.nonzero(y == 3).flatten()
    with pytest.raises(ValueError, match=r"class 3 has 0 training sample\(s\) that are not poisoned \(50 are\)"):
        data.defense_split(y, 0.1, exclude=everything_of_class_3, seed=0)
    # one clean sample left is still too few to optimise and validate on
    with pytest.raises(ValueError, match=r"class 3 has 1 training sample\(s\)"):
        data.defense_split(y, 0.1, exclude=everything_of_class_3[1:], seed=0)
