"""CPU training and full-batch defense steps with glibc's malloc tuned (`unitlib.train.tune_allocator`, what the
library does on the CPU) against its defaults (``UNITLIB_MALLOC=default``), side by side in one run.

Each repeat runs the two settings back to back, in alternating order, each in a fresh process: it trains the `cpu`
profile's model (``resnet-mini`` width 32, batch 256) on random CIFAR-shaped data and then takes full-batch
forward and backward passes over 2,000 images, as UNIT's steps do over the defender's split. Rates are measured
after the first epoch and the first pass. The output holds every run (images per second, user and system CPU
seconds, minor page faults, peak resident memory) and the ratio of the two settings' medians.

    python benchmarks/allocator.py --repeats 3 --out benchmarks/out/allocator-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("tuned", "default")


def one(images: int, epochs: int, passes: int) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from unitlib import models
    from unitlib.train import Recipe, fit, tune_allocator

    state = tune_allocator()
    torch.manual_seed(0)
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (images,))
    model = models.build("resnet-mini", num_classes=10, in_channels=3, width=32)
    marks: list[tuple[float, resource.struct_rusage]] = []

    def mark(_: int = 0) -> None:
        marks.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)))

    fit(model, x, y, Recipe(epochs=epochs, batch_size=256, schedule="onecycle", lr=0.2), device="cpu",
        progress=False, on_epoch=mark)
    train = _between(marks[0], marks[-1], images * (len(marks) - 1))
    xb = torch.rand(2000, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    yb = torch.randint(0, 10, (2000,))
    model.train()
    marks.clear()
    for _ in range(passes + 1):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        mark()
    full = _between(marks[0], marks[-1], 2000 * passes)
    return {"allocator": state, "train": train, "full_batch": full,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "torch": torch.__version__}


def _between(a, b, images: int) -> dict:
    (t0, r0), (t1, r1) = a, b
    return {"images_per_s": round(images / (t1 - t0), 1), "seconds": round(t1 - t0, 2),
            "user_s": round(r1.ru_utime - r0.ru_utime, 2), "system_s": round(r1.ru_stime - r0.ru_stime, 2),
            "minor_faults": r1.ru_minflt - r0.ru_minflt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (default 3)")
    ap.add_argument("--images", type=int, default=256 * 12, help="training images per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (the first is not timed)")
    ap.add_argument("--passes", type=int, default=5, help="full-batch passes timed")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.repeats < 1 or a.epochs < 2 or a.passes < 1:
        ap.error("--repeats and --passes must be >= 1 and --epochs >= 2 (the first epoch is not timed)")
    if a.one:
        print(json.dumps(one(a.images, a.epochs, a.passes)))
        return
    runs: list[dict] = []
    for r in range(a.repeats):
        for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
            cmd = [sys.executable, __file__, "--one", "--images", str(a.images), "--epochs", str(a.epochs),
                   "--passes", str(a.passes)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout,
                                  env={**os.environ, "UNITLIB_MALLOC": setting})
            if done.returncode != 0:
                sys.exit(f"{setting} run failed:\n{done.stderr.strip()[-2000:]}")
            row = {"repeat": r, "setting": setting, **json.loads(done.stdout.strip().splitlines()[-1])}
            runs.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for stage in ("train", "full_batch"):
        med = {s: statistics.median(x[stage]["images_per_s"] for x in runs if x["setting"] == s) for s in SETTINGS}
        summary[stage] = {"median_images_per_s": med, "tuned_over_default": round(med["tuned"] / med["default"], 3)}
        print(f"{stage}: tuned {med['tuned']:.0f} images/s, default {med['default']:.0f}, "
              f"ratio {summary[stage]['tuned_over_default']:.3f}")
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
           "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "summary": summary, "runs": runs}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
