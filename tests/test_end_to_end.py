"""The whole path on the `smoke` profile: the attack plants a backdoor, UNIT removes it within its budget, a record
is written, and a second run reuses the cached backdoored model."""

import json

import pytest

from unitlib import models, results
from unitlib.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("UNITLIB_CACHE", str(cache))
    argv = ["run", "--profile", "smoke", "--attack", "badnets", "--defense", "unit", "--results", str(out), "--quiet"]
    try:
        assert main(argv) == 0
        first = results.load_all(out)
        assert main(argv) == 0
        second = results.load_all(out)
    finally:
        mp.undo()
    return first, second, out


def test_attack_plants_and_unit_removes_the_backdoor(runs):
    (rec,), _, _ = runs
    before, after = rec.metrics["before"], rec.metrics["after"]
    assert before["asr"] >= 0.9 and before["clean_acc"] >= 0.8
    assert after["asr"] <= 0.2
    # the budget is checked on the defender's validation split; allow sampling noise on the test set
    assert before["clean_acc"] - after["clean_acc"] <= rec.experiment.make_defense().degradation + 0.05
    assert rec.report["threshold_met"]


def test_record_carries_provenance(runs):
    (rec,), _, out = runs
    assert rec.provenance["dataset"] == "synthetic"
    assert rec.provenance["model_from_cache"] is False
    assert {"data", "poison", "train", "defense", "eval_before", "eval_after"} <= set(rec.seconds)
    raw = json.loads(next(out.glob("*.json")).read_text())
    assert raw["config"]["attack"] == "badnets" and raw["key"] == rec.key


def test_second_run_reuses_the_cached_model(runs):
    (first,), (second,), _ = runs
    assert second.provenance["model_from_cache"] is True
    # how the model's training steps ran travels with the cached model
    assert first.provenance["compile"] == second.provenance["compile"] == "off"
    assert second.metrics["before"] == first.metrics["before"]
    # the undefended model's metrics are measured once per model file and reused
    assert first.provenance["before_from_cache"] is False and second.provenance["before_from_cache"] is True
    assert second.seconds["train"] < first.seconds["train"]
    # the defense sees the same model whether it was just trained or read from the cache, so a record can be
    # re-made: the model just trained is channels-last, and that rounding alone moved UNIT's kept step
    assert second.metrics["after"] == first.metrics["after"]
    assert second.report["best_step"] == first.report["best_step"]
    # the weights' digest names the training: the same model just trained and read back from the cache
    assert len(first.provenance["weights_sha256"]) == 64
    assert second.provenance["weights_sha256"] == first.provenance["weights_sha256"]
    # and where it was trained travels with it: the cached model's record names the run that trained it
    trained = first.provenance["model_trained"]
    assert trained["device_name"] == first.provenance["device_name"] and trained["code_version"]
    assert second.provenance["model_trained"] == trained
    assert second.report["reg_kept"] == first.report["reg_kept"]


def test_saved_undefended_metrics_are_only_reused_for_the_same_model_file(tmp_path, monkeypatch):
    from unitlib import data
    from unitlib.config import profile
    from unitlib.experiment import cached_evaluation, remember_evaluation

    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    exp = profile("smoke")
    ds = data.load(exp.dataset, size=exp.train_size)
    path = results.model_path(exp, ds.digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"model one")
    remember_evaluation(exp, ds, {"clean_acc": 0.5, "asr": 0.25})
    assert cached_evaluation(exp, ds) == {"clean_acc": 0.5, "asr": 0.25}
    assert cached_evaluation(profile("smoke", seed=1), ds) is None
    path.write_bytes(b"model two")  # retrained: the saved metrics no longer apply
    assert cached_evaluation(exp, ds) is None


