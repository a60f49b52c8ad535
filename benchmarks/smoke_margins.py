"""The margins of the baselines' `smoke` budgets: each baseline (with ``SMOKE_PARAMS``) on planted smoke backdoors of
several seeds, with one and two intra-op threads, against the bars ``tests/test_defenses.py`` checks
(``unitlib.defenses.SMOKE_BARS``: ASR after <= 0.4, ASR lowered by >= 0.5, clean accuracy >= 0.5; ANP's ASR <= 0.6,
lowered by >= 0.3; CLP, which is not expected to remove this backdoor: clean accuracy >= 0.8). Float rounding differs between thread counts and CPUs as it does between seeds, so a budget that
passes on every seed and thread count here has a margin the tests can rely on.
A planted model that misses the test's own bars for a backdoored model (ASR >= 0.9, clean accuracy >= 0.8) carries no
backdoor to remove: its rows are kept, marked ``backdoored: false``, and left out of the summary.

The output keeps the rows and summaries of the defenses not run this time (each summary with the provenance of
the run that measured it), so one defense's budget can be re-measured alone.

    python benchmarks/smoke_margins.py [--seeds 0 1 2 3] [--threads 1 2] [--defenses ft seam]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unitlib import config, data, metrics, results  # noqa: E402
from unitlib.defenses import SMOKE_BARS, SMOKE_PARAMS, CleanSplit, get, meets_smoke_bar  # noqa: E402
from unitlib.experiment import build_model  # noqa: E402
from unitlib.train import fit  # noqa: E402


def planted(seed: int) -> dict:
    exp = config.profile("smoke", defense="none", seed=seed)
    ds = data.load(exp.dataset, size=exp.train_size)
    attack = exp.make_attack()
    poisoned = attack.poison(data.to_float(ds.x_train), ds.y_train)
    model = fit(build_model(exp, ds), poisoned.x, poisoned.y, exp.recipe(), device="cpu", seed=exp.seed,
                progress=False)
    opt, val = data.defense_split(ds.y_train, exp.clean_fraction, exclude=poisoned.index, seed=exp.seed)
    clean = CleanSplit(ds.x_train[opt], ds.y_train[opt], ds.x_train[val], ds.y_train[val])
    before = metrics.evaluate(model, ds.x_test, ds.y_test, attack)
    return {"model": model.eval(), "clean": clean, "ds": ds, "attack": attack, "before": before}


def backdoored(before: dict) -> bool:
    """The bars tests/test_defenses.py's planted model must meet before any defense runs."""
    return before["asr"] >= 0.9 and before["clean_acc"] >= 0.8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--defenses", nargs="+", default=sorted(SMOKE_PARAMS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "smoke-margins.json"))
    args = parser.parse_args()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for seed in args.seeds:
            p = planted(seed)
            for name in args.defenses:
                start = time.perf_counter()
                defended = get(name, **SMOKE_PARAMS[name])(p["model"], p["clean"], device="cpu", progress=False)
                after = metrics.evaluate(defended, p["ds"].x_test, p["ds"].y_test, p["attack"])
                row = {"defense": name, "seed": seed, "threads": threads, "before": p["before"], "after": after,
                       "seconds": round(time.perf_counter() - start, 1)}
                row["backdoored"] = backdoored(p["before"])
                row["passes"] = meets_smoke_bar(name, p["before"], after)
                rows.append(row)
                verdict = ("ok" if row["passes"] else "FAIL") if row["backdoored"] else "no backdoor, left out"
                print(f"{name:6s} seed {seed} threads {threads}: before asr {p['before']['asr']:.3f}  after "
                      f"acc {after['clean_acc']:.3f} asr {after['asr']:.3f}  {verdict}", flush=True)
    summary = {}
    for name in args.defenses:
        mine = [r for r in rows if r["defense"] == name and r["backdoored"]]
        summary[name] = {"passes": sum(r["passes"] for r in mine), "runs": len(mine),
                         "left_out": sorted({(r["seed"], r["threads"]) for r in rows
                                             if r["defense"] == name and not r["backdoored"]}),
                         "max_asr_after": max(r["after"]["asr"] for r in mine),
                         "min_acc_after": min(r["after"]["clean_acc"] for r in mine),
                         "max_seconds": max(r["seconds"] for r in mine),
                         "params": SMOKE_PARAMS[name], "bar": SMOKE_BARS[name]}
    provenance = results.provenance(torch.device("cpu"))
    for entry in summary.values():
        entry["provenance"] = provenance
    out_path = Path(args.out)
    if out_path.exists():
        rows, summary = merged(json.loads(out_path.read_text()), rows, summary)
    out = {"rows": rows, "summary": summary, "provenance": provenance}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({name: summary[name] for name in args.defenses}, indent=1))


def merged(old: dict, rows: list[dict], summary: dict) -> tuple[list[dict], dict]:
    """``rows`` and ``summary`` of this run, with the earlier output's rows and summaries of the defenses not run
    this time kept (a kept summary without its own provenance gets the earlier output's)."""
    ran = set(summary)
    kept = {name: {**entry, "provenance": entry.get("provenance", old.get("provenance"))}
            for name, entry in old.get("summary", {}).items() if name not in ran}
    all_rows = [r for r in old.get("rows", []) if r["defense"] not in ran] + rows
    all_rows.sort(key=lambda r: (r["threads"], r["seed"], r["defense"]))
    return all_rows, dict(sorted({**kept, **summary}.items()))


if __name__ == "__main__":
    main()
