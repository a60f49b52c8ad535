"""Seconds of one UNIT run with this library's defaults against one with the official code's schedule, side by side
in one process, on the same backdoored model and the same defender's data, through the one public pipeline
(``unitlib.experiment.run``, records not saved). The model comes from the cache (trained first if missing).

    python benchmarks/unit_seconds.py [--profile cpu] [--attack blend] [--out benchmarks/out/unit-seconds-cpu.json]
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
    parser.add_argument("--out")
    args = parser.parse_args()
    base = config.profile(args.profile, attack=args.attack, defense="unit")
    runs = {"defaults": base, "official schedule": base.replace(defense_params=dict(OFFICIAL_SCHEDULE))}
    out: dict = {"profile": args.profile, "attack": args.attack, "model": base.model, "width": base.width}
    for label, exp in runs.items():
        start = time.perf_counter()
        rec = run(exp, device=args.device, save=False, progress=False, log=lambda *a: None)
        r = rec.report
        out[label] = {"defense_s": rec.seconds["defense"], "wall_s": round(time.perf_counter() - start, 1),
                      "steps_run": r["steps_run"], "seconds_per_step": r["seconds_per_step"],
                      "stop_reason": r["stop_reason"], "after": rec.metrics["after"],
                      "model_from_cache": rec.provenance["model_from_cache"]}
        print(f"{label}: {rec.seconds['defense']:.1f} s for {r['steps_run']} steps ({r['stop_reason']}), "
              f"after {rec.metrics['after']}", flush=True)
    out["official_over_defaults"] = round(out["official schedule"]["defense_s"] / out["defaults"]["defense_s"], 2)
    out["provenance"] = results.provenance(resolve_device(args.device))
    path = Path(args.out or Path(__file__).parent / "out" / f"unit-seconds-{args.profile}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
