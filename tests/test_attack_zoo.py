"""One behavioural check per attack of the zoo, beyond the shared contract in test_attacks.py."""

import math

import pytest
import torch
from test_attacks import _data, make

from unitlib import attacks, data
from unitlib.attacks import photos, surrogate
from unitlib.attacks.refool import GAMMA, Refool, adversarial_selection, gaussian_blur, gaussian_blur_batch


def test_sig_adds_a_horizontal_sinusoid_of_amplitude_delta():
    atk = attacks.get("sig")
    x = torch.full((1, 3, 32, 32), 0.5)
    d = atk.apply(x) - x
    assert torch.allclose(d[0, 0], d[0, 1]) and torch.allclose(d[0, :, 0], d[0, :, 17])  # same on channels, rows
    assert d.abs().max() == pytest.approx(20 / 255, rel=0.02)  # delta 20 of 255
    j = torch.arange(32)
    assert torch.allclose(d[0, 0, 0], 20 / 255 * torch.sin(2 * math.pi * j * 6 / 32), atol=1e-6)  # f = 6
    assert torch.allclose(attacks.get("sig", test_delta=40).apply(x) - x, 2 * d, atol=1e-6)
    assert torch.allclose(attacks.get("sig", test_delta=40).apply_train(x) - x, d, atol=1e-6)


def test_wanet_warp_is_smooth_bounded_and_noise_mode_differs():
    atk = attacks.get("wanet")
    grid = atk.grid(32, 32)[0]
    identity = attacks.get("wanet", s=1e-9).grid(32, 32)[0]
    shift = (grid - identity) * 32 / 2  # in pixels
    assert shift.abs().max() <= 0.5 * atk.flow(32, 32).abs().max() / 2 + 1e-5  # s / H of the flow, in pixels
    assert 0.05 < shift.abs().max() < 2.0  # s = 0.5: sub-pixel to about a pixel, never far
    inner = shift[1:-1, 1:-1]  # the border is clamped to the image
    assert (inner[1:] - inner[:-1]).abs().max() < 0.2 and (inner[:, 1:] - inner[:, :-1]).abs().max() < 0.2  # smooth
    assert grid.abs().max() <= 1
    x, y = _data()
    p = atk.poison(x, y)
    assert len(p.cover) == 2 * len(p.payload)  # cross ratio 2
    assert torch.allclose(atk.apply(x[p.payload]), p.x[p.payload])  # the test-time warp is the training warp
    assert not torch.allclose(atk.apply(x[p.cover]), p.x[p.cover], atol=1e-3)  # noise mode: another warp


def test_instagram_filter_is_pilgrams_nashville():
    import numpy as np
    import pilgram
    from PIL import Image

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = attacks.get("instagram").apply(x)
    img = Image.fromarray((x[1] * 255).round().byte().permute(1, 2, 0).numpy(), "RGB")
    ref = torch.from_numpy(np.array(pilgram.nashville(img))).permute(2, 0, 1).float() / 255
    assert torch.allclose(out[1], ref)
    assert (out - x).abs().mean() > 0.02  # a visible colour change over the whole image
    assert attacks.get("instagram", filter="inkwell").apply(x).std(1).max() < 0.01  # inkwell is black and white


def test_refool_output_is_a_reflection_blend():
    atk = attacks.get("refool", selection="random", kinds=("in-focus",), alpha_range=(0.7, 0.7))
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 0.5
    out = atk.apply(x)
    reflection = (out.pow(GAMMA) - 0.7 * x.pow(GAMMA)) / 0.3  # what was added, in linear light
    pool = atk.pool(3, 32, 32).pow(GAMMA)
    chosen = pool[atk.draws(6)["reflection"]]
    assert torch.allclose(reflection, chosen, atol=1e-3)
    # the other models: a blurred and a doubled reflection, both still convex blends within [0, 1]
    for kind in ("focal-blur", "ghost"):
        o = attacks.get("refool", selection="random", kinds=(kind,), alpha_range=(0.7, 0.7)).apply(x)
        r = (o.pow(GAMMA) - 0.7 * x.pow(GAMMA)) / 0.3
        assert 0 <= o.min() and o.max() <= 1 and not torch.allclose(r, chosen, atol=1e-2)
    # the same images get the same reflections (determinism), other images other ones
    assert torch.equal(atk.apply(x), out)


def test_refool_blurs_each_image_at_its_own_sigma():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 1.0, 2.2, 2.6])
    one_by_one = torch.stack([gaussian_blur(x[i], float(s)) for i, s in enumerate(sigma)])
    assert torch.allclose(gaussian_blur_batch(x, sigma), one_by_one, atol=1e-6)


