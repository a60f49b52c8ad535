"""The labs from the command line: list them, make the students' copies, check the students' notebooks, time the
reference solutions.

    python -m unitlib.book.labs list
    python -m unitlib.book.labs strip lab2_unit_by_hand -o lab2.ipynb       # a lab by name, or its .md
    python -m unitlib.book.labs strip --all -d handout/                     # every lab, into a folder
    python -m unitlib.book.labs check lab2.ipynb [more.ipynb ...] [--json grades.json]
    python -m unitlib.book.labs time --profile smoke --out labs/timings.json

``check`` executes each notebook with papermill at the ``smoke`` profile (``--profile`` to change it) and prints one
line per exercise: passed, not done, failed (with the reason) or not checked. It exits 0 when every exercise of
every notebook passed, 1 otherwise, 2 when a notebook cannot be graded at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import notebooks, timing
from .catalogue import LABS, get


def _source(text: str) -> Path:
    """A lab's source from its name (``lab2_unit_by_hand``) or a path."""
    path = Path(text)
    if path.exists():
        return path
    return get(text.removesuffix(".md")).path


TIMEOUT_HELP = "seconds per cell (default: " + ", ".join(
    f"{seconds} at {name}" for name, seconds in notebooks.PROFILE_TIMEOUTS.items()) + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unitlib.book.labs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the labs, what each covers and what it assumes")
    s = sub.add_parser("strip", help="the students' copies: solutions removed, as .ipynb")
    s.add_argument("labs", nargs="*", help="lab names or .md sources")
    s.add_argument("--all", action="store_true", help="every lab")
    s.add_argument("-o", "--out", help="the .ipynb to write (one lab only)")
    s.add_argument("-d", "--dir", default=".", help="folder for the copies (default: here)")
    c = sub.add_parser("check", help="execute notebooks at the smoke profile and report each exercise")
    c.add_argument("notebooks", nargs="+", help="students' .ipynb files (or a lab's .md: its reference)")
    c.add_argument("--profile", default="smoke", help="the profile to execute at (default: smoke)")
    c.add_argument("--timeout", type=int, default=None,
                   help=TIMEOUT_HELP)
    c.add_argument("--json", help="also write every result to this JSON file (for a grade book)")
    c.add_argument("--keep", help="folder to keep the executed notebooks in")
    t = sub.add_parser("time", help="execute the reference labs and record their seconds")
    t.add_argument("labs", nargs="*", help="lab names (default: all)")
    t.add_argument("--profile", default="smoke")
    t.add_argument("--threads", type=int, default=None, help="torch threads in the kernels (default: torch's)")
    t.add_argument("--out", default=str(timing.TIMINGS), help="the JSON file to update")
    t.add_argument("--timeout", type=int, default=None,
                   help=TIMEOUT_HELP)
    args = parser.parse_args(argv)

    if args.command == "list":
        for i, lab in enumerate(LABS, 1):
            print(f"Lab {i}: {lab.title} ({lab.name})\n  revisits: {lab.appendix}\n  covers: {lab.covers}\n"
                  f"  assumes: {'; '.join(lab.prerequisites)}")
        return 0
    if args.command == "strip":
        names = [lab.name for lab in LABS] if args.all else args.labs
        if not names:
            parser.error("name a lab, or pass --all")
        if args.out and len(names) != 1:
            parser.error("-o names one file: with several labs, use -d")
        for name in names:
            try:
                src = _source(name)
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            out = Path(args.out) if args.out else Path(args.dir) / f"{src.stem}.ipynb"
            notebooks.strip(src, out)
            print(f"{out}: {src.stem}, solutions removed")
        return 0
    if args.command == "check":
        grades, code = [], 0
        for nb in args.notebooks:
            keep = Path(args.keep) / f"{Path(nb).stem}.checked.ipynb" if args.keep else None
            try:
                grade = notebooks.grade(nb, profile=args.profile, timeout=args.timeout, out=keep)
            except (ValueError, FileNotFoundError) as err:
                print(f"{nb}: cannot be checked: {err}", file=sys.stderr)
                code = 2
                continue
            print("\n".join(grade.lines()), flush=True)
            grades.append(grade)
            if not grade.passed and code == 0:
                code = 1
        if args.json:
            Path(args.json).write_text(json.dumps([g.to_dict() for g in grades], indent=2) + "\n")
        return code
    if args.command == "time":
        names = args.labs or [lab.name for lab in LABS]
        for name in names:
            get(name)
        timing.measure(names, profile=args.profile, threads=args.threads, out=Path(args.out), log=print,
                       timeout=args.timeout)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
