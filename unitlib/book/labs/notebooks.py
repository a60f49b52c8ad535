"""Lab notebooks: the reference (what the book executes), the student's copy (solutions stripped), and grading
(execute with papermill, read the checks' results back).

A lab is a jupytext MyST notebook (``labs/*.md``). Its exercises are ``{exercise}`` directives of sphinx-exercise,
each with a ``:label:``; an exercise's solution sits between ``{solution-start} <label>`` and ``{solution-end}``
(gated directives: the code cells between them are the solution, hidden behind a toggle in the book). In a
solution's code cells, the student's part lies between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (nbgrader's
markers), inside a function or method: the student's copy keeps the rest of the cell (signature, docstring) and
replaces that part by ``raise NotImplementedError("<label>")``, which the checks report as not done.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import catalogue
from .grading import FAILED, NOT_CHECKED, PASSED, Result, results_of

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
METADATA = "unitlib_lab"  # notebook metadata: the lab's name and its exercises (label and title, in order)
CELL_METADATA = "unitlib_exercise"  # a solution code cell's metadata: the exercise it answers
STUDENT_ONLY_DROP = "remove-student"  # a cell with this tag is left out of the student's copy (e.g. a download link)
DEFAULT_TIMEOUT = 900  # seconds per cell when grading: generous for the smoke profile on a busy laptop, finite
# Seconds per cell at each profile: a `cpu` cell may train a backdoored model (5-15 minutes on two cores), a `paper`
# cell several on a GPU. Finite, so nothing hangs.
PROFILE_TIMEOUTS = {"smoke": DEFAULT_TIMEOUT, "cpu": 3 * 3600, "paper": 12 * 3600}


def cell_timeout(profile: str, timeout: int | None = None) -> int:
    """Seconds a cell may run when grading at ``profile``: ``timeout`` when given, else the profile's own."""
    if timeout is not None:
        if timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return timeout
    if profile not in PROFILE_TIMEOUTS:
        raise ValueError(f"unknown profile {profile!r}; valid choices: {', '.join(PROFILE_TIMEOUTS)}")
    return PROFILE_TIMEOUTS[profile]

_FENCE = re.compile(r"^(?P<ticks>`{3,})\{(?P<name>[\w-]+)\}[ \t]*(?P<arg>.*)$")
_ROLE = re.compile(r"\{(?P<role>[\w:-]+)\}`(?P<content>[^`]*)`")
_ADMONITIONS = ("note", "tip", "important", "warning", "hint", "seealso", "attention", "caution")


@dataclass
class Directive:
    name: str
    arg: str
    options: dict[str, str]
    body: str


def _segments(text: str) -> list[str | Directive]:
    """Markdown text as a list of plain text and (top-level) backtick-fenced directives."""
    lines = text.split("\n")
    out: list[str | Directive] = []
    plain: list[str] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            plain.append(lines[i])
            i += 1
            continue
        n = len(m["ticks"])
        j = i + 1
        while j < len(lines) and not (set(lines[j].strip()) == {"`"} and len(lines[j].strip()) >= n):
            j += 1
        if j == len(lines):
            raise ValueError(f"unclosed {{{m['name']}}} directive: {lines[i]!r}")
        body = lines[i + 1 : j]
        options = {}
        while body and (opt := re.match(r"^:([\w-]+):\s*(.*)$", body[0])):
            options[opt[1]] = opt[2].strip()
            body = body[1:]
        if plain:
            out.append("\n".join(plain))
            plain = []
        out.append(Directive(m["name"], m["arg"].strip(), options, "\n".join(body).strip("\n")))
        i = j + 1
    if plain:
        out.append("\n".join(plain))
    return out


def _plain_roles(text: str) -> str:
    """MyST roles as plain Markdown, for Jupyter: ``{ref}`text <target>``` -> text, ``{cite:p}`key``` -> [key]."""

    def repl(m: re.Match) -> str:
        role, content = m["role"], m["content"]
        label = re.match(r"^(.*?)\s*<([^>]*)>$", content)
        if role.startswith("cite"):
            return f"[{content}]"
        if role == "math":
            return f"${content}$"
        return label[1] if label else f"`{content}`" if role in ("ref", "numref", "doc", "download") else content

    return _ROLE.sub(repl, text)


