"""The `smoke` backdoors of the attacks that train a generator with the model (IA, Dynamic, with their
``attacks.SMOKE_PARAMS``): clean accuracy and ASR of the undefended model over several seeds, through the one pipeline
(``experiment.setup``), against the bars ``tests/test_generator_attacks.py`` checks. Each run uses its own empty
cache, so every number comes from a model trained here.

    python benchmarks/generator_smoke.py [--seeds 0 1 2] [--attacks ia dynamic]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unitlib import attacks, experiment, metrics, results  # noqa: E402
from unitlib.config import profile  # noqa: E402


def measure(name: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["UNITLIB_CACHE"] = cache
        exp = profile("smoke", attack=name, attack_params=attacks.SMOKE_PARAMS[name], defense="none", seed=seed)
        start = time.perf_counter()
        ready = experiment.setup(exp, device="cpu", progress=False, log=lambda *a: None)
        m = metrics.evaluate(ready.model, ready.dataset.x_test, ready.dataset.y_test, ready.attack, device="cpu")
    return {"attack": name, "seed": seed, "params": attacks.SMOKE_PARAMS[name], **m, "seconds": ready.seconds,
            "total_seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--attacks", nargs="+", default=["dynamic", "ia"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "generator-smoke.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.attacks:
        for seed in args.seeds:
            rows.append(measure(name, seed))
            print(json.dumps(rows[-1]), flush=True)
    summary = {name: {"asr_min": min(r["asr"] for r in rows if r["attack"] == name),
                      "clean_acc_min": min(r["clean_acc"] for r in rows if r["attack"] == name)}
               for name in args.attacks}
    out = {"rows": rows, "summary": summary, "provenance": results.provenance(torch.device("cpu"))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
