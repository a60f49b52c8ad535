"""Training steps per second of one model under the training loop's execution modes, side by side in one run.

An eager ResNet-18 step at batch 128 leaves a large GPU mostly idle while Python launches kernels (an H200 ran the
`paper` profile at 70-100 steps/s, busy 20-35% of the time), so the mode matters more than the card there. Each
mode trains a fresh model on random CIFAR-shaped data for ``--epochs`` epochs (the last batch of each epoch is a
partial one, as with 50,000 images); the rate is measured over the epochs after the first, which carries any
compilation. Each mode runs in its own process with a time limit, so one that hangs or fails costs only itself.

    python benchmarks/train_step.py --device cuda --modes eager compile reduce-overhead --out OUT/steps.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("eager", "compile", "reduce-overhead", "max-autotune-no-cudagraphs")


def one(mode: str, model_name: str, width: int | None, n: int, batch: int, epochs: int, device: str) -> dict:
    import torch

    from unitlib import models
    from unitlib.train import Recipe, fit, resolve_device

    dev = resolve_device(device)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    model = models.build(model_name, num_classes=10, in_channels=3, **({"width": width} if width else {}))
    marks: list[float] = []

    def on_epoch(_: int) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    compile_arg: bool | str = False if mode == "eager" else True if mode == "compile" else mode
    start = time.perf_counter()
    fit(model, x, y, Recipe(epochs=epochs, batch_size=batch), device=dev, progress=False, compile=compile_arg,
        on_epoch=on_epoch)
    steps = -(-n // batch)
    rate = steps * (len(marks) - 1) / (marks[-1] - marks[0])
    return {"mode": mode, "model": model_name, "width": width, "device": str(dev), "images": n, "batch": batch,
            "first_epoch_s": round(marks[0] - start, 1), "steps_per_s": round(rate, 1),
            "images_per_s": round(rate * batch, 0), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES[:3]), choices=MODES)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--width", type=int)
    ap.add_argument("--images", type=int, default=128 * 100 + 80)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per mode")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.model, a.width, a.images, a.batch, a.epochs, a.device)))
        return
    rows = []
    for mode in a.modes:
        cmd = [sys.executable, __file__, "--one", mode, "--model", a.model, "--images", str(a.images), "--batch",
               str(a.batch), "--epochs", str(a.epochs), "--device", a.device] + (["--width", str(a.width)] if a.width else [])
        t = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            lines = done.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "mode": mode, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
        except subprocess.TimeoutExpired:
            row = {"mode": mode, "error": f"timed out after {a.timeout:.0f} s"}
        row["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
