"""Coursework: the book's labs (``labs/*.md``), the checks that grade their exercises, and the student's copy.

    python -m unitlib.book.labs list                                   # the labs, what they cover
    python -m unitlib.book.labs strip lab2_unit_by_hand -o lab2.ipynb  # the student's copy, solutions removed
    python -m unitlib.book.labs check lab2.ipynb                       # execute at smoke, one line per exercise

Inside a lab notebook: ``lab = labs.Lab(name)``, then ``lab.check(label, lambda: answer(...), test)`` per exercise
(tests from :mod:`unitlib.book.labs.checks`); the grader reads the results back from the executed notebook.

The names below are loaded on first use, so that the book's build can read the catalogue without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LABS": ".catalogue", "LabInfo": ".catalogue",
    "FAILED": ".grading", "NOT_CHECKED": ".grading", "NOT_DONE": ".grading", "PASSED": ".grading", "Lab": ".grading",
    "Result": ".grading", "written": ".grading",
    "as_float": ".helpers", "code_digest": ".helpers", "quiet": ".helpers", "run": ".helpers",
    "test_metrics": ".helpers",
    "show_table": ".views",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