def _is_solution(cell: dict[str, Any]) -> bool:
    return cell.get("cell_type") == "code" and any(line.strip() == BEGIN for line in cell["source"].split("\n"))


def _replace_blocks(source: str, label: str, *, stub: bool) -> str:
    """The code cell ``source`` with each ``### BEGIN/END SOLUTION`` block replaced by the stub (``stub``) or by its
    own content without the markers (the reference)."""
    out: list[str] = []
    block: list[str] | None = None
    indent = ""
    for line in source.split("\n"):
        if line.strip() == BEGIN:
            if block is not None:
                raise ValueError(f"{label}: {BEGIN} inside another solution block")
            indent = line[: len(line) - len(line.lstrip())]
            if stub and not indent:
                raise ValueError(f"{label}: a solution block at the top level of a cell: the stub would stop the "
                                 f"notebook; put the student's part inside a function or method")
            block = []
        elif line.strip() == END:
            if block is None:
                raise ValueError(f"{label}: {END} without {BEGIN}")
            out += ([f"{indent}# YOUR CODE HERE", f'{indent}raise NotImplementedError("{label}")'] if stub else block)
            block = None
        elif block is not None:
            block.append(line)
        else:
            out.append(line)
    if block is not None:
        raise ValueError(f"{label}: {BEGIN} without {END}")
    return "\n".join(out)


def read(path: str | os.PathLike):
    """A lab's source (jupytext MyST ``.md``) or a notebook (``.ipynb``) as an nbformat notebook."""
    import jupytext
    import nbformat

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such notebook: {path}")
    return nbformat.read(path, as_version=4) if path.suffix == ".ipynb" else jupytext.read(path)


def _walk(nb, *, student: bool, number: int | None = None):
    """The lab ``nb`` as the reference (``student`` false) or the student's copy. See the module's docstring.
    ``number``: the lab's number in the book, which prefixes its exercises' numbers (``2.1``) and, in the student's
    copy, its title (``Lab 2: ...``)."""
    nb = copy.deepcopy(nb)
    titled = False
    cells, exercises = [], []
    inside: str | None = None  # the label of the solution being read, if any
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            kept: list[str] = []
            for seg in _segments(cell.source):
                if isinstance(seg, str):
                    if inside is None and student and not titled and number is not None:
                        seg, titled = re.subn(r"^# (.+)$", rf"# Lab {number}: \1", seg, count=1, flags=re.M)
                    if inside is None:
                        kept.append(_plain_roles(seg) if student else seg)
                    continue
                if inside is not None:
                    if seg.name == "solution-end":
                        inside = None
                    elif seg.name in ("solution-start", "exercise"):
                        raise ValueError(f"{{{seg.name}}} inside the solution of {inside}: close it with "
                                         f"{{solution-end}} first")
                    continue
                if seg.name == "exercise":
                    label = seg.options.get("label")
                    if not label:
                        raise ValueError(f"exercise {seg.arg!r} has no :label:")
                    if label in (e["label"] for e in exercises):
                        raise ValueError(f"two exercises are labelled {label!r}")
                    k = len(exercises) + 1
                    exercises.append({"label": label, "title": seg.arg,
                                      "number": f"{number}.{k}" if number is not None else str(k)})
                    kept.append(_exercise_markdown(exercises[-1]["number"], seg) if student else _fence(seg))
                elif seg.name == "solution-start":
                    if seg.arg not in (e["label"] for e in exercises):
                        raise ValueError(f"solution of {seg.arg!r}, which is not an exercise above it")
                    inside = seg.arg
                    if not student:
                        kept.append(_fence(seg))
                elif seg.name == "solution":
                    if not student:
                        kept.append(_fence(seg))
                elif seg.name == "solution-end":
                    raise ValueError("{solution-end} without {solution-start}")
                elif student and seg.name in _ADMONITIONS:
                    body = _plain_roles(seg.body).replace("\n", "\n> ")
                    kept.append(f"> **{seg.arg or seg.name.capitalize()}.** {body}")
                else:
                    kept.append(_fence(seg))
            if student and STUDENT_ONLY_DROP in cell.metadata.get("tags", []):
                continue
            source = "\n".join(kept).strip("\n") if student else cell.source
            if source.strip():
                cell.source = source
                cells.append(cell)
            continue
        if cell.cell_type == "code":
            if any(_FENCE.match(line) for line in cell.source.split("\n")):
                raise ValueError(f"a code cell holds a directive (is the code cell above it not closed?): "
                                 f"{cell.source[-120:]!r}")
            if student and STUDENT_ONLY_DROP in cell.metadata.get("tags", []):
                continue
            if _is_solution(cell) and inside is None:
                raise ValueError(f"solution markers outside a {{solution-start}} block (they would show in the "
                                 f"book): {cell.source[:80]!r}")
            if inside is not None:
                if student and not _is_solution(cell):
                    continue  # a worked solution with nothing for the student to fill in
                cell.source = _replace_blocks(cell.source, inside, stub=student)
                cell.metadata[CELL_METADATA] = inside
                if student:
                    cell.metadata.setdefault("tags", [])
                    if "answer" not in cell.metadata["tags"]:
                        cell.metadata["tags"].append("answer")
            if student:
                cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    if inside is not None:
        raise ValueError(f"the solution of {inside} has no {{solution-end}}")
    nb.cells = cells
    nb.metadata.pop("jupytext", None)
    nb.metadata[METADATA] = {"exercises": exercises, "student": student}
    return nb


