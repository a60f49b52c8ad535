"""Command line: ``python -m unitlib run --profile cpu --attack badnets --defense unit``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any, TextIO

from . import attacks, defenses, models
from .config import PROFILES, profile
from .experiment import COMPILE_MODES

BOOK_COMMANDS = ("records", "grid")


def _value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, booleans, null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; ``attack_params.k=v`` and ``defense_params.k=v`` set one parameter."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        group, dot, sub = key.partition(".")
        if dot:
            if group not in ("attack_params", "defense_params"):
                raise ValueError(f"only attack_params.<name> and defense_params.<name> take a dot, got {key!r}")
            out.setdefault(group, {})[sub] = _value(text)
        else:
            out[key] = _value(text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unitlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="train (or reuse) a backdoored model, defend it, evaluate, write a record")
    run_p.add_argument("--profile", default="cpu", choices=list(PROFILES))
    run_p.add_argument("--attack", help=f"one of: {', '.join(sorted(attacks.ATTACKS))}")
    run_p.add_argument("--defense", help=f"one of: {', '.join(sorted(defenses.DEFENSES))}")
    run_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override an experiment key, e.g. --set epochs=4 --set defense_params.steps=300")
    run_p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (a GPU index) or mps")
    run_p.add_argument("--data-root", help="where the data set lives (default: $UNITLIB_DATA, then ../shared/data)")
    run_p.add_argument("--results", help="directory for the record (default: results/ of the repository)")
    run_p.add_argument("--no-save", action="store_true", help="do not write a record")
    run_p.add_argument("--quiet", action="store_true", help="no progress bars")
    run_p.add_argument("--compile", default="off", choices=list(COMPILE_MODES),
                       help="run the training steps through torch.compile; reduce-overhead (CUDA graphs) trains "
                            "the paper profile about 2.4x faster on a GPU")
    sub.add_parser("list", help="list profiles, datasets, models, attacks and defenses")
    show = sub.add_parser("show", help="print a profile's experiment as JSON")
    show.add_argument("--profile", default="cpu", choices=list(PROFILES))
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    # The records as a table and the grid runner are the book's (pandas): the commands stay here only to say where
    # they are; the core never imports the book.
    sub.add_parser("records", help="moved: python -m unitlib.book records (needs unitlib[book])",
                   add_help=False)
    sub.add_parser("grid", help="moved: python -m unitlib.book grid (needs unitlib[book])",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in BOOK_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest

    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning
        return _command(args)


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: TextIO | None = None, line: str | None = None) -> None:
    """Warnings as one line each (``warning: ...``), not with the source line that raised them."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def _command(args: argparse.Namespace) -> int:
    try:
        if args.command == "list":
            from .data import DATASETS

            for title, names in [("profiles", list(PROFILES)), ("datasets", list(DATASETS)),
                                 ("models", list(models.MODELS)), ("activations", list(models.ACTIVATIONS)),
                                 ("attacks", sorted(attacks.ATTACKS)), ("defenses", sorted(defenses.DEFENSES))]:
                print(f"{title}: {', '.join(names)}")
            return 0
        if args.command in BOOK_COMMANDS:
            command = " ".join([f"python -m unitlib.book {args.command}", *args.rest])
            raise ValueError(f"this command is the book's: {command} (with the book's extra installed: "
                             "pip install 'unitlib[book]')")
        changes = overrides(args.set)
        if args.command == "run":
            for key in ("attack", "defense"):
                if getattr(args, key):
                    changes[key] = getattr(args, key)
        exp = profile(args.profile, **changes)
        if args.command == "show":
            print(json.dumps(exp.to_dict(), indent=2))
            return 0
        from . import results
        from .experiment import run
        from .train import resolve_device

        # The device and the records' folder are checked before anything is printed or loaded (run checks them too).
        resolve_device(args.device)
        if not args.no_save:
            results.check_writable(args.results)
        print(f"experiment {exp.key()[:12]} (profile {exp.profile}): {exp.attack} -> {exp.defense} "
              f"on {exp.dataset}, {exp.model}")
        record = run(exp, device=args.device, results_dir=args.results, data_root=args.data_root,
                     progress=not args.quiet, save=not args.no_save, compile=args.compile)
        b, a = record.metrics["before"], record.metrics["after"]
        print(f"{'':10}{'clean_acc':>10}{'asr':>9}")
        print(f"{'before':10}{b['clean_acc']:>10.2%}{b['asr']:>9.2%}")
        print(f"{'after':10}{a['clean_acc']:>10.2%}{a['asr']:>9.2%}")
        print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in record.seconds.items()))
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # training diverged: nothing was cached or recorded
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
