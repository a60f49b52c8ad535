import dataclasses

import pytest

from unitlib import config
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


@pytest.mark.parametrize("changes, message", [
    ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
    ({"lr": 0}, "lr must be > 0, got 0"),
    ({"weight_decay": -1}, "weight_decay must be >= 0, got -1"),
    ({"label_smoothing": 2}, "label_smoothing must be in [0, 1), got 2"),
    ({"target": 1.5}, "target must be a class index in 0..9, got 1.5"),
    ({"target": True}, "target must be a class index in 0..9, got True"),
    ({"epochs": True}, "epochs must be an int >= 1, got True"),
    ({"epochs": "ten"}, "epochs must be an int >= 1, got 'ten'"),
    ({"epochs": 4.0}, "epochs must be an int >= 1, got 4.0"),
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"seed": 1.5}, "seed must be an int in 0..4294967295, got 1.5"),
    ({"seed": -1}, "seed must be an int in 0..4294967295, got -1"),
    ({"width": 3.5}, "width must be an int >= 2 or None, got 3.5"),
    ({"train_size": "all"}, "train_size must be an int >= 10 or None, got 'all'"),
    ({"poison_rate": "abc"}, "poison_rate must be a finite number in [0, 1), got 'abc'"),
    ({"poison_rate": False}, "poison_rate must be a finite number in [0, 1), got False"),
    ({"clean_fraction": float("nan")}, "clean_fraction must be a finite number in (0, 1), got nan"),
    ({"dataset": 3}, "dataset must be a string, got 3"),
    ({"activation": None}, "activation must be a string, got None"),
    ({"attack_params": "patch_size=4"}, "attack_params must be a dict of parameter names to values"),
    ({"attack_params": {"patch_size": "abc"}}, "attack 'badnets': patch_size must be an int, got 'abc'"),
    ({"attack_params": {"patch_size": 3.5}}, "attack 'badnets': patch_size must be an int, got 3.5"),
    ({"defense_params": {"steps": True}}, "defense 'unit': steps must be an int, got True"),
    ({"defense_params": {"lr": float("nan")}}, "defense 'unit': lr must be a finite number, got nan"),
    ({"attack": "blend", "attack_params": {"test_alpha": "x"}}, "test_alpha must be a finite number or None, got 'x'"),
    ({"attack": "refool", "attack_params": {"alpha_range": [0.1]}}, "alpha_range must be a list of 2 values"),
])
def test_every_field_is_checked_for_type_and_range(changes, message):
    with pytest.raises(ValueError) as e:
        profile("smoke", **changes)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_numbers_of_the_other_kind_where_valid():
    # an int where a float is asked for is a number all the same; None where None is allowed
    exp = profile("smoke", lr=1, weight_decay=0, width=None, attack_params={"patch_size": 4})
    assert exp.lr == 1 and exp.width is None


def test_smoke_runs_the_short_budgets_the_book_does():
    """At smoke every run is live: an attack or a baseline named there (CLI, grid, notebooks alike) runs its smoke
    budget, not its paper's (minutes to hours on the synthetic data), and the caller's own parameters win."""
    from unitlib import attacks, defenses
    from unitlib.book import report

    exp = profile("smoke", attack="combat", defense="nc")
    assert exp.attack_params == attacks.SMOKE_PARAMS["combat"] and exp.defense_params == defenses.SMOKE_PARAMS["nc"]
    assert exp.poison_rate == config.SMOKE_CLEAN_LABEL_RATE  # clean-label: half the synthetic target class
    mine = profile("smoke", attack="combat", defense="nc", defense_params={"steps": 3}, poison_rate=0.02)
    assert mine.defense_params == {**defenses.SMOKE_PARAMS["nc"], "steps": 3} and mine.poison_rate == 0.02
    # the defaults are untouched where no smoke budget exists, and at the other profiles
    assert profile("smoke") == profile("smoke", attack="badnets", defense="unit")
    assert profile("smoke").defense_params == {"steps": 20, "chunk": 256}
    assert profile("cpu", attack="combat", defense="nc").defense_params == {}
    assert config.smoke_params("cpu", "defense", "nc") == {}
    with pytest.raises(ValueError, match="unknown kind 'model'; valid choices: attack, defense"):
        config.smoke_params("smoke", "model", "nc")
    # the book's cell for the same pair is the same experiment
    sec = report.Section(profile="smoke")
    assert sec.experiment(report.Cell({}, "COMBAT", "NC"), 0) == exp
