import os
import platform
import subprocess
import sys

import pytest
import torch

from unitlib import models, train
from unitlib.train import Recipe, augment, fit


def _toy(n=256, seed=0):
    # two classes separable by the mean brightness of the left half
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.5
    y = torch.arange(n) % 2
    x[y == 1, :, :, :8] += 0.5
    return x, y


def test_augment_shapes_and_content():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = augment(x, crop=0, flip=False)
    assert torch.equal(out, x)
    g = torch.Generator().manual_seed(0)
    out = augment(x, crop=2, flip=True, generator=g)
    assert out.shape == x.shape
    # every output row is a (possibly flipped, shifted, reflected) piece of the same image's channel
    assert set(out[0, 0].flatten().tolist()) <= set(x[0, 0].flatten().tolist())


def test_recipe_schedules():
    r = Recipe(epochs=10, lr=0.1, schedule="step", milestones=(0.5, 0.75))
    assert r.lr_at(0.0) == pytest.approx(0.1) and r.lr_at(0.6) == pytest.approx(0.01)
    assert r.lr_at(0.8) == pytest.approx(0.001)
    o = Recipe(lr=0.2, schedule="onecycle", warmup=0.2)
    assert o.lr_at(0.1) == pytest.approx(0.1) and o.lr_at(0.2) == pytest.approx(0.2) and o.lr_at(1.0) == 0
    with pytest.raises(ValueError, match="unknown schedule 'linear'; valid choices: onecycle, step, cosine"):
        Recipe(schedule="linear")


def test_fit_learns():
    x, y = _toy()
    torch.manual_seed(0)
    model = models.build("small-cnn", width=4, num_classes=2)
    fit(model, x, y, Recipe(epochs=4, batch_size=32, lr=0.05, schedule="onecycle", crop=0), progress=False)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9


def test_interrupted_training_resumes_to_the_same_model(tmp_path, killed_after_saves):
    x, y = _toy(128)
    recipe = Recipe(epochs=3, batch_size=32, lr=0.05, schedule="onecycle")

    def fresh():
        torch.manual_seed(0)
        return models.build("small-cnn", width=4, num_classes=2)

    reference = fit(fresh(), x, y, recipe, seed=1, progress=False, checkpoint=tmp_path / "ref.safetensors")

    ckpt = tmp_path / "run.safetensors"
    killed_after_saves(2, lambda: fit(fresh(), x, y, recipe, seed=1, progress=False, checkpoint=ckpt))
    other_init = models.build("small-cnn", width=4, num_classes=2)  # resumed weights must come from the file
    resumed = fit(other_init, x, y, recipe, seed=1, progress=False, checkpoint=ckpt)
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_epoch_augmentation_in_chunks_matches_batch_by_batch():
    # The whole epoch is augmented in chunks that do not line up with the batches; each batch must get exactly the
    # pixels that augmenting it on its own with the same draws gives.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(70, 3, 8, 8, generator=g)
    perm = torch.randperm(70, generator=g)
    bs, crop = 16, 2
    draws = [train.draw_augment(min(bs, 70 - i * bs), crop, True, g) for i in range(5)]
    whole = train._augmented_epoch(x, perm, crop, draws, torch.device("cpu"), chunk=23)
    for i, (dy, dx, mask) in enumerate(draws):
        sl = slice(i * bs, (i + 1) * bs)
        assert torch.equal(whole[sl], train.apply_augment(x[perm[sl]], crop, dy, dx, mask)), i


def test_fit_calls_on_epoch_after_each_epoch():
    x, y = _toy(64)
    seen = []
    fit(models.build("small-cnn", width=4, num_classes=2), x, y, Recipe(epochs=3, batch_size=32), progress=False,
        on_epoch=seen.append)
    assert seen == [1, 2, 3]


def _allocator_in_a_fresh_process(setting: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != train.ALLOCATOR_ENV}
    if setting is not None:
        env[train.ALLOCATOR_ENV] = setting
    code = "from unitlib.train import tune_allocator; print(tune_allocator(), tune_allocator())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_tune_allocator_states():
    """glibc's malloc is tuned once per process (idempotent); UNITLIB_MALLOC=default leaves it alone; a bad value is
    an error naming the valid ones. Each case runs in a fresh process: the setting is process-wide."""
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    done = _allocator_in_a_fresh_process(None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == (["tuned"] * 2 if glibc else ["unavailable"] * 2)
    assert _allocator_in_a_fresh_process("default").stdout.split() == ["off", "off"]
    bad = _allocator_in_a_fresh_process("jemalloc")
    assert bad.returncode != 0 and "UNITLIB_MALLOC='jemalloc'; valid choices: tuned, default" in bad.stderr


def test_fit_tunes_the_allocator_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(train, "tune_allocator", lambda: calls.append(1) or "tuned")
    model = models.build("small-cnn", num_classes=2, in_channels=1, width=4)
    fit(model, torch.rand(8, 1, 8, 8), torch.randint(0, 2, (8,)), Recipe(epochs=1, batch_size=8), device="cpu",
        progress=False)
    assert calls == [1]
