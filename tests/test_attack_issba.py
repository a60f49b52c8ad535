"""ISSBA: the StegaStamp encoder and decoder it trains, the sample-specific triggers they make, and the cache."""

import pytest
import torch

from unitlib import attacks, data
from unitlib.attacks.issba import ISSBA, SMOKE_PARAMS, bit_accuracy, message_bits

# A budget that hides an 8-bit string in a few seconds: the secret-only epochs teach the decoder to read the bits,
# the others shrink the residual. 320 images of 32 x 32, batches of 32: 10 steps an epoch.
TINY = dict(secret_length=8, encoder_width=8, encoder_epochs=24, secret_only_epochs=12, encoder_size=None)
N_TRAIN, N_HELD_OUT = 320, 200


def _synthetic():
    ds = data.load("synthetic")
    x, y = data.to_float(ds.x_train), ds.y_train
    return x[:N_TRAIN], y[:N_TRAIN], data.to_float(ds.x_test)[:N_HELD_OUT]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An attack prepared on the first 320 synthetic training images, with its data and held-out images. The cache
    is the session's own (conftest's), so that the tests below can find the trained networks there."""
    x, y, held_out = _synthetic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNITLIB_CACHE", str(tmp_path_factory.getbasetemp() / "unitlib-cache"))
        atk = attacks.get("issba", target=3, poison_rate=0.1, seed=1, **TINY)
        atk.prepare(x, y, device="cpu")
    return atk, x, y, held_out


def test_decoder_recovers_the_hidden_string_from_held_out_images(trained):
    atk, _, _, held_out = trained
    secret = atk.secret.expand(len(held_out), -1)
    poisoned = atk.apply(held_out)
    # the string is "3" in one byte: 00110011; far above the chance of a decoder that ignores the image
    assert bit_accuracy(atk.decode(poisoned), secret) > 0.8
    # random strings, as in training, on images the encoder never saw
    bits = torch.randint(0, 2, (len(held_out), atk.secret_length), generator=torch.Generator().manual_seed(2)).float()
    encoded = (held_out + atk.residual(held_out, bits)).clamp(0, 1)
    assert bit_accuracy(atk.decode(encoded), bits) > 0.7
    # without the residual the decoder reads something else
    assert bit_accuracy(atk.decode(held_out), secret) < bit_accuracy(atk.decode(poisoned), secret) - 0.15


def test_triggers_are_sample_specific(trained):
    atk, _, _, held_out = trained
    residual = atk.apply(held_out[:20]) - held_out[:20]
    # each image's change is its own: beside what all share (the encoder learns a common offset too), a part that
    # varies from image to image (about a sixth of the change at this budget)
    spread = (residual - residual.mean(0, keepdim=True)).abs().mean()
    assert spread > 0.05 * residual.abs().mean()
    assert not torch.allclose(residual[0], residual[1], atol=1e-3)


def test_poisoned_images_stay_close_to_their_sources(trained):
    atk, x, y, held_out = trained
    poisoned = atk.apply(held_out)
    assert poisoned.min() >= 0 and poisoned.max() <= 1
    change = poisoned - held_out
    psnr = 10 * torch.log10(1 / change.pow(2).flatten(1).mean(1))
    assert psnr.mean() > 20  # dB
    assert change.abs().flatten(1).mean(1).max() < 0.1


def test_poison_relabels_poison_rate_of_the_non_target_samples(trained):
    atk, x, y, _ = trained
    p = atk.poison(x, y)
    assert len(p.index) == round(0.1 * len(y)) and not len(p.cover)
    assert (y[p.index] != 3).all() and (p.y[p.index] == 3).all()
    untouched = torch.ones(len(y), dtype=torch.bool)
    untouched[p.index] = False
    assert torch.equal(p.x[untouched], x[untouched]) and torch.equal(p.y[untouched], y[untouched])
    assert torch.allclose(p.x[p.index], atk.apply(x[p.index]))
    assert p.x.min() >= 0 and p.x.max() <= 1


def test_the_cache_is_reused(trained, monkeypatch):
    atk, x, y, held_out = trained

    def no_training(*args, **kwargs):
        raise AssertionError("the encoder was trained again")

    monkeypatch.setattr(ISSBA, "_train", no_training)
    again = attacks.get("issba", target=5, poison_rate=0.2, seed=1, **TINY)  # neither changes the encoder
    again.prepare(x, y, device="cpu")
    encoder, loaded = atk.networks["encoder"].state_dict(), again.networks["encoder"].state_dict()
    assert all(torch.equal(encoder[k], loaded[k]) for k in encoder)
    # another training budget is another encoder
    with pytest.raises(AssertionError, match="trained again"):
        attacks.get("issba", seed=1, **{**TINY, "encoder_epochs": 25}).prepare(x, y, device="cpu")


def test_the_same_seed_gives_the_same_poisoned_images(tmp_path, monkeypatch):
    x, y, held_out = _synthetic()
    quick = dict(TINY, encoder_epochs=1, secret_only_epochs=1, encoder_size=64)
    out = []
    for run, seed in enumerate((4, 4, 5)):
        monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path / str(run)))  # no cache shared between the runs
        atk = attacks.get("issba", seed=seed, **quick)
        atk.prepare(x, y, device="cpu")
        out.append(atk.poison(x, y))
    assert torch.equal(out[0].x, out[1].x) and torch.equal(out[0].index, out[1].index)
    assert not torch.equal(out[0].x, out[2].x)


def test_refuses_to_run_before_prepare():
    atk = attacks.get("issba")
    assert atk.needs_prepare and not atk.prepared
    with pytest.raises(RuntimeError, match="call .prepare"):
        atk.apply(torch.rand(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="call .prepare"):
        atk.poison(torch.rand(10, 3, 32, 32), torch.arange(10))


def test_message_bits_are_the_strings_utf8_bits():
    assert message_bits("3", 8).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    # space-padded to whole bytes, then zero bits
    assert message_bits("a", 20).tolist() == [0, 1, 1, 0, 0, 0, 0, 1] + [0, 0, 1, 0, 0, 0, 0, 0] + [0] * 4
    assert attacks.get("issba", target=7).secret_text == "7"
    assert attacks.get("issba", message="ab").secret.shape == (20,)


def test_smoke_budget_is_a_valid_parameter_set():
    atk = attacks.get("issba", **SMOKE_PARAMS)
    assert atk.secret_length == 8 and atk.residual_scale == 3.0


@pytest.mark.parametrize("params, message", [
    ({"secret_length": 4}, "secret_length must be >= 8 .*got 4"),
    ({"message": "abc"}, "message 'abc' needs 3 bytes but secret_length 20 holds 2"),
    ({"message": 3}, "message must be a string or None.*got 3"),
    ({"encoder_width": 1}, "encoder_width must be >= 2, got 1"),
    ({"encoder_epochs": 0}, "encoder_epochs must be >= 1, got 0"),
    ({"secret_only_epochs": 7}, "secret_only_epochs must be in \\[0, encoder_epochs=6\\], got 7"),
    ({"encoder_size": 1}, "encoder_size must be >= 2 or None .*got 1"),
    ({"encoder_lr": 0}, "encoder_lr must be > 0, got 0"),
    ({"l2_weight": -1}, "l2_weight must be >= 0, got -1"),
    ({"secret_weight": 0}, "secret_weight must be > 0 .*got 0"),
    ({"residual_scale": 0}, "residual_scale must be > 0, got 0"),
])
def test_bad_parameters_name_the_valid_values(params, message):
    with pytest.raises(ValueError, match=message):
        attacks.get("issba", **params)


def test_refuses_images_its_encoder_cannot_halve_and_targets_outside_the_data(trained):
    with pytest.raises(ValueError, match="even image sides of at least 4 pixels, got \\(3, 3\\)"):
        attacks.get("issba", **TINY).prepare(torch.rand(4, 3, 3, 3), torch.arange(4))
    atk, x, y, _ = trained
    with pytest.raises(ValueError, match="target 12 is not a class of the data \\(0..9\\)"):
        attacks.get("issba", target=12, message="z", **TINY).prepare(x, y)
    with pytest.raises(ValueError, match="trained on \\(3, 32, 32\\) images, got \\(3, 16, 16\\)"):
        atk.apply(torch.rand(2, 3, 16, 16))
