"""The book's command line: build the book, re-execute one section, print the result records as a table.

    python -m unitlib.book build                         # what `make book` runs
    python -m unitlib.book section a1_attacks -p profile smoke -p compute_missing true
    python -m unitlib.book assets                        # the offline JavaScript (widgets, require.js, MathJax)
    python -m unitlib.book records --profile cpu         # every result record as a Markdown table (--csv)
    python -m unitlib.book grid --profile cpu --table 8  # run every missing cell (--section, --all; --list)

The build itself is :mod:`unitlib.book.build`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from . import build


def _value(text: str) -> Any:
    """A ``-p`` value: a Python or JSON literal when it parses (numbers, lists, None/null, true/false), else text."""
    for parse in (ast.literal_eval, json.loads):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            continue
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unitlib.book", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="execute every page and section, then render the book")
    s = sub.add_parser("section", help="re-execute one section with new parameters, then re-render the book")
    s.add_argument("name", choices=build.SECTIONS + build.PAGES + build.LAB_PAGES + build.LABS)
    for p in (b, s):
        p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                       help="a parameter of the section(s), e.g. -p profile smoke -p attacks \"['badnets']\"")
        p.add_argument("--timeout", type=int, default=build.DEFAULT_TIMEOUT, help="seconds per cell")
    b.add_argument("--jobs", type=int, default=None,
                   help="notebooks executed side by side, one thread each (default: one per CPU core)")
    s.add_argument("--no-html", action="store_true", help="only execute the notebook")
    sub.add_parser("assets", help="fetch the offline JavaScript into build/static/vendor")
    sub.add_parser("html", help="render the already executed notebooks")
    rec_p = sub.add_parser("records", help="print the result records as a Markdown table")
    rec_p.add_argument("--profile", help="only this profile's records")
    rec_p.add_argument("--results", help="directory of records (default: results/ of the repository)")
    rec_p.add_argument("--csv", action="store_true", help="CSV instead of Markdown")
    rd = sub.add_parser("readme", help="regenerate the README's measured tables from the records")
    rd.add_argument("--check", action="store_true", help="only say which tables are stale (exit status 1 if any)")
    rd.add_argument("--results", help="directory of records (default: results/ of the repository)")
    add_grid_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "records":
        return records(args.results, args.profile, csv=args.csv)
    if args.command == "readme":
        return readme_command(args.results, check=args.check)
    if args.command == "grid":
        return grid_command(args)
    os.chdir(build.ROOT)
    if args.command == "assets":
        print(build.assets())
    elif args.command == "html":
        print(build.html() / "index.html")
    else:
        params = {k: _value(v) for k, v in args.parameter}
        try:  # before anything runs: a typo in a name is not a run with the defaults
            for name in build.SECTIONS if args.command == "build" else [args.name]:
                build.check_parameters(name, params)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.command == "build":
            if args.jobs is not None and args.jobs < 1:
                print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
                return 2
            build.build(params, timeout=args.timeout, jobs=args.jobs)
        else:
            out = build.execute(args.name, params, timeout=args.timeout)
            print(f"executed notebook: {out}")
            if not args.no_html:
                print(build.html() / "index.html")
    return 0


def records(directory: str | None = None, profile_name: str | None = None, *, csv: bool = False) -> int:
    """Print every record in ``directory`` (default: the committed ``results/``) as one Markdown (or CSV) table,
    :func:`unitlib.book.report.records_table`. A record that does not read is skipped with a one-line warning naming
    it; a bad folder or profile is one line on stderr and exit status 2."""
    from ..cli import one_line_warning
    from .report import markdown, records_table

    try:
        if directory is not None and not Path(directory).is_dir():
            raise ValueError(f"--results {directory!r} is not a directory of records")
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            table = records_table(directory, profile_name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table.to_csv(index=False) if csv else markdown(table), end="" if csv else "\n")
    return 0


def readme_command(directory: str | None = None, *, check: bool = False) -> int:
    """Regenerate (or, with ``check``, only list) the README's generated tables, :mod:`unitlib.book.readme`."""
    from . import readme

    if directory is not None and not Path(directory).is_dir():
        print(f"error: --results {directory!r} is not a directory of records", file=sys.stderr)
        return 2
    if check:
        names = readme.stale(directory=directory)
        print(f"stale: {', '.join(names)}" if names else "the README's generated tables match the records")
        return 1 if names else 0
    names = readme.update(directory=directory)
    print(f"regenerated: {', '.join(names)}" if names else "nothing to regenerate")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def add_grid_parser(sub: Any) -> argparse.ArgumentParser:
    from . import grid

    g = sub.add_parser("grid", help="run every missing cell of the appendix's tables and figures at a profile",
                       description=grid.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    g.add_argument("--section", action="append", default=[], help=f"one of: {', '.join(grid.SECTIONS)}")
    g.add_argument("--table", action="append", default=[], metavar="REF",
                   help="a table or figure: 8, 'Table 8', 'Fig. 12', A.1 (repeatable)")
    g.add_argument("--all", action="store_true", help="every table and figure of the appendix")
    g.add_argument("--defense", action="append", default=[], metavar="NAME",
                   help="only the cells of this defense (repeatable; 'none' for the No Defense cells): e.g. the "
                        "quick baselines first, then the rest on the models they cached")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per cell (default: 0)")
    g.add_argument("--list", "--dry-run", action="store_true",
                   help="only list the missing cells and the time they should take (from earlier records)")
    g.add_argument("--workers", type=int, default=1, help="cells run at once on this machine (processes)")
    g.add_argument("--engine", default="local", choices=list(grid.ENGINES),
                   help="local processes, or an existing Ray or Dask cluster (one task per backdoored model)")
    g.add_argument("--address", help="the cluster to join (ray: 'auto' or host:port; dask: the scheduler, e.g. "
                                     "tcp://host:8786; without one, dask starts a local cluster of --workers)")
    g.add_argument("--results", help="directory for the records (default: results/ of the repository; at smoke, "
                                     "build/results/smoke)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--data-root", help="where the data sets are (default: $UNITLIB_DATA, then ../shared/data)")
    g.add_argument("--hours", type=float, help="start no new cell after this many hours (local engine); what runs "
                                                "then finishes, the same command resumes")
    g.add_argument("--calibrate", action="store_true",
                   help="time a few training steps of the profile's model here (seconds) and scale the estimate "
                        "by this machine's speed against the records'")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return g


def grid_command(args: argparse.Namespace) -> int:
    from . import grid
    from .report import BUILD_RESULTS

    results_dir = args.results or (str(BUILD_RESULTS / "smoke") if args.profile == "smoke" else None)
    try:
        items = grid.select_items(sections=args.section, tables=args.table, everything=args.all)
        the_plan = grid.plan(args.profile, items, seeds=args.seeds, results_dir=results_dir, defenses=args.defense)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(the_plan.describe(), flush=True)
    if the_plan.jobs:
        est = grid.estimate(the_plan, results_dir=results_dir)
        print(est.describe(), flush=True)
        if args.calibrate and est.records:
            try:
                cal = grid.calibrate(args.profile, grid.profile_records(args.profile, results_dir),
                                     device=None if args.device == "auto" else args.device)
            except ValueError as err:
                print(f"not calibrated: {err}", flush=True)
            else:
                print(f"{cal.describe()}: about {est.total_s * cal.factor / 3600:.1f} h on one worker here",
                      flush=True)
    if args.list or not the_plan.jobs:
        return 0
    try:
        out = grid.run_grid(the_plan, workers=args.workers, engine=args.engine, address=args.address,
                            results_dir=results_dir, device=args.device, data_root=args.data_root,
                            progress=not args.quiet, hours=args.hours)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [e for e in out if not e["ok"]]
    total = sum(e["seconds"] for e in out)
    left = len(the_plan.jobs) - len(out)
    print(f"{len(out) - len(failed)} of {len(out)} cell(s) done in {total:.0f} s of cell time"
          + (f"; {len(failed)} failed (run again to retry them)" if failed else "")
          + (f"; {left} left at the time limit" if left else ""))
    return 1 if failed else 0
