import re

import pytest
import torch

from unitlib import attacks
from unitlib.attacks.joint import train_with_model

# Tiny budgets for the attacks that learn their trigger from a model (seconds on a CPU); IA and Dynamic train their
# generator with a tiny model for one epoch (make() below).
TINY = {
    "trojan": dict(surrogate_epochs=1, surrogate_width=8, surrogate_size=None, steps=20, candidates=4),
    "cl": dict(surrogate_epochs=1, surrogate_width=8, surrogate_size=None, steps=3),
    "narcissus": dict(surrogate_epochs=1, surrogate_width=8, surrogate_size=None, steps=20),
    "refool": dict(surrogate_epochs=1, surrogate_width=8, surrogate_size=None, crops=2, selected=4, rounds=2,
                   validation_size=32),
    "ia": dict(generator_width=2, mask_epochs=1, mask_size=None),
    "dynamic": dict(),
    "lira": dict(generator_width=4),
    "issba": dict(secret_length=8, encoder_width=4, encoder_epochs=1, secret_only_epochs=1, encoder_size=64),
    "dfst": dict(generator_width=4, generator_blocks=0, style_steps=10, detox_rounds=1, detox_epochs=1,
                 detox_size=32, surrogate_epochs=1, surrogate_width=4, surrogate_size=None),
    "combat": dict(surrogate_epochs=1, surrogate_width=8, surrogate_size=None, generator_width=4, generator_epochs=2,
                   batch_size=64),
}


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 10


def make(name, x=None, y=None, **params):
    """The attack ``name``, prepared on (x, y) (default: ``_data()``) when it needs a model."""
    atk = attacks.get(name, **{**TINY.get(name, {}), **params})
    if atk.needs_prepare:
        if x is None:
            x, y = _data()
        if getattr(atk, "trains_with_model", False):
            train_with_model(atk, x, y, epochs=1, width=4, batch_size=64)
        else:
            atk.prepare(x, y)
    return atk


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_poison_contract(name):
    x, y = _data()
    atk = make(name, target=3, poison_rate=0.1, seed=1)
    p = atk.poison(x, y)
    assert p.x.shape == x.shape and p.x.dtype == x.dtype
    assert 0 <= p.x.min() and p.x.max() <= 1
    # the payload is poison_rate of the set; cover samples (WaNet's noise mode, Adap-Blend's regularisation
    # samples) come on top, are part of index, and keep their labels
    assert len(p.payload) == 20
    assert torch.equal(p.index, p.index.unique()) and torch.isin(p.cover, p.index).all()
    untouched = torch.ones(len(x), dtype=torch.bool)
    untouched[p.index] = False
    assert torch.equal(p.x[untouched], x[untouched]) and torch.equal(p.y[untouched], y[untouched])
    assert (p.x[p.index] != x[p.index]).flatten(1).any(1).all()  # every reported sample was changed
    assert torch.equal(p.y[p.cover], y[p.cover])
    if atk.clean_label:
        assert torch.equal(p.y, y) and (y[p.index] == 3).all() and not len(p.cover)
    else:
        assert (p.y[p.payload] == 3).all() and (y[p.payload] != 3).all()
    # the inputs are not modified in place
    assert torch.equal(_data()[0], x)


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_deterministic_given_seed(name):
    x, y = _data()
    # 5% of 200: 10 of the 20 target-class samples for clean-label attacks, so another seed can pick others
    a = make(name, seed=5, poison_rate=0.05).poison(x, y)
    b = make(name, seed=5, poison_rate=0.05).poison(x, y)
    assert torch.equal(a.x, b.x) and torch.equal(a.index, b.index) and torch.equal(a.cover, b.cover)
    c = make(name, seed=6, poison_rate=0.05).poison(x, y)
    assert not torch.equal(a.index, c.index)


# Attacks whose test-time trigger is, by the paper, not the training one; each has its own test below.
TEST_VARIANT = {"adap-blend", "cl", "narcissus", "refool", "wanet"}


@pytest.mark.parametrize("name", sorted(set(attacks.ATTACKS) - TEST_VARIANT))
def test_test_trigger_matches_training_trigger(name):
    x, y = _data(50)
    atk = make(name, poison_rate=0.1)
    p = atk.poison(x, y)
    # the payload (the trigger-specific attack's negative samples carry a noisy trigger on purpose)
    assert torch.allclose(atk.apply(x[p.payload]).clamp(0, 1), p.x[p.payload])


def test_every_attack_is_covered_by_a_trigger_test():
    # refool draws a fresh reflection per call, wanet's payload trigger is tested in test_wanet_*
    assert TEST_VARIANT <= set(attacks.ATTACKS)


def test_badnets_patch_is_where_it_should_be():
    atk = attacks.get("badnets", patch_size=3, location="bottom-right", margin=1)
    x = torch.full((1, 3, 32, 32), 0.5)
    out = atk.apply(x)
    changed = (out != x).any(1)[0]
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert rows.min() >= 28 and rows.max() <= 30 and cols.min() >= 28 and cols.max() <= 30
    assert set(out[0, :, 28:31, 28:31].unique().tolist()) == {0.0, 1.0}  # black-and-white checkerboard


