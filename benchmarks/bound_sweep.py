"""Why clipping removes some backdoors and not others: accuracy and ASR of a cached backdoored model under fixed
bounds at mean + k * std of the defender's clean activations (no optimisation), for all layers at once, for one
layer at a time, and with rejection on the last bounded layer.

An analysis, not a defense: it reads test images to show the trade-off curve, which no defense in unitlib does.

    python benchmarks/bound_sweep.py --attack blend [--profile cpu] [--out benchmarks/out/bound-sweep-blend.json]

The backdoored model comes from the cache (trained first, through the one pipeline, if it is not there)."""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from unitlib import config, data, experiment, results
from unitlib.defenses.unit import BoundedModel, clean_statistics
from unitlib.metrics import accuracy
from unitlib.train import augment


def sweep(attack: str, profile: str, n_test: int) -> dict:
    exp = config.profile(profile, attack=attack)
    ready = experiment.setup(exp, device="cpu", progress=False, log=lambda *a: None)
    if ready.cached_meta is None:
        print(f"note: the backdoored model of {attack} at profile {profile} was not cached; trained it now")
    ds, atk, model = ready.dataset, ready.attack, ready.model.eval()
    # the same statistics UNIT starts from: the augmented optimise split
    x_opt = augment(data.to_float(ready.clean.x_opt), crop=4, flip=True, generator=torch.Generator().manual_seed(0))
    x_val, y_val = data.to_float(ready.clean.x_val), ready.clean.y_val
    pick = torch.randperm(len(ds.x_test), generator=torch.Generator().manual_seed(1))[:n_test]
    x_test, y_test = data.to_float(ds.x_test[pick]), ds.y_test[pick]
    x_trig = atk.apply(x_test[y_test != exp.target])
    y_trig = torch.full((len(x_trig),), exp.target)

    stats = clean_statistics(model, x_opt)
    sites, mean, std = stats.sites, stats.mean, stats.std

    def measure(label: str, layers: list[str], k: float, mode: str = "clip") -> dict:
        bounded = BoundedModel(copy.deepcopy(model), {s: mean[s] + k * std[s] for s in layers}, mode).eval()
        row = {"bounds": label, "k": k, "mode": mode,
               "val_acc": accuracy(bounded, x_val, y_val, batch_size=500),
               "test_acc": accuracy(bounded, x_test, y_test, batch_size=500),
               "asr": accuracy(bounded, x_trig, y_trig, batch_size=500)}
        print(f"{label:28s} {mode:6s} k={k:<5} val {row['val_acc']:.3f}  test {row['test_acc']:.3f}  "
              f"asr {row['asr']:.3f}", flush=True)
        return row

    rows = [measure("none", [], 0.0)]
    rows += [measure("all layers", sites, k) for k in (4, 3, 2, 1.5, 1)]
    rows += [measure(s, [s], k) for s in sites for k in (1, 0)]
    rows += [measure(sites[-1], [sites[-1]], k, "reject") for k in (5, 4, 3)]
    rows += [measure("all layers", sites, k, "reject") for k in (6, 5, 4)]
    return {"attack": attack, "profile": profile, "dataset": exp.dataset, "model_key": exp.model_key(),
            "n_test": n_test, "n_trigger": len(x_trig), "sites": sites, "rows": rows,
            "provenance": results.provenance(torch.device("cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", required=True)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--n-test", type=int, default=2000, help="test images sampled (seeded)")
    parser.add_argument("--out", help="JSON output (default: benchmarks/out/bound-sweep-<attack>.json)")
    args = parser.parse_args()
    start = time.perf_counter()
    out = sweep(args.attack, args.profile, args.n_test)
    out["seconds"] = round(time.perf_counter() - start, 1)
    path = Path(args.out or Path(__file__).parent / "out" / f"bound-sweep-{args.attack}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written: {path} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
