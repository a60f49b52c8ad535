"""Seconds of Neural Cleanse's reverse engineering with every class's trigger reversed at once on shared mini-batches
(``classes_per_pass`` 0, the default) against one class after another (``classes_per_pass`` 1, as the official
code), side by side in one process, on the same backdoored model and defender's data (the model from the cache,
trained first if missing). Both run the same fixed budget, ``--steps`` steps per class with early stopping out of
reach (it needs the cost to have moved both ways and 25 steps without a better mask), so both do the same work:
classes x steps x batches_per_step mini-batches of ``batch_size`` images.

    python benchmarks/nc_seconds.py [--profile cpu] [--attack badnets] [--poison-rate R] [--steps 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unitlib import config, results  # noqa: E402
from unitlib.defenses.common import clean_tensors, copy_model, num_classes  # noqa: E402
from unitlib.defenses.nc import NC  # noqa: E402
from unitlib.experiment import setup  # noqa: E402
from unitlib.train import resolve_device  # noqa: E402


class _Bar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=list(config.PROFILES))
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--poison-rate", type=float, help="the attack's poison rate (default: the profile's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=4, help="steps per class (each a pass over the optimise split)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    dev = resolve_device(args.device)
    overrides = {} if args.poison_rate is None else {"poison_rate": args.poison_rate}
    exp = config.profile(args.profile, attack=args.attack, defense="nc", **overrides)
    s = setup(exp, device=dev, progress=False, log=lambda *a: None)
    x, _, _, _ = clean_tensors(s.clean, dev)
    frozen = copy_model(s.model, dev).eval().requires_grad_(False)
    k = num_classes(frozen, x)
    nc = NC(**{**exp.defense_params, "steps": args.steps})
    per_step = nc.batches_per_step or -(-len(x) // nc.batch_size)
    out: dict = {"profile": args.profile, "attack": args.attack, "poison_rate": exp.poison_rate,
                 "model_from_cache": s.cached_meta is not None, "model": exp.model, "width": exp.width,
                 "classes": k, "steps_per_class": args.steps, "batches_per_step": per_step,
                 "batch_size": nc.batch_size, "images_per_class_step": min(per_step * nc.batch_size, len(x))}
    for label, group in (("one class at a time", 1), ("all classes at once", k)):
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        logs = []
        for first in range(0, k, group):
            found = nc.reverse_classes(frozen, x, list(range(first, min(first + group, k))), gen, _Bar())
            logs += [log for _, _, log in found]
        seconds = time.perf_counter() - start
        out[label] = {"seconds": round(seconds, 2), "images_per_s": round(
            k * args.steps * out["images_per_class_step"] / seconds, 1),
            "steps": [log["steps"] for log in logs]}
        print(f"{label}: {seconds:.1f} s ({out[label]['images_per_s']} stamped images/s)", flush=True)
    out["one_over_all"] = round(out["one class at a time"]["seconds"] / out["all classes at once"]["seconds"], 2)
    out["provenance"] = results.provenance(dev)
    path = Path(args.out or Path(__file__).parent / "out" / f"nc-seconds-{args.profile}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"one class at a time / all at once: {out['one_over_all']}x; written: {path}")


if __name__ == "__main__":
    main()
