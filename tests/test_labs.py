"""The labs: the grader's tooling on a small fixture lab that passes, fails and raises in known ways; every lab's
reference solution executed at the smoke profile and graded (all pass), and its student's copy graded unanswered
(every exercise not done, none an error); the catalogue, the book's table of contents and the files agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from unitlib import config, data, results
from unitlib.book import build, labs
from unitlib.attacks.registry import REGISTRY, register
from unitlib.book.labs import __main__ as cli
from unitlib.book.labs import catalogue, notebooks, timing
from unitlib.book.labs.grading import FAILED, NOT_CHECKED, NOT_DONE, PASSED, Lab

ROOT = Path(__file__).resolve().parent.parent

FIXTURE = '''---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A fixture lab

+++ {"tags": ["remove-student"]}

Only in the book: {download}`the copy <student/fixture.ipynb>`.

+++

```{code-cell} ipython3
:tags: [parameters]

profile = "cpu"  # the grader executes at smoke whatever this says
```

```{code-cell} ipython3
from unitlib.book import labs

lab = labs.Lab("fixture")
print("profile", profile)


def equals(want):
    def test(got):
        assert got == want, f"got {got}, want {want}"
    return test
```

```{exercise} Double it
:label: fx-double

Return twice `x`; see {ref}`the next one <fx-wrong>`.
```

```{solution-start} fx-double
:class: dropdown
```

```{code-cell} ipython3
def double(x):
    """Twice x."""
    ### BEGIN SOLUTION
    return 2 * x
    ### END SOLUTION
```

```{solution-end}
```

```{code-cell} ipython3
lab.check("fx-double", lambda: double(3), equals(6))
```

```{exercise} Wrong on purpose
:label: fx-wrong

Return 7.
```

```{solution-start} fx-wrong
:class: dropdown
```

Text inside the solution, hidden from the student.

```{code-cell} ipython3
def seven():
    ### BEGIN SOLUTION
    return 5
    ### END SOLUTION
```

```{code-cell} ipython3
print("a worked solution cell without markers: left out of the student's copy")
```

```{solution-end}
```

```{code-cell} ipython3
lab.check("fx-wrong", seven, equals(7))
```

```{exercise} Raises
:label: fx-raises

Divide.
```

```{solution-start} fx-raises
:class: dropdown
```

```{code-cell} ipython3
def divide():
    ### BEGIN SOLUTION
    return 1 / 0
    ### END SOLUTION
```

```{solution-end}
```

```{code-cell} ipython3
lab.check("fx-raises", divide)
lab.check("fx-needs", lambda: seven() + 1, needs=["fx-wrong"])
```

```{exercise} Needs the wrong one
:label: fx-needs

Uses exercise 2.
```
'''


@pytest.fixture
def fixture_lab(tmp_path) -> Path:
    path = tmp_path / "fixture.md"
    path.write_text(FIXTURE)
    return path


def _statuses(grade: notebooks.Grade) -> dict[str, str]:
    return {r.exercise: r.status for r in grade.results}


# -- checks inside a notebook ------------------------------------------------------------------------------------------
def test_check_reports_each_outcome_with_a_message():
    lab = Lab("t", show=False)

    def stub():
        raise NotImplementedError("t-1")

    def broken():
        return [][1]

    def must_be_two(value):
        assert value == 2, f"got {value}, not 2"

    assert lab.check("t-1", stub) is None
    assert lab.check("t-2", lambda: 3, must_be_two) is None
    assert lab.check("t-3", broken) is None
    assert lab.check("t-4", lambda: 2, must_be_two) == 2
    assert lab.check("t-5", lambda: 2, needs=["t-1"]) is None
    assert lab.check("t-6", lambda: 2, needs=["t-2"]) is None
    assert lab.check("t-7", lambda: stub(), needs=["t-4"]) is None
    assert lab.check("t-8", lambda: 2, lambda v: (_ for _ in ()).throw(KeyError("x"))) is None
    r = lab.results
    assert r["t-1"].status == NOT_DONE and "NotImplementedError" in r["t-1"].message
    assert r["t-2"].status == FAILED and r["t-2"].message.startswith("got 3, not 2")
    assert r["t-3"].status == FAILED and "IndexError" in r["t-3"].message and "in broken" in r["t-3"].message
    assert r["t-4"].status == PASSED
    assert r["t-5"].status == NOT_DONE and r["t-5"].message == "needs t-1 first"
    assert r["t-6"].status == NOT_CHECKED and "t-2, which failed" in r["t-6"].message
    assert r["t-7"].status == NOT_DONE and "uses t-1" in r["t-7"].message
    assert r["t-8"].status == FAILED and r["t-8"].message.startswith("the check could not use your answer: KeyError")


def test_written_answers_are_counted_not_judged():
    lab = Lab("t", show=False)
    lab.check("short", lambda: "too short", labs.written(5))
    lab.check("long", lambda: "one two three four five six", labs.written(5))
    lab.check("not text", lambda: 42, labs.written(5))
    assert [r.status for r in lab.results.values()] == [FAILED, PASSED, FAILED]
    assert "2 words: write at least 5" in lab.results["short"].message


# -- the student's copy ------------------------------------------------------------------------------------------------
def test_strip_removes_solutions_and_keeps_the_skeleton(fixture_lab, tmp_path):
    nb = notebooks.strip(fixture_lab, tmp_path / "student.ipynb")
    text = "\n".join(c.source for c in nb.cells)
    assert "### BEGIN SOLUTION" not in text and "return 2 * x" not in text and "return 5" not in text
    assert "Text inside the solution" not in text and "worked solution" not in text
    assert "Only in the book" not in text  # a remove-student cell
    assert "{solution" not in text and "{exercise}" not in text and "{ref}" not in text
    assert '    raise NotImplementedError("fx-double")' in text and '"""Twice x."""' in text
    assert "### Exercise 1: Double it" in text and "see the next one." in text
    answers = [c for c in nb.cells if "answer" in c.metadata.get("tags", [])]
    assert [c.metadata["unitlib_exercise"] for c in answers] == ["fx-double", "fx-wrong", "fx-raises"]
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert [e["label"] for e in notebooks.exercises(nb)] == ["fx-double", "fx-wrong", "fx-raises", "fx-needs"]
    assert nbformat.read(tmp_path / "student.ipynb", as_version=4).metadata["kernelspec"]["name"] == "python3"


def test_reference_keeps_solutions_without_markers(fixture_lab):
    nb = notebooks.reference(fixture_lab)
    text = "\n".join(c.source for c in nb.cells)
    assert "return 2 * x" in text and "### BEGIN SOLUTION" not in text and "```{solution-start} fx-double" in text


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
                         "### BEGIN SOLUTION\nresult = 2\n### END SOLUTION"), "at the top level of a cell"),
    (lambda s: s.replace("```{solution-end}\n```\n\n```{code-cell} ipython3\nlab.check(\"fx-double\"",
                         "```{code-cell} ipython3\nlab.check(\"fx-double\"", 1), "inside the solution of fx-double"),
    (lambda s: s.replace("```{solution-start} fx-double", "```{solution-start} fx-nothing"), "not an exercise above"),
    (lambda s: s.replace(":label: fx-wrong", ":label: fx-double"), "two exercises are labelled 'fx-double'"),
    (lambda s: s.replace("lab.check(\"fx-double\", lambda: double(3), equals(6))",
                         "def f():\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION"),
     "outside a {solution-start}"),
])
def test_strip_refuses_a_malformed_lab(fixture_lab, edit, message):
    fixture_lab.write_text(edit(FIXTURE))
    with pytest.raises(ValueError, match=re.escape(message)):
        notebooks.strip(fixture_lab)


# -- grading -----------------------------------------------------------------------------------------------------------
def test_grade_reports_passed_failed_and_not_checked(fixture_lab, tmp_path):
    grade = notebooks.grade(fixture_lab, out=tmp_path / "executed.ipynb")
    assert _statuses(grade) == {"fx-double": PASSED, "fx-wrong": FAILED, "fx-raises": FAILED, "fx-needs": NOT_CHECKED}
    lines = "\n".join(grade.lines())
    assert "Exercise 2 (fx-wrong, Wrong on purpose): failed: got 5, want 7" in lines
    assert re.search(r"Exercise 3 \(fx-raises, Raises\): failed: your code raised ZeroDivisionError: division by "
                     r"zero \(in divide, line \d+: return 1 / 0\)", lines)
    assert not grade.passed and grade.stopped is None
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "profile smoke" in printed  # executed at smoke, whatever the parameters cell says


def test_unanswered_copy_is_not_done_not_an_error(fixture_lab, tmp_path):
    copy = tmp_path / "student.ipynb"
    notebooks.strip(fixture_lab, copy)
    grade = notebooks.grade(copy)
    assert set(_statuses(grade).values()) == {NOT_DONE}, grade.lines()
    assert grade.stopped is None


def test_a_cell_that_stops_the_notebook_fails_its_exercise_only(fixture_lab, tmp_path):
    copy = tmp_path / "student.ipynb"
    nb = notebooks.strip(fixture_lab)
    for cell in nb.cells:
        if cell.metadata.get("unitlib_exercise") == "fx-wrong":
            cell.source = cell.source.replace('raise NotImplementedError("fx-wrong")', "return (")
    nbformat.write(nb, copy)
    grade = notebooks.grade(copy)
    statuses = _statuses(grade)
    assert statuses["fx-double"] == NOT_DONE and statuses["fx-wrong"] == FAILED
    assert statuses["fx-raises"] == statuses["fx-needs"] == NOT_CHECKED
    assert "SyntaxError" in grade.results[1].message and "SyntaxError" in grade.stopped


def test_cell_timeout_is_the_profiles_unless_given():
    assert notebooks.cell_timeout("smoke") == notebooks.DEFAULT_TIMEOUT
    # a `cpu` cell may train a backdoored model: far longer than a smoke cell may take
    assert notebooks.cell_timeout("cpu") >= 3600 > notebooks.cell_timeout("smoke")
    assert notebooks.cell_timeout("cpu", 5) == 5
    with pytest.raises(ValueError, match="'gpu'; valid choices: smoke, cpu, paper"):
        notebooks.cell_timeout("gpu")
    with pytest.raises(ValueError, match="positive"):
        notebooks.cell_timeout("smoke", 0)


def test_a_cell_past_its_timeout_stops_the_notebook(fixture_lab, tmp_path):
    copy = tmp_path / "slow.ipynb"
    nb = notebooks.reference(fixture_lab)
    for cell in nb.cells:
        if cell.metadata.get("unitlib_exercise") == "fx-double":
            cell.source = "import time\ntime.sleep(60)\n" + cell.source
    nbformat.write(nb, copy)
    grade = notebooks.grade(copy, timeout=3)
    assert grade.seconds < 50 and grade.stopped is not None, grade.lines()
    assert "timeout" in grade.stopped.lower() or "timed out" in grade.stopped.lower(), grade.stopped


def test_cli_check_exit_codes_and_json(fixture_lab, tmp_path, capsys):
    copy = tmp_path / "student.ipynb"
    assert cli.main(["strip", str(fixture_lab), "-o", str(copy)]) == 0
    out = tmp_path / "grades.json"
    assert cli.main(["check", str(copy), "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "Exercise 1 (fx-double, Double it): not done" in printed and "4 exercises: 4 not done" in printed
    assert json.loads(out.read_text())[0]["results"][0]["status"] == NOT_DONE
    plain = tmp_path / "plain.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), plain)
    assert cli.main(["check", str(plain)]) == 2
    assert "cannot be checked" in capsys.readouterr().err


# -- every lab, at the smoke profile -----------------------------------------------------------------------------------
LAB_NAMES = [lab.name for lab in catalogue.LABS]


@pytest.mark.parametrize("name", LAB_NAMES)
def test_reference_solution_passes_every_check_at_smoke(name, tmp_path):
    grade = notebooks.grade(catalogue.get(name).path, out=tmp_path / f"{name}.ipynb")
    assert grade.stopped is None, grade.lines()
    assert grade.passed, "\n".join(grade.lines())
    number = catalogue.number(name)
    assert [r.exercise for r in grade.results] == [e["label"] for e in notebooks.exercises(
        notebooks.reference(catalogue.get(name).path))]
    assert all(n.startswith(f"{number}.") for n in grade.numbers.values())
    nb = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    assert len([c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]) == 1


@pytest.mark.parametrize("name", LAB_NAMES)
def test_student_copy_unanswered_is_all_not_done(name, tmp_path):
    copy = tmp_path / f"{name}.ipynb"
    nb = notebooks.strip(catalogue.get(name).path, copy)
    text = "\n".join(c.source for c in nb.cells)
    assert "BEGIN SOLUTION" not in text and "{solution" not in text and "{download}" not in text
    assert text.startswith(f"# Lab {catalogue.number(name)}: ")
    grade = notebooks.grade(copy)
    assert grade.stopped is None, grade.lines()
    assert {r.status for r in grade.results} == {NOT_DONE}, "\n".join(grade.lines())
    assert len(grade.results) == len(notebooks.exercises(nb)) >= 4


def test_labs_catalogue_files_and_table_of_contents_agree():
    files = sorted(p.stem for p in (ROOT / "labs").glob("*.md"))
    assert files == sorted(LAB_NAMES + build.LAB_PAGES)
    assert build.LABS == LAB_NAMES
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    numbered = [p for p in toc["parts"] if p.get("numbered")]
    assert len(numbered) == 1, "the labs are the book's one numbered part (their exercises are numbered <lab>.<k>)"
    assert [c["file"] for c in numbered[0]["chapters"]] == [f"build/labs/{n}" for n in LAB_NAMES]
    for lab in catalogue.LABS:
        nb = notebooks.read(lab.path)
        assert notebooks.parameters(nb)[:1] == ["profile"], lab.name
        assert 'profile = "smoke"' in nb.cells[[c.metadata.get("tags") for c in nb.cells].index(["parameters"])].source


# -- the library's side of the labs ------------------------------------------------------------------------------------
STUDENT_ATTACK = """
from dataclasses import dataclass

