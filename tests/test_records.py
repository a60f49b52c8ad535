"""Second tier: the committed result records are well-formed, untampered (each record's key is the hash of its own
configuration) and meet the expectations the foundation issue set for the `cpu` profile."""

import json

import pytest

from unitlib import results
from unitlib.book import paper
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


CPU = profile("cpu")


def _current_cpu(rec) -> bool:
    """A record of the `cpu` profile's model as it is now (records of earlier profiles are archived)."""
    c = rec.config
    return c["profile"] == "cpu" and (c["model"], c["width"]) == (CPU.model, CPU.width)


CPU_RECORDS = [r for r in RECORDS if _current_cpu(r)]
CPU_UNIT = [r for r in CPU_RECORDS if r.config["defense"] == "unit"]


def test_records_name_their_data():
    for rec in RECORDS:
        assert len(rec.provenance.get("data_sha256", "")) == 64, rec.filename()


@pytest.mark.parametrize("rec", CPU_UNIT, ids=lambda r: r.filename())
def test_cpu_unit_records_say_why_tightening_ended(rec):
    r = rec.report
    assert r["stop_reason"] in ("budget", "step_cap")
    if r["stop_reason"] == "budget":
        # the budget bound: validation accuracy fell below the threshold at some step, and the kept bounds sit
        # within `settle` above it
        assert r["budget_bound"] is True
        assert 0 <= r["budget_gap"] <= r["resolved"]["defense"]["settle"] + 1e-9
    assert r["steps_run"] >= r["best_step"] >= 0
    assert [h["step"] for h in r["history"]] == sorted(h["step"] for h in r["history"])


def _meets_the_bar(rec) -> bool:
    before, after = rec.metrics["before"], rec.metrics["after"]
    return after["asr"] <= 0.10 and before["clean_acc"] - after["clean_acc"] <= 0.03


ZOO = ("badnets", "blend", "trojan", "cl", "refool", "sig", "wanet", "instagram", "adap-blend", "narcissus",
       "ia", "dynamic", "lira", "issba", "dfst", "combat")


def _book_attack_params(attack: str) -> dict:
    """The attack parameters the book's rows use for the registry name ``attack`` (Reflection: the companion
    recipe), in the form a record stores them."""
    names = [name for name, registry in paper.ATTACKS.items() if attack in registry]
    return json.loads(json.dumps(paper.attack_params(names[0], "cpu"))) if names else {}


def _book_rate(attack: str) -> float:
    """The poisoning rate the book's rows use for the registry name ``attack`` at `cpu`."""
    names = [name for name, registry in paper.ATTACKS.items() if attack in registry]
    rate = paper.poison_rate(names[0], "cpu") if names else None
    return CPU.poison_rate if rate is None else rate


# What a default UNIT record of an attack's book row may differ in from the `cpu` profile: nothing but these
# (the clean-data fraction, the poisoning rate, the model scale of Tables 8-9, Figs. 12-14 are other experiments).
_ROW_FIELDS = ("attack", "attack_params", "poison_rate", "defense", "defense_params", "seed", "profile")


def _default_unit(attack: str, seed: int = 0):
    base = {k: v for k, v in CPU.to_dict().items() if k not in _ROW_FIELDS}
    return [r for r in CPU_UNIT if r.config["attack"] == attack and r.config["seed"] == seed
            and not r.config["defense_params"] and r.config["attack_params"] == _book_attack_params(attack)
            and r.config["poison_rate"] == _book_rate(attack)
            and {k: r.config.get(k) for k in base} == base
            and results.stale_reason(r, r.experiment) is None]


