import pytest
import torch

from unitlib import attacks


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 10


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_poison_contract(name):
    x, y = _data()
    atk = attacks.get(name, target=3, poison_rate=0.1, seed=1)
    p = atk.poison(x, y)
    assert p.x.shape == x.shape and p.x.dtype == x.dtype
    assert 0 <= p.x.min() and p.x.max() <= 1
    assert len(p.index) == 20
    untouched = torch.ones(len(x), dtype=torch.bool)
    untouched[p.index] = False
    assert torch.equal(p.x[untouched], x[untouched]) and torch.equal(p.y[untouched], y[untouched])
    assert not torch.equal(p.x[p.index], x[p.index])
    if atk.clean_label:
        assert torch.equal(p.y, y) and (y[p.index] == 3).all()
    else:
        assert (p.y[p.index] == 3).all() and (y[p.index] != 3).all()
    # the inputs are not modified in place
    assert torch.equal(_data()[0], x)


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_deterministic_given_seed(name):
    x, y = _data()
    a = attacks.get(name, seed=5).poison(x, y)
    b = attacks.get(name, seed=5).poison(x, y)
    assert torch.equal(a.x, b.x) and torch.equal(a.index, b.index)
    c = attacks.get(name, seed=6).poison(x, y)
    assert not torch.equal(a.index, c.index)


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_test_trigger_matches_training_trigger(name):
    x, y = _data(50)
    atk = attacks.get(name, poison_rate=0.2)
    p = atk.poison(x, y)
    assert torch.allclose(atk.apply(x[p.index]).clamp(0, 1), p.x[p.index])


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
    with pytest.raises(ValueError, match="unknown attack 'wanet2'; valid choices: badnets, blend"):
        attacks.get("wanet2")
    with pytest.raises(ValueError, match="poison_rate must be in \\[0, 1\\], got 1.5"):
        attacks.get("badnets", poison_rate=1.5)
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) size for attack 'badnets'; valid parameters:"):
        attacks.get("badnets", size=3)
    with pytest.raises(ValueError, match="asks for 190 poisoned samples but only 180 non-target samples"):
        attacks.get("badnets", poison_rate=0.95).poison(*_data())
