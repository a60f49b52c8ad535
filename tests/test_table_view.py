"""How a page shows a comparison table (report.table_view, report.missing_line): the setting once in the caption,
ours beside the paper's with two decimals, and the cells without a number of ours counted in one line by reason.
A small hand-made table, so these run in seconds."""

import numpy as np
import pandas as pd
import pytest

from unitlib.book import paper, report

OURS = "cpu: cifar10-jpeg, resnet-mini (width 32)"
NOT_IMPL = report.NOT_IMPLEMENTED


def _row(attack, defense, ours=(np.nan, np.nan), paper_=(np.nan, np.nan), setting=OURS, status=None):
    has_ours = not np.isnan(ours[0])
    return {"attack": attack, "defense": defense, "ours acc": ours[0], "ours asr": ours[1],
            "paper acc": paper_[0], "paper asr": paper_[1],
            "ours: measured at": setting if has_ours else "",
            "paper: measured at": paper.PAPER_SETTING if not np.isnan(paper_[0]) else "",
            "status": status or (report.REPRODUCED if has_ours else report.NOT_RUN)}


def _cells(view) -> pd.DataFrame:
    """The view's data by row (attack, defense) with flat column names: "clean acc ours", "note"..."""
    data = view.data.copy()
    data.columns = [" ".join(c).strip() for c in data.columns]
    return data.set_index(["attack", "defense"])


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame([
        _row("BadNets", "No Defense", (83.456, 100.0), (94.82, 100.0)),
        _row("BadNets", "UNIT", (82.68, 2.1666), (92.48, 0.78)),
        _row("SIG", "UNIT", (83.0, 6.0), (92.0, 1.5), setting=OURS + ", poison rate 0.08"),
        _row("Blend", "UNIT", paper_=(92.3, 1.0)),                            # not run, the paper has numbers
        _row("Blend", "FP"),                                                  # not run, no number at all
        _row("WaNet", "FP"),                                                  # not run, no number at all
        _row("IA", "UNIT", paper_=(91.0, 2.0), status=f"{NOT_IMPL} (attack IA)"),
        _row("DFST", "UNIT", status=f"{NOT_IMPL} (attack DFST)"),             # not implemented, no number at all
    ])


def test_the_setting_is_said_once_in_the_caption(table):
    sec = report.Section(profile="cpu", seeds=(0, 1))
    view = report.table_view(table, title="Table 8", section=sec)
    assert list(view.data.columns) == [("", "attack"), ("", "defense"), ("clean acc", "ours"), ("clean acc", "paper"),
                                       ("ASR", "ours"), ("ASR", "paper"), ("", "note")]
    assert view.caption.startswith("Table 8.")
    assert "Ours: cpu — cifar10-jpeg, resnet-mini (width 32), seeds 0, 1." in view.caption
    assert "Paper: CIFAR-10, ResNet-18." in view.caption
    html = view.to_html()
    assert "measured at" not in html and "status" not in html
    assert html.count("CIFAR-10, ResNet-18") == 1 and html.count("resnet-mini") == 1
    # a row measured in another setting says only what differs
    notes = _cells(view)["note"]
    assert notes["SIG", "UNIT"] == "poison rate 0.08" and notes["BadNets", "UNIT"] == ""
    # without a section, the caption takes the setting most rows of ours were measured at
    assert "Ours: cpu — cifar10-jpeg, resnet-mini (width 32)." in report.table_view(table).caption


def test_numbers_keep_two_decimals_and_a_dash_where_missing(table):
    data = _cells(report.table_view(table))
    assert data.loc[("BadNets", "No Defense"), "clean acc ours"] == "83.46"
    assert data.loc[("BadNets", "No Defense"), "ASR ours"] == "100.00"
    assert data.loc[("BadNets", "UNIT"), "ASR ours"] == "2.17"
    assert data.loc[("BadNets", "UNIT"), "ASR paper"] == "0.78"
    assert data.loc[("Blend", "UNIT"), "clean acc ours"] == "—"
    assert data.loc[("Blend", "UNIT"), "clean acc paper"] == "92.30"
    assert "83.46" in report.table_view(table).to_html()
    # several seeds: mean ± std, both to two decimals
    seeds = table.assign(**{"ours acc std": 0.5, "ours asr std": np.nan})
    data = _cells(report.table_view(seeds))
    assert data.loc[("BadNets", "UNIT"), "clean acc ours"] == "82.68 ± 0.50"
    assert data.loc[("BadNets", "UNIT"), "ASR ours"] == "2.17"