def test_run_warns_when_no_bounds_met_the_budget(tmp_path, monkeypatch):
    from unitlib.config import profile
    from unitlib.experiment import run

    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path / "cache"))
    lines: list[str] = []
    # Rejecting every activation above its clean mean wrecks accuracy, and with a zero budget no step recovers it.
    exp = profile("smoke", defense_params={"mode": "reject", "init_std": 0.0, "degradation": 0.0, "steps": 1})
    record = run(exp, save=False, progress=False, log=lines.append)
    assert record.report["threshold_met"] is False
    assert any(line.startswith("warning: no bounds unit tried kept validation accuracy") for line in lines)
    lines.clear()
    record = run(profile("smoke", defense_params={"steps": 1}), save=False, progress=False, log=lines.append)
    assert record.report["threshold_met"] is True and not any(line.startswith("warning") for line in lines)


def _swapped_labels(ds):
    from unitlib import data

    return data.Dataset(ds.name, ds.x_train, (ds.y_train + 1) % ds.num_classes, ds.x_test,
                        (ds.y_test + 1) % ds.num_classes, ds.classes)


def test_a_cached_model_belongs_to_the_data_it_was_trained_on(tmp_path, monkeypatch):
    """Same data set name, other content (labels swapped): the cached model is not reused, the record says which
    data it was made from."""
    from unitlib import data
    from unitlib.config import profile
    from unitlib.experiment import run

    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    exp = profile("smoke", defense="none")
    first = run(exp, save=False, progress=False, log=lambda *a: None)
    real_load = data.load
    monkeypatch.setattr(data, "load", lambda *a, **kw: _swapped_labels(real_load(*a, **kw)))
    second = run(exp, save=False, progress=False, log=lambda *a: None)
    assert first.provenance["model_from_cache"] is False and second.provenance["model_from_cache"] is False
    assert first.provenance["data_sha256"] != second.provenance["data_sha256"]
    assert len(list((tmp_path / "models").glob("*[0-9a-f].safetensors"))) == 2


def test_a_corrupt_cached_model_is_set_aside_and_retrained(tmp_path, monkeypatch):
    from unitlib import data
    from unitlib.config import profile
    from unitlib.experiment import run

    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    exp = profile("smoke", defense="none")
    first = run(exp, save=False, progress=False, log=lambda *a: None)
    ds = data.load(exp.dataset, size=exp.train_size)
    path = results.model_path(exp, ds.digest)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match=str(path.name)):
        second = run(exp, save=False, progress=False, log=lambda *a: None)
    assert second.provenance["model_from_cache"] is False
    assert second.metrics["before"] == first.metrics["before"]
    assert len(list(tmp_path.glob("models/*.corrupt-*"))) == 1
    assert results.load_model(models.build("small-cnn", width=8), path) is not None


def test_a_diverging_run_stops_and_caches_nothing(tmp_path, monkeypatch):
    from unitlib.config import profile
    from unitlib.experiment import run

    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))
    with pytest.raises(FloatingPointError, match="training loss is not finite"):
        run(profile("smoke", defense="none", lr=1e6), save=False, progress=False, log=lambda *a: None)
    assert not list(tmp_path.glob("models/*[0-9a-f].safetensors"))


def test_a_rate_that_leaves_the_defender_no_clean_class_fails_before_training(tmp_path, monkeypatch):
    """SIG at 10% of the smoke set takes every image of the target class: the defender could hold none of it, so
    the run says so before it trains a model (it used to fail after training)."""
    from unitlib import experiment
    from unitlib.config import profile

    monkeypatch.setenv("UNITLIB_CACHE", str(tmp_path))

    def no_training(*args, **kwargs):
        raise AssertionError("trained a model whose defender split cannot be drawn")

    monkeypatch.setattr(experiment, "backdoored_model", no_training)
    exp = profile("smoke", attack="sig", defense="unit", poison_rate=0.1)
    with pytest.raises(ValueError, match=r"class 0 has 0 training sample\(s\) that are not poisoned .*lower the "
                                         r"poisoning rate"):
        experiment.setup(exp, progress=False, log=lambda *a: None)
