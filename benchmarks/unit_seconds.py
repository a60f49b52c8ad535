"""Seconds of one UNIT run with this library's defaults against one with the official code's schedule, side by side
in one process, on the same backdoored model and the same defender's data, through the one public pipeline
(``unitlib.experiment.run``, records not saved). The model comes from the cache (trained first if missing).

    python benchmarks/unit_seconds.py [--profile cpu] [--attack blend] [--official-steps 300] [--out FILE]

The official schedule always runs all of its steps (no early stop), so its seconds are its setup plus 300 times its
seconds per step: ``--official-steps k`` times the first k steps and extrapolates the rest from them (the output
says so), for machines where 300 full-batch steps take too long to time in full.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unitlib import config, results  # noqa: E402
from unitlib.defenses.unit import OFFICIAL_SCHEDULE  # noqa: E402
from unitlib.experiment import run  # noqa: E402
from unitlib.train import resolve_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=list(config.PROFILES))
    parser.add_argument("--attack", default="blend")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--official-steps", type=int, default=OFFICIAL_SCHEDULE["steps"],
                        help="steps of the official schedule to time (fewer than 300: the rest extrapolated)")
    parser.add_argument("--out")
    args = parser.parse_args()
    full = OFFICIAL_SCHEDULE["steps"]
    if not 1 <= args.official_steps <= full:
        parser.error(f"--official-steps must be in 1..{full}, got {args.official_steps}")
    base = config.profile(args.profile, attack=args.attack, defense="unit")
    official = {**OFFICIAL_SCHEDULE, "steps": args.official_steps}
    runs = {"defaults": base, "official schedule": base.replace(defense_params=official)}
    out: dict = {"profile": args.profile, "attack": args.attack, "model": base.model, "width": base.width}
    for label, exp in runs.items():
        start = time.perf_counter()
        rec = run(exp, device=args.device, save=False, progress=False, log=lambda *a: None)
        r = rec.report
        defense_s = rec.seconds["defense"]
        if label == "official schedule" and args.official_steps < full:
            # setup + the measured steps, then the remaining steps at the measured seconds per step
            defense_s += (full - args.official_steps) * r["seconds_per_step"]
        out[label] = {"defense_s": round(defense_s, 1), "measured_steps": r["steps_run"],
                      "extrapolated": label == "official schedule" and args.official_steps < full,
                      "wall_s": round(time.perf_counter() - start, 1),
                      "steps_run": r["steps_run"], "seconds_per_step": r["seconds_per_step"],
                      "stop_reason": r["stop_reason"],
                      # a truncated official run's bounds are not the official schedule's: no metrics for them
                      "after": None if label == "official schedule" and args.official_steps < full
                      else rec.metrics["after"],
                      "model_from_cache": rec.provenance["model_from_cache"]}
        print(f"{label}: {defense_s:.1f} s" + (f" (extrapolated to {full} steps from {r['steps_run']})"
              if out[label]["extrapolated"] else f" for {r['steps_run']} steps ({r['stop_reason']})")
              + f", after {out[label]['after']}", flush=True)
    out["official_over_defaults"] = round(out["official schedule"]["defense_s"] / out["defaults"]["defense_s"], 2)
    out["provenance"] = results.provenance(resolve_device(args.device))
    path = Path(args.out or Path(__file__).parent / "out" / f"unit-seconds-{args.profile}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
