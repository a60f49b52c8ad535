"""Second tier: the committed result records are well-formed, untampered (each record's key is the hash of its own
configuration) and meet the expectations the foundation issue set for the `cpu` profile."""

import pytest

from unitlib import results

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
]


@pytest.mark.parametrize("rec", CPU_UNIT)
def test_cpu_profile_unit_meets_the_bar(rec):
    before, after = rec.metrics["before"], rec.metrics["after"]
    assert before["clean_acc"] >= 0.70
    assert before["asr"] >= 0.90
    assert after["asr"] <= 0.10
    assert before["clean_acc"] - after["clean_acc"] <= 0.03
