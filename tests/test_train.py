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
