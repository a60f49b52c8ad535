"""The grid runner's throughput on this machine: the same grid run with one worker and with two (or the counts
given), side by side in one process, each into its own empty results folder and (by default) its own empty model
cache, so that every run trains its models and runs its cells from scratch. Reports cells per hour and the speed-up
over one worker.

    python benchmarks/grid_throughput.py [--profile smoke] [--table 9] [--seeds 0 1 2 3] [--workers 1 2] [--out FILE]
    python benchmarks/grid_throughput.py --profile cpu --table 11 --seeds 0 --cache shared --out FILE

With ``--cache shared`` every run uses the model cache as it is (``UNITLIB_CACHE`` or the default folder): models
already trained there are loaded, so at ``cpu`` the runs measure the cells (defenses and evaluations) and not hours
of training. Each run starts from an empty results folder and ignores the committed records, so it runs every
cell of the grid.

A backdoored model is trained by one worker (its group's first cell); the group's other cells then share the
workers. Table 9 with four seeds (eight models) measures the mix; `--table 11 --seeds 0` (one model, five cells)
measures how one model's cells spread over the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unitlib import results  # noqa: E402
from unitlib.book import grid  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke", choices=sorted(grid.PROFILES))
    parser.add_argument("--cache", default="fresh", choices=["fresh", "shared"],
                        help="fresh: an empty model cache per run (default); shared: the model cache as it is")
    parser.add_argument("--table", action="append", default=[], help="tables or figures (default: 9)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out")
    args = parser.parse_args()
    if any(w < 1 for w in args.workers):
        parser.error(f"--workers must all be >= 1, got {args.workers}")
    items = grid.select_items(tables=args.table or ["9"])
    rows = []
    saved, committed = os.environ.get("UNITLIB_CACHE"), results.RESULTS_DIR
    try:
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                if args.cache == "fresh":
                    os.environ["UNITLIB_CACHE"] = str(Path(tmp) / "cache")
                out = Path(tmp) / "results"
                results.RESULTS_DIR = out  # the committed records would leave nothing to plan
                the_plan = grid.plan(args.profile, items, seeds=args.seeds, results_dir=out)
                start = time.perf_counter()
                done = grid.run_grid(the_plan, workers=workers, results_dir=out, progress=False,
                                     log=lambda *a: None)
                wall = time.perf_counter() - start
                failed = [d for d in done if not d["ok"]]
                if failed:
                    raise RuntimeError(f"{len(failed)} cell(s) failed with {workers} worker(s): {failed[0]['error']}")
                rows.append({"workers": workers, "cells": len(done), "models": len(the_plan.groups()),
                             "wall_s": round(wall, 1), "cells_per_hour": round(len(done) / wall * 3600)})
                print(f"{workers} worker(s): {len(done)} cells on {len(the_plan.groups())} models in {wall:.1f} s, "
                      f"{rows[-1]['cells_per_hour']} cells/hour", flush=True)
    finally:
        results.RESULTS_DIR = committed
        if saved is None:
            os.environ.pop("UNITLIB_CACHE", None)
        else:
            os.environ["UNITLIB_CACHE"] = saved
    base = rows[0]["cells_per_hour"]
    for row in rows:
        row["speedup"] = round(row["cells_per_hour"] / base, 2)
    import torch

    report = {"profile": args.profile, "model_cache": args.cache, "tables": grid.item_refs(items), "seeds": args.seeds,
              "runs": rows, "provenance": results.provenance(torch.device("cpu"))}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print("written:", args.out)
    else:
        print(text)


if __name__ == "__main__":
    main()
