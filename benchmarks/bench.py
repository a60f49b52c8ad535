"""Time one training epoch and one UNIT run at the `cpu` and `paper` model sizes, side by side in one process.

Timing does not depend on pixel values, so inputs are random tensors of CIFAR-10's shape. Where a full epoch or
UNIT run would take too long (ResNet-18 on a CPU), ``--max-steps`` steps are timed and the total extrapolated;
the output says which numbers are measured and which extrapolated.

    python benchmarks/bench.py [--profiles cpu paper] [--max-steps 20] [--device auto] [--out bench.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unitlib import config, models
from unitlib.defenses import UNIT, CleanSplit
from unitlib.results import device_name
from unitlib.train import Recipe, resolve_device, throughput


def time_train(exp: config.Experiment, n_train: int, max_steps: int, device: torch.device) -> dict:
    recipe: Recipe = exp.recipe()
    steps_per_epoch = math.ceil(n_train / recipe.batch_size)
    steps = min(steps_per_epoch, max_steps)
    model = models.build(exp.model, width=exp.width, activation=exp.activation)
    images_per_s = throughput(model, recipe, steps=steps, device=device)
    return {
        "images_per_s": images_per_s,
        "epoch_s": n_train / images_per_s,
        "epoch_images": n_train,
        "measured_steps": steps,
        "extrapolated": steps < steps_per_epoch,
    }


def time_unit(exp: config.Experiment, n_opt: int, n_val: int, max_steps: int, device: torch.device) -> dict:
    """UNIT with this library's defaults and with the official schedule, on the same model and data: a run of
    ``max_steps`` steps gives the fixed cost (statistics pass, first validation) and the cost of one step, from
    which a whole run is extrapolated when it has more steps. The defaults stop when the accuracy budget binds,
    which random data cannot show: their ``run_s`` is at the 300-step cap, an upper bound (a real run's seconds:
    ``benchmarks/unit_seconds.py``)."""
    model = models.build(exp.model, width=exp.width, activation=exp.activation).to(device).eval()
    clean = CleanSplit(torch.rand(n_opt, 3, 32, 32), torch.randint(0, 10, (n_opt,)),
                       torch.rand(n_val, 3, 32, 32), torch.randint(0, 10, (n_val,)))
    out: dict = {}
    for label, unit in [("defaults", UNIT()), ("official", UNIT.official_schedule())]:
        n_steps = min(unit.steps, max_steps)
        probe = dataclasses.replace(unit, steps=n_steps, early_stop=False)
        probe(model, clean, device=device, progress=False)
        r = probe.report
        out[label] = {
            "steps": unit.steps, "lr": unit.lr, "freeze_weights": unit.freeze_weights, "measured_steps": n_steps,
            "init_s": r["seconds_init"], "step_s": r["seconds_per_step"],
            "run_s": r["seconds_init"] + r["seconds_per_step"] * unit.steps, "extrapolated": n_steps < unit.steps,
        }
    out["official_over_defaults_at_cap"] = out["official"]["run_s"] / out["defaults"]["run_s"]
    out["step_official_over_defaults"] = out["official"]["step_s"] / out["defaults"]["step_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=["cpu", "paper"], choices=list(config.PROFILES))
    parser.add_argument("--max-steps", type=int, default=20, help="cap on timed training steps (rest extrapolated)")
    parser.add_argument("--unit-steps", type=int, nargs="+", default=[30, 3],
                        help="cap on timed UNIT steps, one per profile in order (rest extrapolated)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    report = {"device": device_name(device), "torch": torch.__version__, "profiles": {}}
    for i, name in enumerate(args.profiles):
        unit_steps = args.unit_steps[min(i, len(args.unit_steps) - 1)]
        exp = config.profile(name)
        n_train = exp.train_size or 50_000
        n_clean = round(exp.clean_fraction * n_train)
        n_val = n_clean // 5
        report["profiles"][name] = {
            "model": f"{exp.model} (width {exp.width or models.DEFAULT_WIDTH[exp.model]})",
            "train": time_train(exp, n_train, args.max_steps, device),
            "unit": time_unit(exp, n_clean - n_val, n_val, unit_steps, device),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print()
    print(f"{'profile':8} {'model':24} {'train img/s':>12} {'epoch s':>9} {'UNIT defaults s (cap)':>22} {'UNIT official s':>16}")
    for name, r in report["profiles"].items():
        t, u = r["train"], r["unit"]
        star = lambda d: "*" if d["extrapolated"] else " "
        print(f"{name:8} {r['model']:24} {t['images_per_s']:12.0f} {t['epoch_s']:8.0f}{star(t)} "
              f"{u['defaults']['run_s']:21.0f}{star(u['defaults'])} {u['official']['run_s']:15.0f}{star(u['official'])}")
    print("* extrapolated from --max-steps timed steps")


if __name__ == "__main__":
    main()
