"""Checking a lab's exercises inside the notebook: :class:`Lab` runs a student's answer and its check and reports one
line per exercise (passed, not done, failed, or not checked), as an output the grader reads back from the executed
notebook.

An answer that is not written yet (the stub of the student's copy raises ``NotImplementedError``) is *not done*,
never an error, and an exercise that builds on one not done is not done either."""

from __future__ import annotations

import html
import os
import sysconfig
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import unitlib

T = TypeVar("T")

PASSED, NOT_DONE, FAILED, NOT_CHECKED = "passed", "not done", "failed", "not checked"
STATUSES = (PASSED, NOT_DONE, FAILED, NOT_CHECKED)
# The key of an output's metadata that carries a check's result (the grader reads it back from the notebook).
METADATA_KEY = "unitlib_lab_check"


@dataclass(frozen=True)
class Result:
    """The outcome of one exercise: its label, ``status`` (one of :data:`STATUSES`) and a message for the student."""

    exercise: str
    status: str
    message: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}; valid: {', '.join(STATUSES)}")

    def line(self) -> str:
        return f"{self.exercise}: {self.status}" + (f": {self.message}" if self.message else "")

    def html(self) -> str:
        """The line as HTML (escaped: a message may hold any text, which Markdown could misread)."""
        message = f": {html.escape(self.message)}" if self.message else ""
        return (f'<p class="unitlib-check unitlib-check-{self.status.replace(" ", "-")}"><strong>'
                f"{html.escape(self.exercise)}</strong>: <em>{self.status}</em>{message}</p>")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class Lab:
    """The checks of one lab notebook. ``check`` runs an exercise's answer and its test and shows the result;
    ``summary`` shows every result so far. ``show=False`` keeps results silent (tests of the grader)."""

    def __init__(self, name: str, *, show: bool = True) -> None:
        self.name = name
        self.show = show
        self.results: dict[str, Result] = {}

    def check(self, exercise: str, answer: Callable[[], T], test: Callable[[T], str | None] | None = None, *,
              needs: Iterable[str] = ()) -> T | None:
        """Run ``answer()`` (the student's code, wrapped in a lambda) and ``test`` on its value.

        ``test`` raises ``AssertionError`` with a message for the student when the answer is wrong, and may return a
        note to show beside "passed". ``needs``: exercises whose answers this one uses; unless they passed, this one
        is not run. Returns the answer's value when the exercise passed, else ``None``."""
        value, result = self._run(exercise, answer, test, tuple(needs))
        self.results[exercise] = result
        if self.show:
            _display(result)
        return value if result.status == PASSED else None

    def _run(self, exercise: str, answer: Callable[[], T], test: Callable[[T], str | None] | None,
             needs: tuple[str, ...]) -> tuple[T | None, Result]:
        for need in needs:
            prior = self.results.get(need)
            if prior is None or prior.status in (NOT_DONE, NOT_CHECKED):
                return None, Result(exercise, NOT_DONE, f"needs {need} first")
            if prior.status != PASSED:
                return None, Result(exercise, NOT_CHECKED, f"needs {need}, which {prior.status}: fix it first")
        try:
            value = answer()
        except NotImplementedError as err:
            return None, Result(exercise, NOT_DONE, _not_done(exercise, err))
        except Exception as err:  # the student's code raised: a failure with the student's line, never a crash
            return None, Result(exercise, FAILED, f"your code raised {_where(err)}")
        if test is None:
            return value, Result(exercise, PASSED)
        try:
            note = test(value)
        except AssertionError as err:
            return None, Result(exercise, FAILED, str(err) or "the answer is not right")
        except NotImplementedError as err:  # the check called back into a stub (e.g. a method not written yet)
            return None, Result(exercise, NOT_DONE, _not_done(exercise, err))
        except Exception as err:
            return None, Result(exercise, FAILED, f"the check could not use your answer: {_where(err)}")
        return value, Result(exercise, PASSED, note or "")

    def status(self, exercise: str) -> str | None:
        result = self.results.get(exercise)
        return result.status if result else None

    def summary(self) -> None:
        """Show every exercise checked so far, one line each, and the count that passed."""
        from IPython.display import HTML, display

        passed = sum(r.status == PASSED for r in self.results.values())
        display(HTML(f"<p><strong>{html.escape(self.name)}: {passed} of {len(self.results)} exercises passed."
                     f"</strong></p>" + "".join(r.html() for r in self.results.values())))


def _display(result: Result) -> None:
    from IPython.display import display

    display({"text/html": result.html(), "text/plain": result.line()},
            metadata={METADATA_KEY: result.to_dict()}, raw=True)


def _not_done(exercise: str, err: NotImplementedError) -> str:
    stub = str(err.args[0]) if err.args else ""
    if stub and stub != exercise and stub.split(":")[0].strip() != exercise:
        return f"uses {stub.split(':')[0].strip()}, not answered yet"
    return "not answered yet (the cell still raises NotImplementedError)"


def _where(err: BaseException) -> str:
    """``Type: message`` and the innermost line of the student's code that raised it (not the library's)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if _students(f.filename)]
    text = f"{type(err).__name__}: {err}"
    if frames:
        f = frames[-1]
        text += f" (in {f.name}, line {f.lineno}: {f.line.strip()})" if f.line else f" (in {f.name})"
    return text


def _students(filename: str) -> bool:
    """Whether a traceback frame is the notebook's own code: not this library, not an installed package, not the
    standard library."""
    path = os.path.abspath(filename)
    return not any(path.startswith(root + os.sep) for root in _LIBRARY_ROOTS)


_LIBRARY_ROOTS = tuple({os.path.dirname(os.path.abspath(unitlib.__file__)),
                        *(p for p in (sysconfig.get_paths().get(k) for k in ("stdlib", "purelib", "platlib")) if p)})


def written(min_words: int = 30) -> Callable[[str], str]:
    """The check of a written answer: text of at least ``min_words`` words. What it says is for the teacher to read."""

    def test(text: Any) -> str:
        assert isinstance(text, str), f"return your answer as a string, got {type(text).__name__}"
        words = len(text.split())
        assert words >= min_words, f"{words} words: write at least {min_words}"
        return f"{words} words (your teacher reads it)"

    return test


def results_of(cells: Iterable[dict[str, Any]]) -> list[Result]:
    """The check results shown in executed notebook cells (nbformat dicts), in order; a check run twice counts once
    (the last)."""
    found: dict[str, Result] = {}
    for cell in cells:
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            meta = out.get("metadata", {}).get(METADATA_KEY)
            if meta:
                found[meta["exercise"]] = Result(meta["exercise"], meta["status"], meta.get("message", ""))
    return list(found.values())