# Where UNIT's defaults miss the bar at `cpu` (ASR <= 10% within 3 points of test accuracy, seed 0), and the
# measured reason. Strict xfails: the day a record meets the bar, the test fails until the entry is removed.
UNIT_SHORTFALL: dict[str, str] = {
    "refool": "the companion recipe's fixed reflection plants (99.08% ASR); UNIT's defaults leave 53.69% at the 2% "
              "budget (measured: see the closing note of the UNIT-fidelity issue)",
    "narcissus": "the trigger is not abnormal where UNIT looks: ASR 98.39% at the 2% budget (measured with "
                 "unit.exceedance and looser budgets in the closing note of the UNIT-fidelity issue)",
    "instagram": "the filter's activations exceed the kept bounds only 0.6-2.3x as often as clean images' do; ASR "
                 "71.50% at the 2% budget on the retrained seed-0 model (64.87% on the first; 46.74% with "
                 "wait_for_relax), 24.83% at 5% (-4.3 points), 12.70% at 10% (-8.5 points)",
    "combat": "its low-frequency trigger is barely abnormal where UNIT looks: triggered images exceed the kept bounds "
              "0.90-1.27x as often as clean ones in every bound point; ASR 43.09% at the 2% budget, 36.04% at 5%",
    "dfst": "ASR 69.30% at the 2% budget; under the kept bounds its styled images exceed them 0.72-1.67x as often "
            "as clean ones in the first nine points, 3.81x in the last; a 5% budget leaves 10.99% (79.11)",
}


@pytest.mark.parametrize("attack", [
    pytest.param(a, marks=[pytest.mark.xfail(strict=True, reason=UNIT_SHORTFALL[a])] if a in UNIT_SHORTFALL else [])
    for a in ZOO
])
def test_default_unit_meets_the_bar(attack):
    """The UNIT-fidelity bar at `cpu`: ASR <= 10% within 3 points of test accuracy (seed 0, UNIT's defaults, the
    book's poison rates)."""
    recs = _default_unit(attack)
    if not recs:
        pytest.skip(f"no cpu record of UNIT's defaults on {attack} yet")
    assert _meets_the_bar(recs[0]), (recs[0].metrics["before"], recs[0].metrics["after"])


def _clean_accuracy(rec):
    c = rec.config
    for r in CPU_RECORDS:
        d = r.config
        if (d["dataset"], d["poison_rate"], d["seed"], d["epochs"]) == (c["dataset"], 0.0, c["seed"], c["epochs"]):
            return r.metrics["before"]["clean_acc"]
    return None


ZOO_SHORTFALL: dict[str, str] = {
    "sig": "at the UNIT authors' 8% the resnet-mini model reaches 86.01% and 87.50% ASR (two trainings of seed 0; "
           "87.71% and 87.84% on seeds 1 and 2), under the 90% bar; at 9.5% 90.21% at 79.24% clean accuracy, "
           "5.31 points under the clean model: the poisoned images are 95% of the target class",
    "combat": "79.56% ASR at 8% (seed 0; the cpu budget trains its generator 10 epochs at width 16 where the authors "
              "train 200 at width 64; the appendix's own COMBAT reaches 88.74%); at 9.5% 88.39% at 79.52%, 5.03 points "
              "under the clean model",
}


@pytest.mark.parametrize("attack", [
    pytest.param(a, marks=[pytest.mark.xfail(strict=True, reason=ZOO_SHORTFALL[a])] if a in ZOO_SHORTFALL else [])
    for a in ZOO
])
def test_cpu_profile_attack_meets_the_bar(attack):
    """The attack zoo's bar at `cpu`: some record of each attack whose undefended model keeps its clean accuracy
    within 2 points of the clean model trained the same way (same seed, poison rate 0) and reaches 90% ASR."""
    found = []
    if not any(r.config["attack"] == attack for r in CPU_RECORDS):
        pytest.skip(f"no cpu record of {attack} yet")
    for rec in CPU_RECORDS:
        if rec.config["attack"] != attack or not rec.config["poison_rate"]:
            continue
        clean = _clean_accuracy(rec)
        before = rec.metrics["before"]
        found.append((rec.filename(), clean, before["clean_acc"], before["asr"]))
        if clean is not None and clean - before["clean_acc"] <= 0.02 and before["asr"] >= 0.90:
            return
    pytest.fail(f"no {attack} record within 2 points of its clean model with ASR >= 90%: {found}")
