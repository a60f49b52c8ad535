"""The README's measured tables, regenerated from the committed records.

A table the README draws from records sits between two markers, ``<!-- begin generated: NAME -->`` and
``<!-- end generated: NAME -->`` (invisible on GitHub). :func:`update` rewrites every such block from the records
(``python -m unitlib.book readme``); :func:`stale` names the blocks that no longer match them (``--check``, and a
test, so that a record committed without regenerating the README is caught). Prose around the blocks is written by
hand from the same records."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from .. import results as store
from . import appendix, report

README = store.REPO_ROOT / "README.md"
_BLOCK = re.compile(r"(<!-- begin generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
                    re.DOTALL)


def _cpu_records(directory: Path | None) -> str:
    table = report.records_table(directory, "cpu").drop(columns=["profile", "device"])
    return report.markdown(table)


def _unit_table(directory: Path | None) -> str:
    return report.markdown(report.unit_table("cpu", directory=directory))


def _cpu_status(directory: Path | None) -> str:
    table = appendix.status(profiles=("cpu",), results_dir=str(directory) if directory else None, to_fill="cpu")
    table = table[table["to fill at cpu"] != ""]  # Fig. 7, the gallery, has no cells to record
    return report.markdown(table.drop(columns=["notebook"]))


BLOCKS: dict[str, Callable[[Path | None], str]] = {
    "unit-table": _unit_table,
    "cpu-status": _cpu_status,
    "cpu-records": _cpu_records,
}


def render(name: str, directory: str | Path | None = None) -> str:
    """The block ``name`` as it should read, from the records in ``directory`` (default: ``results/``)."""
    if name not in BLOCKS:
        raise ValueError(f"unknown generated block {name!r}; valid choices: {', '.join(BLOCKS)}")
    return BLOCKS[name](Path(directory) if directory is not None else None).rstrip("\n") + "\n"


def _blocks(text: str) -> list[re.Match[str]]:
    found = list(_BLOCK.finditer(text))
    unknown = sorted({m["name"] for m in found} - set(BLOCKS))
    if unknown:
        raise ValueError(f"unknown generated block(s) {', '.join(unknown)} in the README; valid choices: "
                         f"{', '.join(BLOCKS)}")
    return found


def stale(path: str | Path = README, directory: str | Path | None = None) -> list[str]:
    """Names of the generated blocks of ``path`` whose text differs from what the records give now."""
    text = Path(path).read_text()
    return [m["name"] for m in _blocks(text) if m["body"] != render(m["name"], directory)]


def update(path: str | Path = README, directory: str | Path | None = None) -> list[str]:
    """Rewrite every generated block of ``path`` from the records; returns the names of the blocks that changed."""
    path = Path(path)
    text = path.read_text()
    changed: list[str] = []

    def fill(m: re.Match[str]) -> str:
        body = render(m["name"], directory)
        if body != m["body"]:
            changed.append(m["name"])
        return m.group(1) + body + m.group(4)

    _blocks(text)
    new = _BLOCK.sub(fill, text)
    if new != text:
        path.write_text(new)
    return changed
