"""Why NAD costs the `cpu` profile's models so much accuracy: the size of NAD's attention term against the
cross-entropy, and the student's validation accuracy per epoch with and without it.

An analysis on the defender's own clean split (no test data): a cached backdoored model, NAD's teacher fine-tuned
as NAD does it, beta x attention loss between the undefended model and the teacher at two feature maps, then short
NAD runs (``--epochs``) at beta 0 and at the default beta, with the teacher in batch-statistics mode (NAD's default
here) and in eval mode (the official code).

    python benchmarks/nad_attention.py --attack instagram [--profile cpu] [--out benchmarks/out/nad-attention.json]

The backdoored model comes from the cache (trained first, through the one pipeline, if it is not there)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unitlib import config, experiment, results
from unitlib.defenses.common import Augmentation, clean_tensors, copy_model, feature_sites, finetune
from unitlib.defenses.nad import NAD, attention_map


def attention_gap(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, site: str,
                  beta: float) -> tuple[float, list[int]]:
    """beta x NAD's attention loss between two models at ``site`` on ``x`` (both in eval mode), and the feature
    map's shape (channels, height, width)."""
    feats: dict[str, torch.Tensor] = {}
    handles = [net.get_submodule(site).register_forward_hook(lambda m, i, o, k=k: feats.__setitem__(k, o))
               for k, net in (("s", student), ("t", teacher))]
    try:
        with torch.no_grad():
            for net in (student, teacher):
                net.eval()(x)
    finally:
        for h in handles:
            h.remove()
    loss = beta * float(F.mse_loss(attention_map(feats["s"]), attention_map(feats["t"])))
    return loss, list(feats["s"].shape[1:])


def analyse(attack: str, profile: str, epochs: int) -> dict:
    exp = config.profile(profile, attack=attack, defense="nad")
    ready = experiment.setup(exp, device="cpu", progress=False, log=lambda *a: None)
    x, y, x_val, y_val = clean_tensors(ready.clean, "cpu")
    nad = NAD()
    teacher = copy_model(ready.model, "cpu")
    finetune(teacher, x, y, epochs=nad.teacher_epochs, lr=nad.schedule, batch_size=nad.batch_size, x_val=x_val,
             y_val=y_val, augmentation=Augmentation(nad.crop, nad.rotation, nad.flip), momentum=nad.momentum,
             weight_decay=nad.weight_decay, nesterov=True, seed=nad.seed, progress=False)
    sites = feature_sites(ready.model, x[:8])  # every feature map, NAD's (the last) included
    gap = {}
    for site in sites:
        loss, shape = attention_gap(ready.model, teacher, x, site, nad.beta)
        gap[site] = {"shape": shape, "beta_x_attention_loss": round(loss, 4)}
    runs = []
    for params in ({"beta": 0.0}, {}, {"batch_stats": False}):
        start = time.perf_counter()
        d = NAD(epochs=epochs, **params)
        d(ready.model, ready.clean, device="cpu", progress=False)
        runs.append({"params": params, "teacher_val_acc": round(d.report["teacher_val_acc"], 4),
                     "student": [{"val_acc": round(h["val_acc"], 4), "loss": round(h["loss"], 3)}
                                 for h in d.report["history"]],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(params, runs[-1]["student"], flush=True)
    return {"attack": attack, "profile": profile, "beta": nad.beta, "attention_gap_at_start": gap, "runs": runs,
            "provenance": {"code_version": results.code_version(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="instagram")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = analyse(args.attack, args.profile, args.epochs)
    path = Path(args.out or f"benchmarks/out/nad-attention-{args.attack}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["attention_gap_at_start"]), f"-> {path}")


if __name__ == "__main__":
    main()
