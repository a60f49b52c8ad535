"""WaNet poisons every batch of training (Nguyen and Tran, ICLR 2021): the fixed warp with the target label on a
share ``pc`` of each batch, noise mode (the warp plus noise grids drawn afresh at every step) at the true label on
``cross_ratio`` times as many, through the training loop's hook."""

import pytest
import torch

from unitlib import attacks, models, results
from unitlib.attacks.wanet import WaNet
from unitlib.config import profile
from unitlib.train import Recipe, fit


def _data(n=400, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g), torch.arange(n) % 10


def _epochs(atk, x, y, *, batch_size, epochs=1, seed=0):
    """Drive the attack's hook as the training loop does (a shuffled pass over the set per epoch); returns, per
    step, the batch's indices, its images and labels before and after the hook."""
    hook = atk.hook(y)
    steps_per_epoch = -(-len(x) // batch_size)
    hook.begin(x, y, torch.device("cpu"), epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    out = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb, yb, extra = hook.batch(x[idx], y[idx], idx, epoch * steps_per_epoch + i)
            assert extra is None
            out.append((idx, x[idx], y[idx], xb, yb))
    return out


def test_batches_carry_the_published_shares_of_warped_and_noise_mode_samples():
    x, y = _data()
    atk = attacks.get("wanet", target=3, poison_rate=0.1, seed=1)
    steps = _epochs(atk, x, y, batch_size=50)
    warped = noise = 0
    for _, xb, yb, out, labels in steps:
        changed = (out != xb).flatten(1).any(1)
        relabelled = labels != yb
        # the warped samples go to the target, noise-mode samples keep their true labels, the rest is untouched
        assert (labels[relabelled] == 3).all() and not (relabelled & ~changed).any()
        assert torch.equal(out[~changed], xb[~changed]) and torch.equal(labels[~changed], yb[~changed])
        # each batch near the published shares rho_a = pc = 0.1 and rho_n = pc * cross_ratio = 0.2 (5 and 10 of
        # 50); a fixed touched set makes the per-batch counts vary around them
        assert 0 <= int(relabelled.sum()) <= 13 and 2 <= int((changed & ~relabelled).sum()) <= 20
        warped += int(relabelled.sum())
        noise += int((changed & ~relabelled).sum())
    # over an epoch every sample passes once: exactly pc and pc * cross_ratio of the set
    assert (warped, noise) == (40, 80)


def test_the_fixed_warp_is_the_same_at_every_step_and_at_test_time():
    x, y = _data()
    atk = attacks.get("wanet", target=3, seed=1)
    for _, xb, yb, out, labels in _epochs(atk, x, y, batch_size=50, epochs=2)[::3]:
        payload = labels != yb
        assert payload.any()
        assert torch.equal(out[payload], atk.apply(xb[payload]))  # the test-time trigger, whatever the step
    # and that warp is the identity grid moved by s / H of the fixed flow, the same on every call
    assert torch.equal(atk.grid(16, 16), attacks.get("wanet", target=3, seed=1).grid(16, 16))
    assert not torch.equal(atk.grid(16, 16), attacks.get("wanet", target=3, seed=2).grid(16, 16))


def test_noise_grids_are_drawn_afresh_at_every_step_around_the_trigger_field():
    x, y = _data()
    atk = attacks.get("wanet", target=3, seed=1)
    role = atk.roles(y)
    cross = torch.nonzero(role == 2).flatten()[:8]
    xb, yb = x[cross], y[cross]
    a, la, _ = atk.train_batch(xb, yb, role[cross], step=0)
    b, _, _ = atk.train_batch(xb, yb, role[cross], step=1)
    again, _, _ = atk.train_batch(xb, yb, role[cross], step=0)
    assert torch.equal(la, yb)  # noise mode keeps the true labels
    assert torch.equal(a, again)  # seeded by the step: a resumed run draws the same grids
    assert (a != b).flatten(1).any(1).all()  # a fresh grid for every image at every step
    assert not torch.allclose(a, atk.apply(xb), atol=1e-3)  # not the trigger itself
    # the grids: the trigger field plus uniform per-pixel offsets in [-1/H, 1/H], clamped to [-1, 1]
    grids = atk.noise_grids(64, 16, 16, torch.Generator().manual_seed(0))
    offset = grids - atk.grid(16, 16)
    assert grids.abs().max() <= 1 and offset.abs().max() <= 1 / 16 + 1e-6
    inner = offset[:, 2:-2, 2:-2]  # away from the clamped border
    assert abs(float(inner.abs().mean()) - 0.5 / 16) < 0.05 / 16  # uniform: mean |offset| is half the bound


def test_poison_reports_every_sample_the_hook_ever_touches():
    x, y = _data()
    atk = attacks.get("wanet", target=3, seed=1)
    touched = set()
    for idx, xb, yb, out, labels in _epochs(atk, x, y, batch_size=64, epochs=3):
        touched |= set(idx[(out != xb).flatten(1).any(1)].tolist())
    p = atk.poison(x, y)
    assert sorted(touched) == p.index.tolist()  # the defender's clean split excludes exactly these
    assert len(p.payload) == 40 and len(p.cover) == 80 and (y[p.payload] != 3).all()
    assert torch.equal(p.x[p.payload], atk.apply(x[p.payload])) and torch.equal(p.y[p.cover], y[p.cover])


def _train(atk, x, y, seed=0):
    torch.manual_seed(0)
    model = models.build("small-cnn", num_classes=10, width=4)
    fit(model, x, y, Recipe(epochs=1, batch_size=32, lr=0.05, schedule="onecycle"), seed=seed, progress=False,
        channels_last=False, hook=atk.hook(y))
    return model.state_dict()


def test_seeded_training_with_the_hook_is_reproducible():
    x, y = _data(96)
    first = _train(attacks.get("wanet", target=3, seed=4), x, y)
    second = _train(attacks.get("wanet", target=3, seed=4), x, y)
    assert all(torch.equal(v, second[k]) for k, v in first.items())
    other = _train(attacks.get("wanet", target=3, seed=5), x, y)  # another warp, other samples, other noise
    assert any(not torch.equal(v, other[k]) for k, v in first.items())


def test_the_hook_refuses_a_training_set_it_was_not_made_for():
    x, y = _data(96)
    hook = attacks.get("wanet").hook(y)
    with pytest.raises(ValueError, match="the hook was made for 96 training samples, the loop has 64"):
        hook.begin(x[:64], y[:64], torch.device("cpu"), 2)


def test_per_batch_poisoning_changed_the_model_cache_key(monkeypatch):
    exp = profile("smoke", attack="wanet", defense="none")
    now = results.model_path(exp, "digest")
    assert WaNet.cache_version >= 2 and WaNet.trains_with_model
    monkeypatch.setattr(WaNet, "cache_version", 1)  # the once-poisoned models of before
    assert results.model_path(exp, "digest") != now
