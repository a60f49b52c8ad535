"""Second tier: the committed result records are well-formed, untampered (each record's key is the hash of its own
configuration) and meet the expectations the foundation issue set for the `cpu` profile."""

import pytest

from unitlib import results
from unitlib.config import profile

RECORDS = results.load_all()


def test_there_are_committed_records():
    assert RECORDS, f"no records in {results.RESULTS_DIR}"


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: r.filename())
def test_record_is_consistent(rec):
    exp = rec.experiment
    assert exp.key() == rec.key, "the configuration does not hash to the record's key"
    assert rec.filename().endswith(f"{rec.key[:12]}.json")
    for key in ("code_version", "device_name", "torch", "dataset", "model_key", "created"):
        assert rec.provenance.get(key), key
    assert rec.provenance["dataset"] == exp.dataset
    assert rec.provenance["model_key"] == exp.model_key()
    for stage in ("before", "after"):
        for metric in ("clean_acc", "asr"):
            assert 0.0 <= rec.metrics[stage][metric] <= 1.0
    assert all(v >= 0 for v in rec.seconds.values())


CPU_UNIT = [
    r for r in RECORDS
    if r.config["profile"] == "cpu" and r.config["defense"] == "unit" and r.config["attack"] in ("badnets", "blend")
    and r.config["poison_rate"] == profile("cpu").poison_rate  # the bar's setting; other rates are studies
]


def _meets_the_bar(rec) -> bool:
    before, after = rec.metrics["before"], rec.metrics["after"]
    return (before["clean_acc"] >= 0.70 and before["asr"] >= 0.90 and after["asr"] <= 0.10
            and before["clean_acc"] - after["clean_acc"] <= 0.03)


@pytest.mark.parametrize("rec", [r for r in CPU_UNIT if r.config["attack"] == "badnets" and not r.config["defense_params"]],
                         ids=lambda r: r.filename())
def test_cpu_profile_default_unit_removes_badnets(rec):
    # Every BadNets record of UNIT's default setting, whatever the seed. (Not every setting does: rejection with the
    # official code's 3% budget removes it but costs 3.98 points of test accuracy.)
    assert _meets_the_bar(rec), rec.metrics


# Blend is not removed by every UNIT setting at the `cpu` profile. On the 6-epoch small CNN clipping (the default)
# leaves 55-57% ASR within the budget on seeds 0 and 1 but 7.51% on seed 2; rejection (Table 10's variant, sigmoid
# surrogate) brings it to 1.4-10.8%; trained 24 epochs, the default clipping removes it on both seeds tried. The bar
# asks for a record of each that meets it.
@pytest.mark.parametrize("mode", ["clip", "reject"])
def test_cpu_profile_unit_removes_blend_in_some_record(mode):
    blend = [r for r in CPU_UNIT if r.config["attack"] == "blend"
             and r.config["defense_params"].get("mode", "clip") == mode]
    assert blend, f"no cpu-profile Blend record with UNIT in {mode} mode"
    assert any(_meets_the_bar(r) for r in blend), [(r.filename(), r.metrics["after"]) for r in blend]


# The attack zoo's bar at the `cpu` profile: some record of each attack whose undefended model keeps its clean
# accuracy within 2 points of the clean model trained the same way (same seed and model, poison rate 0) and reaches
# 90% ASR. Strict xfails: the day a record meets the bar, the test fails until the mark is removed.
ZOO_SHORTFALL: dict[str, str] = {}  # attack -> why no record meets the bar (none now)
ZOO = ("badnets", "blend", "trojan", "cl", "refool", "sig", "wanet", "instagram", "adap-blend", "narcissus")


def _clean_accuracy(rec):
    c = rec.config
    for r in RECORDS:
        d = r.config
        if (d["profile"], d["dataset"], d["poison_rate"], d["seed"], d["model"], d["width"], d["epochs"]) == (
                c["profile"], c["dataset"], 0.0, c["seed"], c["model"], c["width"], c["epochs"]):
            return r.metrics["before"]["clean_acc"]
    return None


@pytest.mark.parametrize("attack", [
    pytest.param(a, marks=[pytest.mark.xfail(strict=True, reason=ZOO_SHORTFALL[a])] if a in ZOO_SHORTFALL else [])
    for a in ZOO
])
def test_cpu_profile_attack_meets_the_bar(attack):
    found = []
    for rec in RECORDS:
        if rec.config["profile"] != "cpu" or rec.config["attack"] != attack or not rec.config["poison_rate"]:
            continue
        clean = _clean_accuracy(rec)
        before = rec.metrics["before"]
        found.append((rec.filename(), clean, before["clean_acc"], before["asr"]))
        if clean is not None and clean - before["clean_acc"] <= 0.02 and before["asr"] >= 0.90:
            return
    pytest.fail(f"no {attack} record within 2 points of its clean model with ASR >= 90%: {found}")