import torch

from unitlib.attacks import Attack


@dataclass
class Corner(Attack):
    name = "test-lab-corner"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., :3, :3] = VALUE
        return out
"""


def _student_class(value: str) -> type:
    """The attack as a notebook defines it: code run in a namespace of its own, outside the library."""
    namespace = {"__name__": "__main__"}
    exec(compile(STUDENT_ATTACK.replace("VALUE", value), "<cell>", "exec"), namespace)
    return namespace["Corner"]


def test_run_retrains_when_a_students_attack_changes():
    first, again, changed = _student_class("1.0"), _student_class("1.0"), _student_class("0.0")
    assert labs.code_digest(first) == labs.code_digest(again) != labs.code_digest(changed)
    try:
        register(first)
        exp = config.profile("smoke", attack="test-lab-corner", defense="none", epochs=1)
        path = results.model_path(exp, data.load(exp.dataset).digest)
        labs.run(exp)
        stamp, mtime = path.with_suffix(".code").read_text(), path.stat().st_mtime_ns
        labs.run(exp)  # the same code: the cached model is used
        assert path.stat().st_mtime_ns == mtime
        register(changed)
        labs.run(exp)
        assert path.with_suffix(".code").read_text() == labs.code_digest(changed) != stamp
        assert path.stat().st_mtime_ns != mtime, "the model was not retrained"
    finally:
        REGISTRY.classes.pop("test-lab-corner", None)


def test_cpu_estimate_adds_the_stages_of_a_labs_work():
    stages = {"data": 10.0, "train": 300.0, "unit": 40.0, "evaluate": 5.0}
    lab = catalogue.LabInfo("x", "x", "x", "x", (), {"train": 1, "train_regularised": 2, "unit": 3, "other_s": 7})
    assert timing.estimate(lab, stages) == 10 + 300 * (1 + 2 * timing.REGULARISED_TRAINING) + 3 * 40 + 6 * 5 + 7


def test_stage_seconds_refuses_to_estimate_without_records(tmp_path):
    with pytest.raises(ValueError, match="no cpu record"):
        timing.stage_seconds("cpu", tmp_path)


def test_overview_uses_measured_minutes_and_explains_estimates_only_when_any_is_left(tmp_path):
    names = [lab.name for lab in catalogue.LABS]
    prov = {"cpu": "x", "threads": 2, "load": 1.0, "code_version": "abc", "created": "2026-01-01T00:00:00Z"}
    entry = {"provenance": prov, "labs": {n: {"seconds": 60.0 * (i + 1), "passed": True} for i, n in enumerate(names)}}
    path = tmp_path / "timings.json"
    path.write_text(json.dumps({"cpu": entry}))
    df = timing.overview("cpu", path)
    assert df["cpu measured"].all() and list(df["cpu (min)"]) == [float(i + 1) for i in range(len(names))]
    assert "where not measured" not in timing.overview_markdown("cpu", path)
    del entry["labs"][names[0]]
    path.write_text(json.dumps({"cpu": entry}))
    df = timing.overview("cpu", path)
    assert not df["cpu measured"].iloc[0] and df["cpu measured"].iloc[1:].all()
    text = timing.overview_markdown("cpu", path)
    assert "where not measured" in text and "| about " in text
