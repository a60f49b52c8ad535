"""Run several ``paper``-profile experiments side by side on one GPU, within a wall-clock deadline.

A ResNet-18 step at batch 128 leaves a large GPU partly idle while Python launches kernels, so a few training
processes at once finish more models per hour than one after another. The jobs are given in priority order. Every
``--tick`` seconds this script reads each job's training progress from its log and estimates when it will finish
from its recent rate. While the first (highest-priority) job would miss the deadline, the lowest-priority job still
running is stopped to give it GPU time (one per tick, so the rates can settle). A job whose own estimate misses the
deadline by more than ``--slack`` is stopped as hopeless; the first job never is. Jobs still running at the deadline
are stopped.

Measured on one H200 (16 cores, PyTorch 2.11): a paper-profile job (ResNet-18, batch 128, 39,100 steps) trains
eagerly at 70-110 steps/s alone (6-9 minutes), four side by side at 62-86 steps/s each; with ``--compile
reduce-overhead`` (CUDA graphs) one trains at about 268 steps/s after about 45 s of compiling.
Each finished job has written its own record (``python -m unitlib run``); a stopped one writes
nothing.

    python benchmarks/paper_gpu.py --deadline 540 --results OUT/results --logs OUT/logs \\
        --job "badnets" --job "clean:--attack badnets --set poison_rate=0 --defense none" ...

A job is ``NAME`` (``--attack NAME --defense unit``) or ``NAME:ARGS`` (the ``unitlib run`` arguments, verbatim).
Every job gets ``--profile paper`` and the ``--common`` arguments (e.g. ``--set dataset=cifar10-jpeg``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRESS = re.compile(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


@dataclass
class Job:
    name: str
    args: list[str]
    proc: subprocess.Popen | None = None
    log: Path | None = None
    started: float = 0.0
    ended: float = 0.0
    history: list[tuple[float, int]] = field(default_factory=list)
    total: int = 0
    state: str = "waiting"  # waiting, running, done, failed, stopped

    def progress(self) -> tuple[int, int] | None:
        assert self.log is not None
        with open(self.log, "rb") as f:
            f.seek(max(0, self.log.stat().st_size - 4096))
            tail = f.read().decode("utf-8", "replace")
        found = PROGRESS.findall(tail)
        return (int(found[-1][0]), int(found[-1][1])) if found else None

    def eta(self, now: float, window: float, tail_s: float) -> float | None:
        """Seconds until this job ends, from its training rate over the last ``window`` seconds; None if unknown."""
        if not self.history:
            return None
        done = self.history[-1][1]
        if done >= self.total:
            return tail_s
        past = [h for h in self.history if h[0] >= now - window]
        if len(past) < 2 or past[-1][0] - past[0][0] < window / 2:
            return None
        rate = (past[-1][1] - past[0][1]) / (past[-1][0] - past[0][0])
        return (self.total - done) / rate + tail_s if rate > 0 else float("inf")


def parse_job(spec: str) -> Job:
    name, _, rest = spec.partition(":")
    args = shlex.split(rest) if rest else ["--attack", name, "--defense", "unit"]
    return Job(name=name, args=args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", action="append", required=True, help="NAME or NAME:ARGS, highest priority first")
    ap.add_argument("--common", default="", help="arguments added to every job")
    ap.add_argument("--deadline", type=float, required=True, help="seconds from now when every job must be done")
    ap.add_argument("--parallel", type=int, default=4, help="jobs running at once")
    ap.add_argument("--tail", type=float, default=60.0, help="seconds a job needs after training (defense, metrics)")
    ap.add_argument("--window", type=float, default=40.0, help="seconds of progress a rate is measured over")
    ap.add_argument("--tick", type=float, default=10.0)
    ap.add_argument("--slack", type=float, default=0.15,
                    help="a job is stopped as hopeless when its estimate exceeds the time left by this fraction")
    ap.add_argument("--profile", default="paper", help="the profile of every job (smoke to try this script out)")
    ap.add_argument("--results", required=True)
    ap.add_argument("--logs", required=True)
    opts = ap.parse_args()

    t0 = time.time()
    end = t0 + opts.deadline
    logs = Path(opts.logs)
    logs.mkdir(parents=True, exist_ok=True)
    jobs = [parse_job(s) for s in opts.job]
    common = shlex.split(opts.common)

    def start(job: Job) -> None:
        job.log = logs / f"{job.name}.log"
        cmd = [sys.executable, "-m", "unitlib", "run", "--profile", opts.profile, *common, *job.args,
               "--results", opts.results]
        with open(job.log, "w") as f:
            f.write(" ".join(map(shlex.quote, cmd)) + "\n")
            f.flush()
            job.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        job.started, job.state = time.time(), "running"
        say(f"start {job.name}")

    def stop(job: Job, why: str) -> None:
        assert job.proc is not None
        os.killpg(job.proc.pid, signal.SIGTERM)
        try:
            job.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()
        job.state, job.ended = "stopped", time.time()
        say(f"stop {job.name}: {why}")

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    last_rate = 0.0  # steps/s of the slowest job at the last measurement
    for job in jobs[: opts.parallel]:
        start(job)
    while True:
        time.sleep(opts.tick)
        now = time.time()
        running = [j for j in jobs if j.state == "running"]
        for job in running:
            assert job.proc is not None
            if job.proc.poll() is not None:
                job.ended = now
                job.state = "done" if job.proc.returncode == 0 else "failed"
                say(f"{job.state} {job.name} (exit {job.proc.returncode}, {now - job.started:.0f} s)")
                continue
            seen = job.progress()
            if seen is not None:
                job.history.append((now, seen[0]))
                job.total = seen[1]
        running = [j for j in jobs if j.state == "running"]
        if now >= end:
            for job in running:
                stop(job, "deadline")
            break
        etas = {j.name: j.eta(now, opts.window, opts.tail) for j in running}
        if running:
            say("  ".join(f"{j.name} {j.history[-1][1] if j.history else 0}/{j.total or '?'} eta "
                          f"{'?' if etas[j.name] is None else f'{etas[j.name]:.0f}s'}" for j in running))
        left = end - now
        # A job is hopeless when even its own recent rate misses the deadline by more than ``--slack``. The first
        # (highest-priority) job is never stopped for the others; while it would miss the deadline, the
        # lowest-priority job is stopped to give it GPU time (one per tick, so rates can settle).
        hopeless = [j for j in running if etas[j.name] is not None and etas[j.name] > left * (1 + opts.slack)]
        first_late = bool(running) and etas[running[0].name] is not None and etas[running[0].name] > left
        if hopeless and hopeless[-1] is not running[0]:
            stop(hopeless[-1], "would miss the deadline")
            continue
        if first_late and len(running) > 1:
            stop(running[-1], f"to give {running[0].name} the GPU time it needs")
            continue
        rates = [(j.history[-1][1] - j.history[0][1]) / max(1e-9, j.history[-1][0] - j.history[0][0])
                 for j in running if len(j.history) > 1 and j.history[-1][1] < j.total]
        last_rate = min(rates) if rates else last_rate
        waiting = [j for j in jobs if j.state == "waiting"]
        if waiting and len(running) < opts.parallel:
            # A new job runs at about the speed of the ones running now: start it only if that would fit.
            total = max((j.total for j in jobs if j.total), default=0)
            if last_rate and total and total / last_rate + opts.tail + 60 < left:
                start(waiting[0])
                continue
        if not running:
            break  # nothing runs and nothing more fits
    for job in jobs:
        say(f"{job.name}: {job.state}" + (f" after {job.ended - job.started:.0f} s" if job.ended else ""))


if __name__ == "__main__":
    main()
