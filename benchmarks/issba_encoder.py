"""What the ISSBA encoder trained at a profile's budget hides in an image, on this machine's thread count: the
decoder's bit accuracy on poisoned training images and the size of the encoder's residual (overall, and the offset
shared by all images). Training is repeatable at one thread count and not across thread counts, and at the `cpu`
budget the residual's size decides whether the classifier learns it (see the README's measured section).

    OMP_NUM_THREADS=1 python benchmarks/issba_encoder.py [--profile cpu] [--images 2000]
    OMP_NUM_THREADS=2 python benchmarks/issba_encoder.py

Trains the encoder in a fresh temporary cache (nothing of the user's cache is read or replaced) and writes
``benchmarks/out/issba-encoder-<profile>-<threads>t.json``."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def measure(profile_name: str, images: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["UNITLIB_CACHE"] = cache  # read when the encoder is cached, so set before training
        from unitlib import data, results
        from unitlib.config import profile

        exp = profile(profile_name, attack="issba")
        ds = data.load(exp.dataset, None, size=exp.train_size)
        attack = exp.make_attack()
        x = data.to_float(ds.x_train)
        start = time.perf_counter()
        attack.prepare(x, ds.y_train, progress=True)
        seconds = time.perf_counter() - start
        xs = x[:images]
        residual = attack.residual(xs)
        bits = (attack.decode(attack.apply(xs)) > 0).float()
        return {
            "profile": profile_name, "dataset": exp.dataset, "images": len(xs), "threads": torch.get_num_threads(),
            "bit_accuracy": round(float((bits == attack.secret).float().mean()), 4),
            "mean_abs_residual": round(float(residual.abs().mean()), 5),
            "shared_offset_per_pixel": round(float(residual.mean(0).abs().mean()), 5),
            "image_specific_std_per_pixel": round(float(residual.std(0).mean()), 5),
            "encoder_seconds": round(seconds, 1),
            "provenance": {"code_version": results.code_version(), "torch": torch.__version__},
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--images", type=int, default=2000)
    args = ap.parse_args()
    out = measure(args.profile, args.images)
    path = Path(__file__).parent / "out" / f"issba-encoder-{args.profile}-{out['threads']}t.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out), f"-> {path}")


if __name__ == "__main__":
    main()
