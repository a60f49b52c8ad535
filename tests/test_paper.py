"""The appendix's reported numbers, as shipped inside the package."""

import math
from pathlib import Path

import pandas as pd
import pytest

from unitlib.book import paper


@pytest.mark.parametrize("number", sorted(paper.TABLES))
def test_every_table_loads_in_long_format(number):
    df = paper.table(number)
    assert {"attack", "defense", "metric", "value", "status"} <= set(df.columns)
    assert (df["table"] == number).all()
    assert set(df["status"]) <= {"ok", "reconstructed", "missing"}
    # missing cells, and only those, have no value
    assert df.loc[df.status == "missing", "value"].isna().all()
    assert df.loc[df.status != "missing", "value"].notna().all()


def test_reported_values_match_the_appendix():
    assert paper.reported("BadNets", "UNIT", "asr", table=8, clean_fraction=5) == 0.78
    assert paper.reported("BadNets", "No Defense", "acc", table=8) == 94.82
    assert paper.reported("Adap-Blend", "UNIT", "asr", table=10, design="Act. Rejection") == 39.93
    assert paper.reported("Trojan", "UNIT", "acc", table=11, degradation=2) == 92.38
    assert paper.reported("Blend", "UNIT", "asr", table=12, steps=50, lr=0.01) == 3.82
    assert paper.reported("WaNet", "?P", "asr", table=9, poison_rate=0.1) == 1.44


def test_missing_cells_are_none_not_zero():
    assert paper.reported("NARCISSUS", "RNP", "acc", table=3) is None


def test_ambiguous_or_unknown_selections_say_why():
    with pytest.raises(KeyError, match="clean_fraction"):
        paper.reported("BadNets", "UNIT", "asr", table=8)
    with pytest.raises(KeyError, match="attacks:"):
        paper.reported("NoSuchAttack", "UNIT", "asr", table=8, clean_fraction=5)
    with pytest.raises(ValueError, match="valid"):
        paper.reported("BadNets", "UNIT", "asr", table=8, budget=5)
    with pytest.raises(ValueError, match="valid tables"):
        paper.table(2)


def test_table_returns_a_copy():
    df = paper.table(8)
    df.loc[0, "value"] = -1
    assert paper.table(8).loc[0, "value"] != -1


def test_table8_average_row_agrees_with_the_rows_as_documented():
    t = paper.table(8)
    rows = t[(t.attack != "Average") & (t.defense == "UNIT") & (t.clean_fraction == 0.1) & (t.metric == "asr")]
    avg = paper.reported("Average", "UNIT", "asr", table=8, clean_fraction=0.1)
    assert math.isclose(rows["value"].mean(), avg, abs_tol=0.02)


def test_text_numbers_and_defaults():
    assert len(paper.text_numbers()) == 70
    d = paper.defaults().set_index("key")["value"]
    assert d["clean_data_pct"] == "5" and d["poison_rate_pct"] == "10" and d["model"] == "ResNet-18"


def test_registry_names_follow_the_registries():
    assert paper.registry_name("BadNets") == "badnets"
    assert paper.registry_name("Reflection", registered={"refool"}) == "refool"
    assert paper.registry_name("COMBAT", registered=set()) is None
    assert paper.defense_name("I-BAU", registered={"i-bau"}) == "i-bau"
    assert paper.paper_name("unit", "defense") == "UNIT"
    with pytest.raises(ValueError, match="valid"):
        paper.registry_name("Nope")


def test_every_cited_name_is_in_the_bibliography():
    bib = (Path(__file__).resolve().parent.parent / "book" / "references.bib").read_text()
    for name in [*paper.ATTACKS, *paper.DEFENSES]:
        if name != "No Defense":
            assert "{" + paper.CITATIONS[name] + "," in bib, name


def test_the_package_copy_matches_the_shared_transcription_when_present():
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "paper" / "tables"
    if not shared.exists():
        pytest.skip("../shared/paper/tables is not beside this checkout")
    for number, name in paper.TABLES.items():
        pd.testing.assert_frame_equal(paper.table(number), paper._read.__wrapped__(name))
        assert (shared / name).read_text() == (Path(paper.__file__).parent / "paper_tables" / name).read_text()


def test_book_rows_use_the_companion_codes_reflection_and_a_cell_can_override_it():
    from unitlib import attacks
    from unitlib.book.report import Cell, Section

    sec = Section.from_parameters("a1_baselines", profile="cpu")
    exp = sec.experiment(Cell({}, "Reflection", "UNIT"))
    atk = attacks.get(exp.attack, **exp.attack_params)
    assert (atk.selection, atk.reflections, atk.crops, atk.kinds, atk.alpha_range) == (
        "random", ("coffee",), 1, ("in-focus",), (0.5, 0.5))
    assert exp.poison_rate == 0.08
    own = sec.experiment(Cell({}, "Reflection", "UNIT", changes={"attack_params": {"alpha_range": [0.6, 0.6]}}))
    assert attacks.get(own.attack, **own.attack_params).alpha_range == (0.6, 0.6)
    assert own.attack_params["reflections"] == ["coffee"]
    # the recipe is a copy: changing what one experiment got leaves the next one alone
    exp.attack_params["reflections"].append("moon")
    assert sec.experiment(Cell({}, "Reflection", "UNIT")).attack_params["reflections"] == ["coffee"]
    assert sec.experiment(Cell({}, "Blend", "UNIT")).attack_params == {}


def test_profile_attack_params_apply_at_their_profile_only():
    """ISSBA's `cpu` rows scale the encoder's residual (``PROFILE_ATTACK_PARAMS``); the `paper` and `smoke` rows keep
    the attack's own scale, and a cell's own parameters still win."""
    from unitlib import attacks
    from unitlib.book.report import Cell, Section

    cpu = Section.from_parameters("a1_baselines", profile="cpu")
    assert cpu.experiment(Cell({}, "ISSBA", "UNIT")).attack_params == {"residual_scale": 1.5}
    assert attacks.get("issba", **cpu.experiment(Cell({}, "ISSBA", "UNIT")).attack_params).residual_scale == 1.5
    own = cpu.experiment(Cell({}, "ISSBA", "UNIT", changes={"attack_params": {"residual_scale": 2.0}}))
    assert own.attack_params == {"residual_scale": 2.0}
    paper_sec = Section.from_parameters("a1_baselines", profile="paper")
    assert paper_sec.experiment(Cell({}, "ISSBA", "UNIT")).attack_params == {}
    assert paper.attack_params("ISSBA") == {} and paper.attack_params("ISSBA", "cpu") == {"residual_scale": 1.5}
    # the Reflection recipe holds at every profile, the exceptions merge over it
    assert paper.attack_params("Reflection", "cpu") == paper.attack_params("Reflection")
    # a copy: changing what one caller got leaves the table alone
    paper.attack_params("ISSBA", "cpu")["residual_scale"] = 9.0
    assert paper.PROFILE_ATTACK_PARAMS["cpu"]["ISSBA"] == {"residual_scale": 1.5}
