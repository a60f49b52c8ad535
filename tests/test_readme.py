"""The README's generated tables: they match the committed records, and the tool rewrites a stale one."""

import pytest

from unitlib.book import cli, readme


def test_the_readmes_generated_tables_match_the_committed_records(capsys):
    assert cli.main(["readme", "--check"]) == 0, capsys.readouterr().out + " (run: python -m unitlib.book readme)"
    assert "match the records" in capsys.readouterr().out


def test_the_readme_has_every_generated_block():
    text = readme.README.read_text()
    for name in readme.BLOCKS:
        assert f"<!-- begin generated: {name} -->" in text and f"<!-- end generated: {name} -->" in text


def test_update_rewrites_a_stale_block_and_leaves_the_prose(tmp_path):
    path = tmp_path / "README.md"
    full = readme.README.read_text()
    begin = full.index("<!-- begin generated: unit-table -->\n") + len("<!-- begin generated: unit-table -->\n")
    end = full.index("<!-- end generated: unit-table -->")
    text = "# prose before\n\n" + full[begin - 37 : end + 35] + "\n\nprose after\n"
    path.write_text(text.replace(full[begin:end], "| an old table |\n"))
    assert readme.stale(path) == ["unit-table"]
    assert readme.update(path) == ["unit-table"]
    assert path.read_text() == text
    assert readme.stale(path) == [] and readme.update(path) == []


def test_unknown_blocks_are_refused_with_the_valid_names(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("x\n<!-- begin generated: nonsense -->\n| t |\n<!-- end generated: nonsense -->\n")
    with pytest.raises(ValueError, match="nonsense.*valid choices: unit-table, cpu-status, cpu-records"):
        readme.stale(path)
    with pytest.raises(ValueError, match="valid choices"):
        readme.render("nonsense")


def test_readme_refuses_a_missing_results_folder(capsys, tmp_path):
    assert cli.main(["readme", "--results", str(tmp_path / "missing")]) == 2
    assert "is not a directory of records" in capsys.readouterr().err
