import dataclasses

import pytest

from unitlib.config import PROFILES, Experiment, profile


@pytest.mark.parametrize("name", list(PROFILES))
def test_profiles_are_valid(name):
    exp = profile(name)
    assert exp.profile == name
    assert Experiment.from_dict(exp.to_dict()) == exp


def test_paper_profile_is_the_appendix_setting():
    exp = profile("paper")
    assert (exp.dataset, exp.model, exp.poison_rate, exp.clean_fraction, exp.target) == (
        "cifar10", "resnet18", 0.1, 0.05, 0)
    assert exp.make_defense().degradation == 0.02


def test_key_is_stable_and_discriminating():
    a, b = profile("smoke"), profile("smoke")
    assert a.key() == b.key() and hash(a) == hash(b)
    assert len(a.key()) == 64
    assert a.replace(seed=1).key() != a.key()
    assert a.replace(attack_params={"patch_size": 4}).key() != a.key()


def test_model_key_ignores_the_defense():
    a = profile("smoke")
    b = a.replace(defense="none", clean_fraction=0.1)
    assert a.model_key() == b.model_key()
    assert a.key() != b.key()
    assert a.replace(poison_rate=0.05).model_key() != a.model_key()


def test_unknown_key_names_valid_keys():
    with pytest.raises(ValueError, match="unknown experiment key.*bogus.*valid keys:.*poison_rate"):
        profile("smoke", bogus=1)


def test_unknown_profile():
    with pytest.raises(ValueError, match="unknown profile 'gpu'; valid choices: smoke, cpu, paper"):
        profile("gpu")


def test_unknown_attack_lists_choices():
    with pytest.raises(ValueError, match=r"unknown attack 'badnet'; valid choices: .*badnets.*blend"):
        profile("smoke", attack="badnet")


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_poison_rate(rate):
    with pytest.raises(ValueError, match=f"poison_rate must be in \\[0, 1\\), got {rate}"):
        profile("smoke", poison_rate=rate)


def test_bad_values_name_choices():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; valid choices:.*cifar10-jpeg"):
        profile("smoke", dataset="mnist")
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid choices:.*resnet18"):
        profile("smoke", model="vgg")
    with pytest.raises(ValueError, match="unknown activation 'swish'; valid choices:.*tanhshrink"):
        profile("smoke", activation="swish")
    with pytest.raises(ValueError, match="clean_fraction must be in"):
        profile("smoke", clean_fraction=0)
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) stepz for defense 'unit'; valid parameters:.*steps"):
        profile("smoke", defense_params={"stepz": 3})
    with pytest.raises(ValueError, match="unknown granularity 'neuron'"):
        profile("smoke", defense_params={"granularity": "neuron"})
    with pytest.raises(ValueError, match="unknown BadNets pattern"):
        profile("smoke", attack_params={"pattern": "flower"})


def test_switching_defense_drops_its_parameters():
    exp = profile("smoke")
    assert exp.defense_params  # the smoke profile shortens UNIT
    assert profile("smoke", defense="none").defense_params == {}


def test_frozen_and_isolated_from_caller_dicts():
    params = {"patch_size": 4}
    exp = profile("smoke", attack_params=params)
    params["patch_size"] = 5
    assert exp.attack_params == {"patch_size": 4}
    with pytest.raises(dataclasses.FrozenInstanceError):
        exp.seed = 3  # type: ignore[misc]
