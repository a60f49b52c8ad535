"""Fig. 7's attacks whose trigger is a trained encoder or generator (ISSBA, DFST, COMBAT): drawn with their own
gallery budget, which shortens the training and keeps the trigger's strength."""

import pytest
import torch

from unitlib import attacks, data
from unitlib.book.gallery import GALLERY_PARAMS, UNDRAWN, trigger_gallery

NAMES = ["issba", "dfst", "combat"]
# The parameters that set how strong a trigger is and what kind it is: the gallery keeps the defaults.
STRENGTH = {
    "issba": ("secret_length", "message", "residual_scale", "l2_weight", "perceptual_weight", "secret_weight"),
    "dfst": ("alpha", "style", "style_weight", "content_weight", "tv_weight"),
    "combat": ("eps", "low_freq_ratio", "clean_weight", "l2_weight"),
}
# Fewer DFST style steps than the gallery's own (a fixed count, not scaled by the data): the test's data are small.
SHORTER = {"dfst": {"style_steps": 20}}


def _data():
    ds = data.load("synthetic", size=160)
    return data.to_float(ds.x_train), ds.y_train, data.to_float(ds.x_test[:3])


def _draw(seed: int = 0):
    x, y, images = _data()
    return trigger_gallery(NAMES, images, seed=seed, prepare_data=(x, y), params=SHORTER)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """The three panels, drawn once in a cache of their own (which the tests below read back)."""
    cache = tmp_path_factory.mktemp("gallery-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNITLIB_CACHE", str(cache))
        return cache, _draw()


def _prepared(name: str, seed: int = 0):
    """The attack as the gallery builds it, prepared on the same data (loaded from the gallery's cache)."""
    x, y, _ = _data()
    atk = attacks.get(name, target=0, seed=seed, **{**GALLERY_PARAMS[name], **SHORTER.get(name, {})})
    atk.prepare(x, y)
    return atk


def test_gallery_budgets_keep_the_default_strength():
    for name in NAMES:
        assert name not in UNDRAWN
        atk = attacks.get(name, **GALLERY_PARAMS[name])
        defaults = attacks.parameters(name)
        for key in STRENGTH[name]:
            assert getattr(atk, key) == defaults[key], (name, key)
    # the detoxification rounds change the model, not the trigger: the gallery skips them
    assert attacks.get("dfst", **GALLERY_PARAMS["dfst"]).detox_rounds == 0


def test_generator_attacks_drawn_within_their_strength(drawn, monkeypatch):
    cache, panels = drawn
    monkeypatch.setenv("UNITLIB_CACHE", str(cache))
    assert list(panels) == NAMES
    _, _, images = _data()
    for i, name in enumerate(NAMES):
        p = panels[name]
        assert torch.equal(p["clean"], images[i])
        assert p["poisoned"].shape == (3, 32, 32)
        assert torch.allclose(p["difference"], (p["poisoned"] - p["clean"]).abs())
        assert float(p["difference"].mean()) > 1e-3, name  # the trigger changes the image
    clean = torch.stack([panels[n]["clean"] for n in NAMES])
    # COMBAT: within its L-inf bound eps
    eps = attacks.parameters("combat")["eps"]
    assert float(panels["combat"]["difference"].max()) <= eps + 1e-6
    # ISSBA: the image plus the encoder's residual at its own scale (1), nothing stronger
    issba = _prepared("issba")
    assert issba.residual_scale == 1.0
    expected = (clean[:1] + issba.residual(clean[:1])).clamp(0, 1)[0]
    assert torch.allclose(panels["issba"]["poisoned"], expected, atol=1e-5)
    # DFST: the blend of the image with its restyled self at the default weight alpha
    dfst = _prepared("dfst")
    assert dfst.alpha == attacks.parameters("dfst")["alpha"] and dfst.rounds == 0
    restyled = dfst.style_generator()(clean[1:2])
    expected = ((1 - dfst.alpha) * clean[1:2] + dfst.alpha * restyled).clamp(0, 1)[0]
    assert torch.allclose(panels["dfst"]["poisoned"], expected, atol=1e-5)


def test_generator_panels_repeat_with_the_seed(drawn, tmp_path, monkeypatch):
    _, first = drawn
    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path / "fresh"))  # trained again, not read from the cache
    again = _draw()
    for name in NAMES:
        for key in ("clean", "poisoned", "difference"):
            assert torch.allclose(again[name][key], first[name][key], atol=1e-5), (name, key)