def test_adversarial_selection_keeps_the_top_m_by_its_scores():
    # A planted case: candidate i is worth effect[i]; the score of a round is that worth, as the model would rate it.
    effect = torch.rand(40, generator=torch.Generator().manual_seed(1))
    rounds = []
    score = lambda index: (rounds.append(index.clone()), effect[index])[1]
    index, w = adversarial_selection(score, 40, 5, 12, torch.Generator().manual_seed(0))
    assert len(rounds) == 12 and all(len(r) == 5 for r in rounds)
    assert not torch.equal(rounds[0].sort().values, torch.arange(5))  # first round: ties broken at random
    assert torch.equal(w[index], w.sort(descending=True).values[:5])  # the final pool is the top 5 by W
    last = rounds[-1]
    assert torch.equal(w[last], effect[last])  # the last round's candidates hold their scores
    others = torch.ones(40, dtype=torch.bool)
    others[last] = False
    assert (w[others] == effect[last].median()).all()  # every other one the median of those scores
    assert int(effect.argmax()) in index.tolist()  # the most effective candidate is found
    again, _ = adversarial_selection(lambda i: effect[i], 40, 5, 12, torch.Generator().manual_seed(0))
    assert torch.equal(index, again)
    with pytest.raises(ValueError, match="selected must be in 1..40 \\(the number of candidates\\), got 41"):
        adversarial_selection(score, 40, 41, 1, torch.Generator())