def test_rows_without_any_number_are_left_out_and_counted_in_one_line(table):
    before = table.copy()
    view = report.table_view(table)
    assert set(_cells(view).index) == {("BadNets", "No Defense"), ("BadNets", "UNIT"), ("SIG", "UNIT"),
                                       ("Blend", "UNIT"), ("IA", "UNIT")}
    pd.testing.assert_frame_equal(table, before)  # the data itself is not changed
    line = report.missing_line(table, profile="cpu")
    assert "\n" not in line
    assert line.startswith("5 of 8 cells not yet reproduced: ")
    assert "3 not run at cpu (attack Blend × defense UNIT, FP; attack WaNet × defense FP)" in line
    assert "2 not implemented (attacks IA, DFST)" in line
    assert line.endswith("3 of them, with no number of the paper's either, are left out of the table.")


def test_a_table_without_the_papers_numbers_or_any_number(table):
    ours_only = table.assign(**{"paper acc": np.nan, "paper asr": np.nan, "paper: measured at": ""})
    view = report.table_view(ours_only)
    assert "clean acc paper" not in _cells(view).columns and "The paper prints no numbers" in view.caption
    assert len(view.data) == 3
    nothing = table[table["ours acc"].isna() & table["paper acc"].isna()]
    assert report.table_view(nothing).data.empty
    assert report.missing_line(nothing).endswith("so there is no table.")
    done = table[table.status == report.REPRODUCED]
    assert report.missing_line(done, profile="cpu") == "All 3 cells are reproduced at cpu."
    assert "note" not in _cells(report.table_view(done.iloc[:2])).columns  # no column when no row has a note


def test_partly_reproduced_rows_say_so_in_the_note(table):
    table.loc[1, "status"] = "partly: 2 of 3 seeds"
    assert _cells(report.table_view(table)).loc[("BadNets", "UNIT"), "note"] == "2 of 3 seeds"


def test_the_missing_cells_are_described_compactly():
    rows = pd.DataFrame({"attack": ["A", "A", "B", "B", "C"], "rate": ["1%", "5%", "1%", "5%", "1%"]})
    assert report._describe(rows.iloc[:4], ["attack", "rate"]) == "attack A, B × rate 1%, 5%"
    assert report._describe(rows, ["attack", "rate"]) == "attack A, B × rate 1%, 5%; attack C × rate 1%"


def test_a_row_says_when_its_defense_ran_on_another_or_an_unplanted_model():
    """The undefended model a defense ran on: named where its ASR is under the planted bar, or where it is another
    training than the no-defense row's (same labels), and nowhere else."""
    rows = [_row("BadNets", "No Defense", (83.9, 100.0)), _row("BadNets", "FT", (81.0, 2.0)),
            _row("BadNets", "NAD", (60.0, 1.0)), _row("ISSBA", "No Defense", (83.07, 97.77)),
            _row("ISSBA", "FT", (80.96, 2.36)), _row("Blend", "UNIT")]
    table = pd.DataFrame(rows)
    table["ours model acc"] = [83.9, 83.9, 84.02, 83.07, 83.10, np.nan]
    table["ours model asr"] = [100.0, 100.0, 99.99, 97.77, 3.44, np.nan]
    notes = report.model_notes(table, ["attack", "defense"])
    assert notes == ["", "", "another training of this configuration: 84.02 / 99.99 undefended", "",
                     "undefended model 83.10 / 3.44 (ASR under 90%)", ""]
    view = _cells(report.table_view(table.assign(**{"ours model": notes})))
    assert view.loc[("ISSBA", "FT"), "note"] == "undefended model 83.10 / 3.44 (ASR under 90%)"
    assert view.loc[("BadNets", "FT"), "note"] == ""
    # a model more than 10 points of clean accuracy under the best undefended model of the table is broken, not
    # backdoored, whatever its ASR (the best here: BadNets' 83.9)
    broken = table.assign(**{"ours model acc": [83.9, 73.89, 84.02, 83.07, 73.95, np.nan],
                             "ours model asr": [100.0, 99.99, 99.99, 97.77, 97.77, np.nan]})
    notes = report.model_notes(broken, ["attack", "defense"])
    assert notes[1] == ("undefended model 73.89 / 99.99 (clean accuracy 10.01 points under the best undefended "
                        "model here: broken, not backdoored)")
    assert notes[4] == "another training of this configuration: 73.95 / 97.77 undefended"
    # a table without a defense column: every row is a defended one, judged by its own model only
    sweep = pd.DataFrame([{**_row("CL", "ANP", (80.0, 5.0)), "ours model acc": 82.0, "ours model asr": 50.0}])
    assert report.model_notes(sweep.drop(columns="defense"), ["attack"]) == [
        "undefended model 82.00 / 50.00 (ASR under 90%)"]
