import json

import pytest

from unitlib.cli import main, overrides


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert ("attacks: adap-blend, badnets, blend, cl, instagram, narcissus, refool, sig, trojan, wanet" in out
            and "profiles: smoke, cpu, paper" in out)


def test_show_applies_overrides(capsys):
    assert main(["show", "--profile", "cpu", "--set", "epochs=3", "--set", "defense_params.steps=300"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["epochs"] == 3 and cfg["defense_params"] == {"steps": 300} and cfg["dataset"] == "cifar10-jpeg"


@pytest.mark.parametrize("argv,message", [
    (["run", "--profile", "smoke", "--attack", "trojan-x"], "unknown attack 'trojan-x'; valid choices: adap-blend, badnets, blend, cl"),
    (["run", "--profile", "smoke", "--set", "poison_rate=2"], "poison_rate must be in [0, 1), got 2"),
    (["run", "--profile", "smoke", "--set", "epochz=2"], "unknown experiment key(s) epochz; valid keys:"),
    (["run", "--profile", "smoke", "--set", "epochs"], "--set expects key=value"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_compile_mode_names_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--profile", "smoke", "--compile", "fast"])
    assert e.value.code == 2
    assert "invalid choice: 'fast' (choose from" in capsys.readouterr().err
    from unitlib.config import profile
    from unitlib.experiment import run

    with pytest.raises(ValueError, match="unknown compile mode 'fast'; valid choices: off, default, reduce-overhead"):
        run(profile("smoke"), compile="fast", save=False)


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNITLIB_DATA", str(tmp_path))
    code = main(["run", "--profile", "cpu", "--data-root", str(tmp_path / "nowhere"), "--no-save", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar10-jpeg" in err and "UNITLIB_DATA" in err


def test_overrides_parse_json_values():
    assert overrides(["seed=3", "model=resnet18", "attack_params.alpha=0.1", "width=null"]) == {
        "seed": 3, "model": "resnet18", "attack_params": {"alpha": 0.1}, "width": None}


def test_records_lists_each_record_with_what_it_changed(tmp_path, capsys):
    import torch

    from unitlib import results
    from unitlib.config import profile

    for exp, after in [(profile("smoke"), 0.05), (profile("smoke", poison_rate=0.2, defense="ft",
                                                          defense_params={"epochs": 3}), 0.5)]:
        results.save(results.Record(
            key=exp.key(), config=exp.to_dict(),
            metrics={"before": {"clean_acc": 0.9, "asr": 1.0}, "after": {"clean_acc": 0.88, "asr": after}},
            seconds={"train": 2.0, "defense": 1.5}, provenance=results.provenance(torch.device("cpu"))), tmp_path)
    assert main(["records", "--results", str(tmp_path), "--profile", "smoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| profile | attack | defense | changes | acc before")
    assert len(lines) == 4
    ft = next(line for line in lines if "| ft |" in line)
    assert "poison_rate=0.2" in ft and "defense.epochs=3" in ft and "| 50.00 |" in ft
    unit = next(line for line in lines if "| unit |" in line)
    # the smoke profile's own UNIT parameters are not a change
    assert "| badnets | unit |  | 90.00 | 100.00 | 88.00 | 5.00 |" in unit
    assert main(["records", "--results", str(tmp_path), "--profile", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["records", "--results", str(tmp_path), "--csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 3
