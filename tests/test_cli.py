import dataclasses
import json

import pytest

from unitlib.book import cli as book_cli
from unitlib.cli import main, overrides


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    from unitlib import attacks

    assert f"attacks: {', '.join(sorted(attacks.ATTACKS))}\n" in out and "profiles: smoke, cpu, paper" in out
    assert {"badnets", "dynamic", "ia", "lira", "refool", "wanet"} <= set(sorted(attacks.ATTACKS))


def test_show_applies_overrides(capsys):
    assert main(["show", "--profile", "cpu", "--set", "epochs=3", "--set", "defense_params.steps=300"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["epochs"] == 3 and cfg["defense_params"] == {"steps": 300} and cfg["dataset"] == "cifar10-jpeg"


@pytest.mark.parametrize("argv,message", [
    (["run", "--profile", "smoke", "--attack", "trojan-x"], "unknown attack 'trojan-x'; valid choices: activation-suppression, adap-blend, badnets"),
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
    assert book_cli.main(["records", "--results", str(tmp_path), "--profile", "smoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| profile | attack | defense | changes | acc before")
    assert len(lines) == 4
    ft = next(line for line in lines if "| ft |" in line)
    assert "poison_rate=0.2" in ft and "defense.epochs=3" in ft and "| 50.00 |" in ft
    unit = next(line for line in lines if "| unit |" in line)
    # the smoke profile's own UNIT parameters are not a change
    assert "| badnets | unit |  | 90.00 | 100.00 | 88.00 | 5.00 |" in unit
    assert book_cli.main(["records", "--results", str(tmp_path), "--profile", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert book_cli.main(["records", "--results", str(tmp_path), "--csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 3


@pytest.fixture
def no_data_load(monkeypatch):
    """Fails the test if the run gets as far as loading data."""
    from unitlib import data

    def refuse(*args, **kwargs):
        raise AssertionError("data were loaded before the bad input was refused")

    monkeypatch.setattr(data, "load", refuse)


@pytest.mark.parametrize("args, message", [
    (["--set", "lr=NaN"], "lr must be a finite number > 0, got nan"),
    (["--set", "target=1.5"], "target must be a class index in 0..9, got 1.5"),
    (["--set", "weight_decay=-1"], "weight_decay must be >= 0, got -1"),
    (["--set", "lr=0"], "lr must be > 0, got 0"),
    (["--set", "epochs=true"], "epochs must be an int >= 1, got True"),
    (["--set", "epochs=ten"], "epochs must be an int >= 1, got 'ten'"),
    (["--set", "poison_rate=abc"], "poison_rate must be a finite number in [0, 1), got 'abc'"),
    (["--set", "seed=1.5"], "seed must be an int in 0..4294967295, got 1.5"),
    (["--set", "width=3.5"], "width must be an int >= 2 or None, got 3.5"),
    (["--set", "label_smoothing=2"], "label_smoothing must be in [0, 1), got 2"),
    (["--set", "attack_params.patch_size=big"], "attack 'badnets': patch_size must be an int, got 'big'"),
    (["--device", "nonsense"], "unknown device 'nonsense'; valid: auto, cpu, cuda, cuda:N (N a GPU index), mps"),
    (["--device", "cuda:99"], "device 'cuda:99' asked for, but"),
])
def test_bad_values_are_one_line_before_any_data_load(args, message, tmp_path, capsys, no_data_load):
    assert main(["run", "--profile", "smoke", "--results", str(tmp_path), "--quiet", *args]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    assert not list(tmp_path.iterdir())  # no record


def test_unwritable_results_fail_before_the_run(tmp_path, capsys, no_data_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "--profile", "smoke", "--results", str(blocker / "records"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: results directory") and str(blocker / "records") in err and "not writable" in err


def test_records_skip_a_bad_file_with_a_warning_naming_it(tmp_path, capsys):
    import torch

    from unitlib import results
    from unitlib.config import profile

    exp = profile("smoke")
    good = results.Record(key=exp.key(), config=exp.to_dict(),
                          metrics={"before": {"clean_acc": 0.9, "asr": 1.0}, "after": {"clean_acc": 0.88, "asr": 0.05}},
                          seconds={"train": 2.0}, provenance=results.provenance(torch.device("cpu")))
    results.save(good, tmp_path)
    (tmp_path / "truncated.json").write_text('{"key": "abc", "config": {')
    wordy = json.loads(json.dumps(dataclasses.asdict(good)))
    wordy["key"] = "f" * 64
    wordy["metrics"]["after"]["asr"] = "high"
    (tmp_path / "wordy.json").write_text(json.dumps(wordy))
    assert book_cli.main(["records", "--results", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and "| 88.00 | 5.00 |" in lines[2]
    assert "high" not in out
    warnings = err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: skipping ") for w in warnings)
    assert any(str(tmp_path / "truncated.json") in w and "not a readable JSON record" in w for w in warnings)
    assert any(str(tmp_path / "wordy.json") in w and "metrics.after.asr must be a number in [0, 1], got 'high'" in w
               for w in warnings)


def test_records_from_a_folder_that_is_not_there(tmp_path, capsys):
    assert book_cli.main(["records", "--results", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory of records" in capsys.readouterr().err


def test_records_of_an_unknown_profile(tmp_path, capsys):
    assert book_cli.main(["records", "--results", str(tmp_path), "--profile", "gpu"]) == 2
    assert "unknown profile 'gpu'; valid choices: smoke, cpu, paper" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["records", "grid"])
def test_the_core_cli_says_where_the_book_commands_are(command, capsys):
    assert main([command, "--profile", "cpu", "--csv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"python -m unitlib.book {command} --profile cpu --csv" in err
    assert "pip install 'unitlib[book]'" in err


def test_grid_command_lists_the_missing_cells(tmp_path, capsys):
    assert book_cli.main(["grid", "--profile", "smoke", "--table", "11", "--list", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("profile smoke: 1 item(s) (Table 11)") and "to run on 1 backdoored model(s)" in out
    assert out.count(" -> unit") == 5


def test_grid_command_refuses_a_bad_selection(capsys):
    assert book_cli.main(["grid", "--profile", "cpu", "--table", "13"]) == 2
    assert "unknown table or figure '13'; valid choices: A.1" in capsys.readouterr().err
    assert book_cli.main(["grid", "--profile", "cpu"]) == 2
    assert "nothing selected" in capsys.readouterr().err