def test_blend_is_a_convex_combination():
    atk = attacks.get("blend", alpha=0.2)
    x = torch.zeros(2, 3, 32, 32)
    key = atk.key((3, 32, 32))
    assert torch.allclose(atk.apply(x), 0.2 * key.expand(2, -1, -1, -1))
    assert torch.allclose(attacks.get("blend", alpha=0.2, test_alpha=0.3).apply(x), 0.3 * key.expand(2, -1, -1, -1))


def test_bad_input_errors():
    names = sorted(attacks.ATTACKS)
    assert {"badnets", "combat", "dfst", "dynamic", "ia", "issba", "lira", "refool", "wanet"} <= set(names)
    with pytest.raises(ValueError, match=re.escape(f"unknown attack 'wanet2'; valid choices: {', '.join(names)}")):
        attacks.get("wanet2")
    with pytest.raises(ValueError, match="poison_rate must be in \\[0, 1\\], got 1.5"):
        attacks.get("badnets", poison_rate=1.5)
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) size for attack 'badnets'; valid parameters:"):
        attacks.get("badnets", size=3)
    with pytest.raises(ValueError, match="asks for 190 poisoned samples but only 180 non-target samples"):
        attacks.get("badnets", poison_rate=0.95).poison(*_data())


@pytest.mark.parametrize("name, params, message", [
    ("sig", {"delta": 300}, "delta must be in \\(0, 255\\].*got 300"),
    ("sig", {"frequency": 0}, "frequency must be > 0.*got 0"),
    ("wanet", {"k": 1}, "k must be >= 2.*got 1"),
    ("wanet", {"s": -1}, "s must be > 0.*got -1"),
    ("instagram", {"filter": "sepia"}, "unknown Instagram filter 'sepia'; valid choices: _1977, aden"),
    ("refool", {"kinds": ("mirror",)}, "unknown reflection kind\\(s\\) \\['mirror'\\]; valid choices: in-focus"),
    ("refool", {"reflections": ("lena",)}, "unknown reflection photo\\(s\\) \\['lena'\\]; valid choices: astronaut"),
    ("refool", {"alpha_range": (0.9, 0.1)}, "alpha_range must be a pair \\(low, high\\) with 0.0 <= low"),
    ("refool", {"selection": "best"}, "unknown selection 'best'; valid choices: adversarial, random"),
    ("refool", {"selected": 0}, "selected must be in 1..192 \\(len\\(reflections\\) x crops candidates\\), got 0"),
    ("refool", {"crops": 2, "selected": 25}, "selected must be in 1..24 .*got 25"),
    ("refool", {"rounds": 0}, "rounds must be >= 1, got 0"),
    ("refool", {"round_poison_rate": 0}, "round_poison_rate must be in \\(0, 1\\], got 0"),
    ("refool", {"validation_size": 0}, "validation_size must be >= 1, got 0"),
    ("refool", {"surrogate_size": 5}, "surrogate_size must be >= 10 or None, got 5"),
    ("adap-blend", {"pieces": 15}, "pieces must be a square number >= 1.*got 15"),
    ("adap-blend", {"masked_pieces": 16}, "masked_pieces must be in \\[0, 15\\], got 16"),
    ("adap-blend", {"pattern": "kitty"}, "unknown pattern 'kitty'; valid choices: noise,"),
    ("trojan", {"area": 0.9}, "area must be in \\(0, 0.5\\].*got 0.9"),
    ("trojan", {"location": "centre"}, "unknown Trojan location 'centre'; valid choices: bottom-right"),
    ("cl", {"eps": 2}, "eps must be in \\[0, 1\\].*got 2"),
    ("cl", {"amplitude": 0}, "amplitude must be in \\(0, 1\\], got 0"),
    ("narcissus", {"pood": "tiny-imagenet"}, "unknown pood 'tiny-imagenet'; valid choices: other-classes"),
    ("narcissus", {"test_multiplier": 0}, "test_multiplier must be > 0, got 0"),
    ("narcissus", {"surrogate_epochs": 0}, "surrogate_epochs must be >= 1, got 0"),
])
def test_bad_parameter_values_name_the_valid_range(name, params, message):
    with pytest.raises(ValueError, match=message):
        attacks.get(name, **params)


@pytest.mark.parametrize("name", ["trojan", "narcissus", "refool"])
def test_model_attacks_refuse_to_run_before_prepare(name):
    atk = attacks.get(name)
    assert atk.needs_prepare and not atk.prepared
    with pytest.raises(RuntimeError, match=f"attack '{name}' learns its trigger from a model: call .prepare"):
        atk.apply(torch.rand(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="call .prepare"):
        atk.poison(*_data())


def test_cl_poison_needs_prepare_but_its_test_trigger_does_not():
    atk = attacks.get("cl")
    with pytest.raises(RuntimeError, match="call .prepare"):
        atk.poison(*_data())
    assert atk.apply(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_fixed_trigger_attacks_need_no_prepare():
    for name in sorted(attacks.ATTACKS):
        atk = attacks.get(name)
        assert atk.prepared == (name not in TINY)