def _planted_refool(**params):
    """Refool on structured images whose candidates are three black reflections, which leave only a dimmed image,
    and one bright chequerboard at index 2: the one that plants a backdoor."""
    budget = dict(crops=1, selected=2, rounds=4, surrogate_epochs=3, surrogate_width=8, surrogate_size=None,
                  validation_size=64)
    atk = attacks.get("refool", kinds=("in-focus",), alpha_range=(0.5, 0.5), **{**budget, **params})
    board = ((torch.arange(32)[:, None] // 4 + torch.arange(32)[None] // 4) % 2).float().expand(3, 32, 32)
    planted = torch.zeros(4, 3, 32, 32)
    planted[2] = board
    atk.candidates = lambda c, h, w: planted
    return atk


def test_refool_selection_finds_the_planted_reflection_and_caches_it(monkeypatch):
    ds = data.load("synthetic", size=400)
    x, y = data.to_float(ds.x_train), ds.y_train
    atk = _planted_refool()
    assert not atk.prepared
    atk.prepare(x, y)
    assert int(atk._state["index"][0]) == 2  # ranked first
    assert atk._state["scores"][0] > atk._state["scores"][1]
    assert torch.equal(atk.pool(3, 32, 32)[0], atk.candidates(3, 32, 32)[2])
    p = atk.poison(x, y)
    assert torch.equal(p.y, y) and (y[p.index] == 0).all()
    # a second run with the same parameters and data loads the selection instead of training again
    calls = []
    select = Refool.select_reflections
    monkeypatch.setattr(Refool, "select_reflections", lambda self, *a, **k: (calls.append(self.seed),
                                                                            select(self, *a, **k))[1])
    again = _planted_refool()
    again.prepare(x, y)
    assert calls == [] and torch.equal(again._state["reflections"], atk._state["reflections"])
    assert torch.equal(again.poison(x, y).x, p.x)
    _planted_refool(seed=1, rounds=1).prepare(x, y)  # another seed is another selection
    assert calls == [1]


def test_refool_selection_is_seeded():
    ds = data.load("synthetic", size=300)
    x, y = data.to_float(ds.x_train), ds.y_train
    budget = dict(crops=2, selected=4, rounds=2, surrogate_epochs=1, surrogate_width=8, surrogate_size=None,
                  validation_size=32)
    a = attacks.get("refool", **budget).select_reflections(x, y)
    b = attacks.get("refool", **budget).select_reflections(x, y)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = attacks.get("refool", seed=1, **budget).select_reflections(x, y)
    assert not torch.equal(a["reflections"], c["reflections"])


def test_refool_random_pool_needs_no_preparation():
    atk = attacks.get("refool", selection="random", crops=2)
    assert atk.prepared
    atk.prepare(torch.rand(20, 3, 32, 32), torch.arange(20) % 10)  # a no-op
    assert torch.equal(atk.pool(3, 32, 32), atk.candidates(3, 32, 32)) and len(atk.pool(3, 32, 32)) == 24
    with pytest.raises(RuntimeError, match="call .prepare"):
        attacks.get("refool").apply(torch.rand(1, 3, 32, 32))


def test_refool_reflections_are_bundled_photos():
    for name in attacks.get("refool").reflections:
        assert (photos.data_dir() / photos.PHOTOS[name]).exists()
    assert photos.photo("astronaut", 3, (32, 32)).shape == (3, 32, 32)


def test_transparent_photo_is_laid_on_white():
    logo = photos.photo("logo")  # RGBA: a round logo on a transparent square
    assert logo.shape[0] == 3
    assert torch.equal(logo[:, :5, :5], torch.ones(3, 5, 5))  # the transparent corner comes out white
    assert logo.std() > 0.2  # the drawing itself is there


def test_adap_blend_trains_on_half_the_pieces_and_tests_on_the_whole_trigger():
    atk = attacks.get("adap-blend", poison_rate=0.05)
    x, y = _data()
    p = atk.poison(x, y)
    assert len(p.cover) == len(p.payload) == 10  # cover rate = poison rate
    key = atk.key(3, 32, 32)
    pieces = atk.piece_map(32, 32)
    for i in p.index.tolist():
        blended = (1 - 0.15) * x[i] + 0.15 * key
        on = torch.isclose(p.x[i], blended, atol=1e-6).all(0)
        off = torch.isclose(p.x[i], x[i]).all(0)
        assert (on | off).all()
        assert len(pieces[on & ~off].unique()) == 8  # 16 pieces, 8 masked out
    assert torch.allclose(atk.apply(x[:2]), 0.8 * x[:2] + 0.2 * key)  # full trigger, test alpha 0.2
    assert attacks.get("adap-blend").poison_rate == 0.003


def test_adap_blend_noise_pattern_is_blends_key():
    noise = attacks.get("adap-blend", pattern="noise", seed=3).key(3, 32, 32)
    assert torch.equal(noise, attacks.get("blend", seed=3).key((3, 32, 32)))
    assert not torch.equal(noise, attacks.get("adap-blend", pattern="noise", seed=4).key(3, 32, 32))
    with pytest.raises(ValueError, match="unknown pattern 'kitty'; valid choices: noise, astronaut"):
        attacks.get("adap-blend", pattern="kitty")


def test_trojan_trigger_raises_the_chosen_neurons():
    ds = data.load("synthetic", size=400)  # images with structure, so that the clean model has real features
    x, y = data.to_float(ds.x_train), ds.y_train
    atk = make("trojan", x, y, surrogate_epochs=2, steps=40)
    model = atk.model(x, y)
    neurons = atk._state["neurons"]
    with torch.no_grad():
        clean = atk.activations(model, x, neurons).mean()
        stamped = atk.activations(model, atk.apply(x), neurons).mean()
    assert stamped > 1.2 * clean + 0.1
    mask = atk._state["mask"]
    assert mask.sum() == 8 * 8 and torch.equal(atk.apply(x)[..., mask == 0], x[..., mask == 0])


def test_cl_perturbation_respects_eps_and_the_trigger_is_in_the_four_corners():
    ds = data.load("synthetic", size=400)  # a clean model with real features, so that PGD has a loss to raise
    x, y = data.to_float(ds.x_train), ds.y_train
    atk = make("cl", x, y, poison_rate=0.05, surrogate_epochs=2)
    p = atk.poison(x, y)
    pattern, mask = atk.corner_mask(32, 32)
    inside = mask.bool()
    d = (p.x[p.index] - x[p.index])[..., ~inside]
    assert d.abs().max() <= 16 / 255 + 1e-3 and d.abs().max() > 8 / 255  # PGD reaches the eps ball
    assert torch.equal(p.x[p.index][..., inside], pattern[inside].expand(len(p.index), 3, -1))
    assert mask.sum() == 4 * 9 and torch.equal(pattern.flip(1), pattern) and torch.equal(pattern.flip(0), pattern)
    test = atk.apply(x[:4])  # the test-time trigger: the pattern alone, no perturbation
    assert torch.equal(test[..., ~inside], x[:4][..., ~inside])
    assert torch.equal(test[..., inside], pattern[inside].expand(4, 3, -1))
    # the perturbation raises the clean model's loss on the (true) target label
    model = atk.model(x, y)
    adv = atk.perturb(x[p.index], y[p.index])
    loss = lambda z: torch.nn.functional.cross_entropy(model(z), y[p.index])
    with torch.no_grad():
        assert loss(adv) > loss(x[p.index])


def test_narcissus_trigger_respects_the_bound_and_is_magnified_at_test_time():
    x, y = _data()
    atk = make("narcissus", poison_rate=0.05)
    t = atk.trigger
    assert t.abs().max() <= 16 / 255 + 1e-6 and t.abs().max() > 0
    p = atk.poison(x, y)
    assert torch.allclose(p.x[p.index], (x[p.index] + t).clamp(0, 1))
    assert torch.allclose(atk.apply(x[:4]), (x[:4] + 3 * t).clamp(0, 1))
    assert attacks.get("narcissus").poison_rate == 0.0005
    # the trigger pushes the surrogate towards the target class
    model = atk.model(x, y)
    with torch.no_grad():
        before = model(x).softmax(1)[:, atk.target].mean()
        after = model(atk.apply(x)).softmax(1)[:, atk.target].mean()
    assert after > before


def test_model_attacks_cache_their_trigger(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    x, y = _data()
    first = make("narcissus")
    files = sorted(p.name for p in (tmp_path / "attacks").iterdir())
    assert any(f.startswith("narcissus-") for f in files) and any(f.startswith("surrogate-") for f in files)
    def fail(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(surrogate, "fit", fail)
    monkeypatch.setattr(attacks.narcissus.Narcissus, "learn", fail)
    second = make("narcissus")
    assert torch.equal(first.trigger, second.trigger)
    monkeypatch.undo()
    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    # another data set gives another trigger
    other = make("narcissus", *_data(seed=1))
    assert not torch.equal(first.trigger, other.trigger)
