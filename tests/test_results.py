import json
import re

import pytest
import torch

from unitlib import models, results
from unitlib.config import profile


def _record(**kw):
    exp = profile("smoke")
    return results.Record(key=exp.key(), config=exp.to_dict(), metrics={"before": {"clean_acc": 0.9, "asr": 1.0},
                          "after": {"clean_acc": 0.88, "asr": 0.05}}, seconds={"train": 1.0},
                          provenance=results.provenance(torch.device("cpu")), **kw)


def test_record_roundtrip_and_find(tmp_path):
    rec = _record()
    path = results.save(rec, tmp_path)
    assert path.name.startswith("synthetic__badnets__unit__") and path.suffix == ".json"
    assert results.load(path) == rec
    assert results.find(profile("smoke"), tmp_path) == rec
    assert results.find(profile("smoke", seed=3), tmp_path) is None
    assert rec.experiment == profile("smoke")
    assert [r.key for r in results.load_all(tmp_path)] == [rec.key]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_provenance_fields():
    p = results.provenance(torch.device("cpu"))
    assert {"code_version", "device", "device_name", "torch", "torchvision", "python", "created"} <= set(p)
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", p["code_version"])


def test_code_version_without_git_or_declared(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "REPO_ROOT", tmp_path)  # a copy of the tree without .git
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("UNITLIB_CODE_VERSION", raising=False)
    assert results.code_version() == "unknown"
    monkeypatch.setenv("UNITLIB_CODE_VERSION", "0123abc")
    assert results.code_version() == "0123abc (declared)"


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = results.write_json(tmp_path / "r.json", {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", boom)
    with pytest.raises(OSError):
        results.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}


def test_schema_mismatch_is_refused(tmp_path):
    path = results.save(_record(), tmp_path)
    data = json.loads(path.read_text())
    data["schema"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema 99"):
        results.load(path)


def test_model_save_load_is_safetensors(tmp_path):
    m = models.build("small-cnn", width=4)
    path = results.save_model(m, tmp_path / "m.safetensors", {"k": "v"})
    assert path.read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    m2 = results.load_model(models.build("small-cnn", width=4), path)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_model_path_uses_cache_model_key_and_data_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    exp = profile("smoke")
    path = results.model_path(exp, "a" * 64)
    assert path.parent == tmp_path / "models" and path.suffix == ".safetensors"
    assert path == results.model_path(exp.replace(defense="none"), "a" * 64)
    assert path != results.model_path(exp, "b" * 64)
    assert path != results.model_path(exp.replace(seed=1), "a" * 64)


def test_model_path_changes_when_the_attack_changes_its_defaults_or_trigger(tmp_path, monkeypatch):
    # a model trained before an attack's defaults changed must not be reused as if made the new way
    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    exp = profile("smoke", attack="badnets")
    path = results.model_path(exp, "a" * 64)
    cls = type(exp.make_attack())
    original = cls.params
    monkeypatch.setattr(cls, "params", lambda self: {**original(self), "patch_size": 99})  # a new default
    assert results.model_path(exp, "a" * 64) != path
    monkeypatch.setattr(cls, "params", original)
    assert results.model_path(exp, "a" * 64) == path
    monkeypatch.setattr(cls, "cache_version", cls.cache_version + 1)  # the same parameters, a new trigger
    assert results.model_path(exp, "a" * 64) != path


@pytest.mark.parametrize("text, message", [
    ('{"key": "abc", "config": {', "not a readable JSON record (JSONDecodeError"),
    ("[1, 2]", "a record is a JSON object, got list"),
])
def test_load_names_the_file_it_cannot_read(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        results.load(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


@pytest.mark.parametrize("stage, metric, value", [("after", "asr", "0.05"), ("before", "clean_acc", 90.0),
                                                  ("after", "clean_acc", None), ("before", "asr", True)])
def test_load_refuses_metrics_that_are_not_fractions(tmp_path, stage, metric, value):
    path = results.save(_record(), tmp_path)
    data = json.loads(path.read_text())
    data["metrics"][stage][metric] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"{path}: metrics.{stage}.{metric} must be a number in [0, 1], "
                                                   f"got {value!r}")):
        results.load(path)


def test_load_refuses_a_record_with_missing_or_unknown_fields(tmp_path):
    path = results.save(_record(), tmp_path)
    data = json.loads(path.read_text())
    del data["seconds"]
    data["extra"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a record (unknown field(s) extra; missing seconds)")):
        results.load(path)


def test_load_all_skips_a_bad_file_with_a_warning_naming_it(tmp_path):
    rec = _record()
    results.save(rec, tmp_path)
    (tmp_path / "a-truncated.json").write_text('{"schema": 1, "key": ')
    with pytest.warns(UserWarning, match=re.escape(f"skipping {tmp_path / 'a-truncated.json'}: not a readable")):
        assert results.load_all(tmp_path) == [rec]


def test_check_writable(tmp_path):
    assert results.check_writable(tmp_path / "new" / "records").is_dir()  # created
    assert not list((tmp_path / "new" / "records").iterdir())  # the probe is gone
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"results directory '{tmp_path / 'file' / 'sub'}' is not writable")):
        results.check_writable(tmp_path / "file" / "sub")


def test_find_skips_a_damaged_record_with_a_warning(tmp_path):
    path = results.save(_record(), tmp_path)
    path.write_text(path.read_text()[:50])
    with pytest.warns(UserWarning, match=re.escape(f"skipping {path}: not a readable JSON record")):
        assert results.find(profile("smoke"), tmp_path) is None


def test_a_record_made_under_other_defaults_is_stale(tmp_path):
    """The key hashes only the parameters an experiment sets; a changed default makes the record another
    experiment, which `find` and the book's lookup no longer return."""
    exp = profile("smoke")
    resolved = {"attack": exp.make_attack().params(), "defense": exp.make_defense().params()}
    rec = _record(report={"resolved": resolved})
    results.save(rec, tmp_path)
    assert results.stale_reason(rec, exp) is None
    assert results.find(exp, tmp_path) == rec
    old = _record(report={"resolved": {**resolved, "defense": {**resolved["defense"], "patience": 1}}})
    results.save(old, tmp_path)
    assert results.stale_reason(old, exp) == "defense defaults changed since it was made: patience 1 -> 5"
    assert results.stale_reason(old, exp, defense=False) is None  # the undefended model is the same
    assert results.find(exp, tmp_path) is None
    from unitlib.book.report import RecordIndex
    index = RecordIndex([tmp_path])
    assert index.lookup(exp) == (None, "after")
    assert index.lookup(exp, undefended=True)[0] == old


def test_a_record_made_before_the_attack_raised_its_cache_version_is_stale(tmp_path, monkeypatch):
    """An attack that changes how it poisons without a parameter to show it raises ``cache_version``: records
    made at the old version (those without one count as version 1) stop describing it."""
    exp = profile("smoke")
    cls = type(exp.make_attack())
    resolved = {"attack": exp.make_attack().params(), "defense": exp.make_defense().params()}
    rec = _record(report={"resolved": resolved})  # made before records stored the version: version 1
    results.save(rec, tmp_path)
    assert results.stale_reason(rec, exp) is None
    monkeypatch.setattr(cls, "cache_version", 2)
    assert results.stale_reason(rec, exp) == "the attack's poisoning changed since it was made (cache_version 1 -> 2)"
    assert results.stale_reason(rec, exp, defense=False) is not None  # the undefended model changed too
    assert results.find(exp, tmp_path) is None
    now = _record(report={"resolved": {**resolved, "attack_version": 2}})
    assert results.stale_reason(now, exp) is None


def test_a_parameter_added_at_its_old_behaviour_keeps_records_and_models(tmp_path):
    """An attack that gains an option (``added_params``) keeps the records and cached models made before it: a
    record without the parameter reads as made at the value it was added with, and the model key leaves it out
    there. Any other value is another experiment."""
    exp = profile("smoke", attack="activation-suppression", attack_params={"alpha": 1.0})
    resolved = {"attack": exp.make_attack().params(), "defense": exp.make_defense().params()}
    assert resolved["attack"]["objective"] == "poisoned"
    before = {**resolved, "attack": {k: v for k, v in resolved["attack"].items() if k != "objective"}}
    assert results.stale_reason(_record(report={"resolved": before}), exp) is None
    paired = exp.replace(attack_params={"alpha": 1.0, "objective": "paired"})
    assert results.stale_reason(_record(report={"resolved": before}), paired) == (
        "attack defaults changed since it was made: objective 'poisoned' -> 'paired'")
    # the cache key is the one the attack had before the option existed
    from unitlib.attacks.adaptive import ActivationSuppression

    key = results.attack_identity(exp)
    assert results.attack_identity(paired) != key
    added = ActivationSuppression.added_params
    try:
        ActivationSuppression.added_params = {}
        assert results.attack_identity(exp) != key  # without the declaration the new field would change the key
    finally:
        ActivationSuppression.added_params = added


def test_unit_table_names_the_model_where_the_official_run_had_another_training(tmp_path):
    from unitlib.book import report
    from unitlib.book.report import Cell, Section
    from unitlib.defenses.unit import OFFICIAL_SCHEDULE

    sec = Section(name="unit", profile="cpu")

    def save(params, before_acc):
        exp = sec.experiment(Cell({}, "BadNets", "UNIT", defense_params=params), 0)
        rep = {"best_step": 5, "steps_run": 9, "stop_reason": "budget", "final_val_acc": 0.85, "threshold": 0.84,
               "history": []}
        results.save(results.Record(key=exp.key(), config=exp.to_dict(), report=rep, seconds={"defense": 3.0},
                                    metrics={"before": {"clean_acc": before_acc, "asr": 1.0},
                                             "after": {"clean_acc": 0.8, "asr": 0.02}},
                                    provenance=results.provenance(torch.device("cpu"))), tmp_path)

    save({}, 0.84)
    save(dict(OFFICIAL_SCHEDULE), 0.84)
    row = report.unit_table("cpu", seeds=(0,), directory=tmp_path).iloc[0]
    assert (row["no defense"], row["UNIT"], row["official"]) == ("84.00 / 100.00", "80.00 / 2.00", "80.00 / 2.00")
    save(dict(OFFICIAL_SCHEDULE), 0.83)  # the official run's model: another training of the same configuration
    row = report.unit_table("cpu", seeds=(0,), directory=tmp_path).iloc[0]
    assert (row["no defense"], row["official"]) == ("84.00 / 100.00", "80.00 / 2.00 (model at 83.00 / 100.00)")


def test_weights_digest_names_the_weights_not_their_layout():
    import torch

    from unitlib import models
    from unitlib.results import weights_digest

    torch.manual_seed(0)
    a = models.build("small-cnn", num_classes=10, in_channels=3, width=8)
    b = models.build("small-cnn", num_classes=10, in_channels=3, width=8)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b) == weights_digest(b.to(memory_format=torch.channels_last))
    with torch.no_grad():
        first = next(b.parameters())
        first[(0,) * first.dim()] += 1e-3
    assert weights_digest(a) != weights_digest(b)
