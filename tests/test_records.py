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


# Blend at the `cpu` profile is a known shortfall: within a 2-3% accuracy budget UNIT leaves a high ASR on the
# small CNN. Strict xfail: the day a record meets the bar, this test fails until the mark is removed.
SHORTFALL = {
    ("blend", "small-cnn"): "UNIT leaves Blend's ASR above 10% within budget on the cpu-profile small CNN",
    ("blend", "resnet18"): "UNIT leaves Blend's ASR above 10% on a width-16 ResNet-18 trained 4 epochs (76.28% / 69.18%)",
}
CPU_UNIT = [
    pytest.param(r, marks=[pytest.mark.xfail(strict=True, reason=SHORTFALL[r.config["attack"], r.config["model"]])]
                 if (r.config["attack"], r.config["model"]) in SHORTFALL else [], id=r.filename())
    for r in RECORDS
    if r.config["profile"] == "cpu" and r.config["defense"] == "unit" and r.config["attack"] in ("badnets", "blend")
    and r.config["poison_rate"] == profile("cpu").poison_rate  # the bar's setting; other rates are studies
]


@pytest.mark.parametrize("rec", CPU_UNIT)
def test_cpu_profile_unit_meets_the_bar(rec):
    before, after = rec.metrics["before"], rec.metrics["after"]
    assert before["clean_acc"] >= 0.70
    assert before["asr"] >= 0.90
    assert after["asr"] <= 0.10
    assert before["clean_acc"] - after["clean_acc"] <= 0.03


# The attack zoo's bar at the `cpu` profile: some record of each attack whose undefended model keeps its clean
# accuracy within 2 points of the clean model trained the same way (same seed and model, poison rate 0) and reaches
# 90% ASR. Strict xfails: the day a record meets the bar, the test fails until the mark is removed.
ZOO_SHORTFALL = {
    "adap-blend": "not learned: 1.24% ASR at the paper's 0.003, 2.01% at 0.02, 1.84% at 0.02 trained 12 epochs",
}
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
