#!/bin/bash
# One device session's work for the `paper` profile, in two steps:
#
#   bash benchmarks/gpu_session.sh prepare   # here: fills build/dev (ignored by git, ~22 MB) for the device
#   bash benchmarks/gpu_session.sh run       # there, from the repository root, carrying build/dev; output in $OUT
#
# `prepare` copies the cifar10-jpeg archive, pilgram (a pure-Python wheel) and scikit-image's bundled photos (for a
# machine whose Python lacks them), and the commit to declare as the records' code version (commit first).
# `run` decodes the data once, then runs the jobs through benchmarks/paper_gpu.py with a deadline, then (if time is
# left) the GPU benchmark. Measured on one H200: a paper-profile job (39,100 steps) trains eagerly at 70-110 steps/s
# (Python-bound: the GPU is busy 20-35% of the time), so a 10-minute call could not finish one; compiled into CUDA
# graphs (`--compile reduce-overhead`, the default here through COMMON) it trains at about 268 steps/s after about
# 45 s of compiling (benchmarks/train_step.py), about 3.5 minutes a job. The default PARALLEL=2 runs BadNets and
# Blend side by side after the data is decoded (about 25 s); the next jobs start only if they
# fit. Environment knobs: DEADLINE (s, default 560) for the jobs, LIMIT (s, default 590) for everything, PARALLEL,
# TAIL (s a job needs after training, default 60), JOBS (job specs for benchmarks/paper_gpu.py, one per line, highest priority first); PROFILE and COMMON (arguments
# for every job) let it be tried out here: PROFILE=smoke COMMON= JOBS=badnets DEADLINE=120 LIMIT=0 ... run.
set -u
cd "$(dirname "$0")/.."
DEV=build/dev
case "${1:-}" in
prepare)
  : "${SHARED_DATA:=../shared/data}"
  rm -rf "$DEV" && mkdir -p "$DEV/data" "$DEV/pkgs" "$DEV/shim/skimage/data" || exit 1
  cp "$SHARED_DATA/cifar10-jpeg.tar.xz" "$DEV/data/" || exit 1
  PY=${PY:-.venv/bin/python}
  "$PY" -m pip download pilgram==2.0.0 --no-deps -q -d "$DEV/wheel" && "$PY" -m zipfile -e "$DEV"/wheel/pilgram-*.whl "$DEV/pkgs" && rm -rf "$DEV/wheel" || exit 1
  "$PY" - "$DEV/shim/skimage" <<'PY' || exit 1
import shutil, sys
from pathlib import Path
from unitlib.attacks.photos import PHOTOS, data_dir
dst = Path(sys.argv[1])
for name in PHOTOS.values():
    shutil.copy(data_dir() / name, dst / "data" / name)
(dst / "__init__.py").write_text('"""Stand-in for scikit-image where it is missing: only its bundled photos."""\n')
(dst / "data" / "__init__.py").write_text("")
PY
  [ -z "$(git status --porcelain -- unitlib benchmarks)" ] || echo "warning: uncommitted changes in unitlib/ or benchmarks/" >&2
  git rev-parse HEAD > "$DEV/COMMIT"
  du -sh "$DEV"
  ;;
run)
  T0=$(date +%s)
  OUT=${OUT:-/tmp/devout}
  mkdir -p "$OUT/logs" "$OUT/results"
  # The cache (decoded data, trained models, the per-epoch checkpoints of unfinished training) lives outside the
  # carried build/dev, which each call replaces: on a machine still warm, a second call resumes a job that the first
  # stopped from its last finished epoch, and reuses the models it finished.
  export UNITLIB_DATA=$PWD/$DEV/data UNITLIB_CACHE=$PWD/build/gpu-cache OMP_NUM_THREADS=1
  export UNITLIB_CODE_VERSION=$(cat "$DEV/COMMIT")
  python3 -c "import pilgram" 2>/dev/null || export PYTHONPATH=$PWD/$DEV/pkgs${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import skimage.data" 2>/dev/null || export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/$DEV/shim
  { date; nvidia-smi; python3 -V; echo "PYTHONPATH=${PYTHONPATH:-}"
    python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())"
  } > "$OUT/env.txt" 2>&1
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$OUT/gpu.csv" 2>&1 &
  SMI=$!
  OMP_NUM_THREADS=16 python3 -c "
import time; t = time.time()
from unitlib import data; d = data.load('cifar10-jpeg'); print(d, f'{time.time() - t:.1f} s')" > "$OUT/logs/data.log" 2>&1
  echo "data ready at $(( $(date +%s) - T0 )) s" >> "$OUT/env.txt"
  JOBS=${JOBS:-"badnets
blend
clean:--attack badnets --set poison_rate=0 --defense none
wanet"}
  ARGS=()
  while IFS= read -r job; do [ -n "$job" ] && ARGS+=(--job "$job"); done <<< "$JOBS"
  python3 benchmarks/paper_gpu.py --deadline $(( ${DEADLINE:-560} - $(date +%s) + T0 )) --parallel "${PARALLEL:-2}" --tail "${TAIL:-60}" \
    --profile "${PROFILE:-paper}" --common "${COMMON---set dataset=cifar10-jpeg --compile reduce-overhead}" --results "$OUT/results" --logs "$OUT/logs" "${ARGS[@]}" > "$OUT/driver.log" 2>&1
  LEFT=$(( ${LIMIT:-590} - $(date +%s) + T0 ))
  echo "jobs done at $(( $(date +%s) - T0 )) s" >> "$OUT/env.txt"
  if [ "$LEFT" -gt 30 ]; then
    timeout "$LEFT" python3 benchmarks/bench.py --profiles cpu paper --device cuda --out "$OUT/bench-gpu.json" > "$OUT/logs/bench.log" 2>&1
  fi
  kill $SMI 2>/dev/null
  echo "end at $(( $(date +%s) - T0 )) s" >> "$OUT/env.txt"
  cat "$OUT/env.txt" "$OUT/driver.log"; ls "$OUT/results"
  ;;
*)
  echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2; exit 2
  ;;
esac