def _fence(d: Directive) -> str:
    opts = "".join(f":{k}: {v}\n" for k, v in d.options.items())
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`{3,}", d.body)), default=0) + 1)
    return f"{ticks}{{{d.name}}} {d.arg}".rstrip() + f"\n{opts}{d.body}\n{ticks}"


def _exercise_markdown(number: str, d: Directive) -> str:
    title = f": {d.arg}" if d.arg else ""
    return f"### Exercise {number}{title}\n\n*Checked as `{d.options['label']}`.*\n\n{_plain_roles(d.body)}"


def reference(path: str | os.PathLike):
    """The lab at ``path`` as the book executes it: the solutions in place, without their markers."""
    nb = _walk(read(path), student=False, number=catalogue.number(Path(path).stem))
    nb.metadata[METADATA]["name"] = Path(path).stem
    return nb


def strip(path: str | os.PathLike, out: str | os.PathLike | None = None):
    """The student's copy of the lab at ``path``: solutions removed (their code cells reduced to a stub that raises
    ``NotImplementedError``), outputs cleared, the book's directives as plain Markdown. Written to ``out`` (an
    ``.ipynb``) when given; returns the notebook."""
    import nbformat

    nb = _walk(read(path), student=True, number=catalogue.number(Path(path).stem))
    nb.metadata[METADATA]["name"] = Path(path).stem
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
    return nb


def exercises(nb) -> list[dict[str, str]]:
    """The exercises of a lab notebook (label and title, in order): from the metadata the reference and the student's
    copy carry, else from its ``{exercise}`` directives."""
    meta = nb.metadata.get(METADATA, {})
    if "exercises" in meta:
        return list(meta["exercises"])
    return _walk(nb, student=False).metadata[METADATA]["exercises"]


def parameters(nb) -> list[str]:
    """The names the notebook's ``parameters`` cell assigns."""
    import ast

    names: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign):
                    names += [t.id for t in node.targets if isinstance(t, ast.Name)]
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.append(node.target.id)
    return names


# -- grading ---------------------------------------------------------------------------------------------------------
@dataclass
class Grade:
    """What grading one notebook found: each exercise's :class:`Result` (in the lab's order), the seconds it ran,
    and the error that stopped it, if one did."""

    notebook: str
    profile: str
    seconds: float
    results: list[Result]
    titles: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, str] = field(default_factory=dict)
    stopped: str | None = None

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.status == PASSED for r in self.results)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def lines(self) -> list[str]:
        head = f"{self.notebook}: executed at {self.profile} in {self.seconds:.1f} s"
        if self.stopped:
            head += f"; it stopped: {self.stopped}"
        body = []
        for r in self.results:
            title = self.titles.get(r.exercise, "")
            number = self.numbers.get(r.exercise)
            name = f"Exercise {number} ({r.exercise}" if number else f"Check ({r.exercise}"
            name += f", {title})" if title else ")"
            body.append(f"  {name}: {r.status}" + (f": {r.message}" if r.message else ""))
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        return [head, *body, f"  {len(self.results)} exercises: {counts}"]

    def to_dict(self) -> dict[str, Any]:
        return {"notebook": self.notebook, "profile": self.profile, "seconds": round(self.seconds, 1),
                "passed": self.passed, "stopped": self.stopped, "results": [r.to_dict() for r in self.results]}


def execute(nb, out: str | os.PathLike, *, parameters: dict[str, Any] | None = None,
            cwd: str | os.PathLike | None = None, timeout: int = DEFAULT_TIMEOUT) -> None:
    """Execute a notebook with papermill (the book's path) into ``out``; raises what papermill raises."""
    import papermill

    papermill.execute_notebook(nb, str(out), parameters=parameters or {}, kernel_name="python3",
                               execution_timeout=timeout, cwd=str(cwd) if cwd else None, progress_bar=False,
                               report_mode=False)


def grade(path: str | os.PathLike, *, profile: str = "smoke", timeout: int | None = None,
          out: str | os.PathLike | None = None) -> Grade:
    """Execute the lab notebook at ``path`` (a student's ``.ipynb``, or a lab's ``.md`` source, graded as its
    reference) at ``profile`` and report each exercise. A cell may run ``timeout`` seconds (default: the profile's,
    :data:`PROFILE_TIMEOUTS`). The executed notebook goes to ``out`` when given."""
    import nbformat

    timeout = cell_timeout(profile, timeout)

    path = Path(path)
    nb = reference(path) if path.suffix == ".md" else read(path)
    expected = exercises(nb)
    if not expected:
        raise ValueError(f"{path} has no exercises: is it a lab notebook?")
    if "profile" not in parameters(nb):
        raise ValueError(f"{path} has no parameters cell assigning `profile`: is it a lab notebook?")
    with tempfile.TemporaryDirectory() as tmp:
        executed = Path(tmp) / "executed.ipynb"
        stopped, failing_cell = None, None
        start = time.perf_counter()
        try:
            execute(nb, executed, parameters={"profile": profile}, cwd=path.parent.resolve(), timeout=timeout)
        except Exception as err:  # a cell raised, timed out, or the kernel died: report what ran before it
            stopped, failing_cell = _stop_reason(err, executed)
        seconds = time.perf_counter() - start
        done = nbformat.read(executed, as_version=4) if executed.exists() else nb
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(executed, out) if executed.exists() else nbformat.write(done, out)
    found = {r.exercise: r for r in results_of(done.cells)}
    culprit = (failing_cell or {}).get("metadata", {}).get(CELL_METADATA) if failing_cell else None
    results = []
    for e in expected:
        label = e["label"]
        if label in found:
            results.append(found[label])
        elif stopped and label == culprit:
            results.append(Result(label, FAILED, f"your cell raised {stopped}"))
        elif stopped:
            results.append(Result(label, NOT_CHECKED, f"the notebook stopped before its check ({stopped})"))
        else:
            results.append(Result(label, NOT_CHECKED, "no check of this exercise ran (was its check cell removed?)"))
    results += [r for label, r in found.items() if label not in {e["label"] for e in expected}]
    titles = {e["label"]: e["title"] for e in expected}
    numbers = {e["label"]: e.get("number", str(i)) for i, e in enumerate(expected, 1)}
    return Grade(path.name, profile, seconds, results, titles, numbers, stopped)


def _stop_reason(err: Exception, executed: Path) -> tuple[str, dict | None]:
    """A one-line reason for a stopped execution, and the cell that raised (from the partly executed notebook)."""
    import nbformat

    reason = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', str(err))}".strip()
    reason = reason.splitlines()[0][:300] if reason else type(err).__name__
    if not executed.exists():
        return reason, None
    nb = nbformat.read(executed, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return f"{reason} (code cell {i})", cell
    return reason, None
