"""How long each lab takes: measured (``python -m unitlib.book.labs time``, saved with its provenance in
``labs/timings.json``) and, at the ``cpu`` profile, estimated from the work a lab does (:attr:`LabInfo.work`) and the
seconds the committed ``cpu`` records took for the same stages."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from ... import results
from .catalogue import LABS_DIR, LabInfo, get

TIMINGS = LABS_DIR / "timings.json"
# A training step of the adaptive attacker runs the model once on the batch for the task's loss and once on the
# batch and its triggered copy for the suppression loss, and back through both: about three times a plain step.
REGULARISED_TRAINING = 3.0


def measure(names: Iterable[str], *, profile: str = "smoke", threads: int | None = None, out: Path = TIMINGS,
            log: Callable[[str], None] = print, timeout: int | None = None) -> dict[str, Any]:
    """Execute each lab's reference at ``profile`` and record its wall-clock seconds and whether every exercise
    passed, in ``out`` under ``profile``, with the machine and code version. At ``smoke`` each lab starts from an
    empty cache, as a student's first run does (every backdoored model is trained); at other profiles the data and
    model caches are used as found (a lab's own attacks and settings are trained either way; the book's shared models
    are loaded when present). A cell may run ``timeout`` seconds (default: the profile's)."""
    from .notebooks import grade

    saved = {k: os.environ.get(k) for k in ("UNITLIB_CACHE", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    entry: dict[str, Any] = {"provenance": _provenance(threads), "labs": {}}
    try:
        if threads is not None:  # the kernels inherit the environment; torch sizes its thread pool from it
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        for name in names:
            with tempfile.TemporaryDirectory() as cache:
                if profile == "smoke":  # nothing to decode at smoke: start from nothing, as a student does
                    os.environ["UNITLIB_CACHE"] = cache
                start = time.perf_counter()
                g = grade(get(name).path, profile=profile, timeout=timeout)
                seconds = time.perf_counter() - start
            entry["labs"][name] = {"seconds": round(seconds, 1), "passed": g.passed, "counts": g.counts()}
            log(f"{name}: {seconds:.1f} s at {profile}, {'all passed' if g.passed else g.counts()}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    data = json.loads(out.read_text()) if out.exists() else {}
    data[profile] = entry
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return entry


def _provenance(threads: int | None) -> dict[str, Any]:
    import torch

    return {"code_version": results.code_version(), "cpu": results.device_name(torch.device("cpu")),
            "threads": threads if threads is not None else torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # other work on the machine slows every lab down: say how busy it was
            "load": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def measured(path: Path = TIMINGS) -> dict[str, Any]:
    """What ``python -m unitlib.book.labs time`` recorded, by profile (empty when it never ran)."""
    return json.loads(path.read_text()) if path.exists() else {}


def stage_seconds(profile: str = "cpu", directory: str | os.PathLike | None = None) -> dict[str, float]:
    """Median seconds of each stage over the result records of ``profile``: loading the data, training a
    backdoored model (records that trained it), one UNIT run and one evaluation on the test set; and how many records
    each median is over (``n_<stage>``)."""
    recs = [r for r in results.load_all(directory or results.RESULTS_DIR) if r.config.get("profile") == profile]
    samples = {
        "data": [r.seconds["data"] for r in recs if "data" in r.seconds],
        "train": [r.seconds["train"] for r in recs if "train" in r.seconds and not r.provenance.get("model_from_cache")
                  and r.seconds["train"] > 1],
        "unit": [r.seconds["defense"] for r in recs if r.config.get("defense") == "unit" and "defense" in r.seconds],
        "evaluate": [r.seconds["eval_after"] for r in recs if "eval_after" in r.seconds],
    }
    out: dict[str, float] = {}
    for stage, values in samples.items():
        if not values:
            raise ValueError(f"no {profile} record has the seconds of stage {stage!r}: cannot estimate")
        out[stage] = statistics.median(values)
        out[f"n_{stage}"] = len(values)
    return out


def estimate(lab: LabInfo | str, stages: dict[str, float]) -> float:
    """Seconds a lab's work (:attr:`LabInfo.work`) takes from the stages' seconds (:func:`stage_seconds`): the data
    once, each training with its evaluation, each UNIT run with its evaluation, and the other defenses' seconds."""
    info = get(lab) if isinstance(lab, str) else lab
    w = info.work
    trains = w.get("train", 0) + REGULARISED_TRAINING * w.get("train_regularised", 0)
    evaluations = w.get("train", 0) + w.get("train_regularised", 0) + w.get("unit", 0)
    return (stages["data"] + trains * stages["train"] + w.get("unit", 0) * stages["unit"]
            + evaluations * stages["evaluate"] + w.get("other_s", 0))


def overview(profile: str = "cpu", path: Path = TIMINGS) -> pd.DataFrame:
    """The labs for a teacher: what each revisits and covers, what it assumes, how many exercises it has, its
    minutes at ``smoke`` (measured, :func:`measured`) and at ``profile`` (measured if recorded there, else
    :func:`estimate`d from the committed records)."""
    import pandas as pd

    from .catalogue import LABS
    from .notebooks import exercises, reference

    times = measured(path)
    try:
        stages: dict[str, float] | None = stage_seconds(profile)
    except ValueError:
        stages = None
    rows = []
    for i, lab in enumerate(LABS, 1):
        smoke = times.get("smoke", {}).get("labs", {}).get(lab.name, {}).get("seconds")
        at = times.get(profile, {}).get("labs", {}).get(lab.name, {}).get("seconds")
        rows.append({
            "lab": f"{i}. {lab.title}", "revisits": lab.appendix, "covers": lab.covers,
            "assumes": "; ".join(lab.prerequisites), "exercises": len(exercises(reference(lab.path))),
            "smoke (min)": None if smoke is None else smoke / 60,
            f"{profile} (min)": at / 60 if at is not None else (estimate(lab, stages) / 60 if stages else None),
            f"{profile} measured": at is not None,
        })
    return pd.DataFrame(rows)


def overview_markdown(profile: str = "cpu", path: Path = TIMINGS) -> str:
    """:func:`overview` as Markdown for the teaching page: a table of the labs' exercises and minutes, then what each
    lab covers and assumes."""
    df = overview(profile, path)

    def minutes(value: float | None, measured: bool = True) -> str:
        if value is None or value != value:
            return "not measured"
        text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
        return text if measured else f"about {text}"

    lines = [f"| lab | revisits | exercises | smoke (min) | {profile} (min) |", "|---|---|---|---|---|"]
    for _, row in df.iterrows():
        lines.append(f"| {row['lab']} | {row['revisits']} | {row['exercises']} | {minutes(row['smoke (min)'])} | "
                     f"{minutes(row[f'{profile} (min)'], row[f'{profile} measured'])} |")
    lines += ["", _sources(profile, path), ""]
    for _, row in df.iterrows():
        lines.append(f"- **{row['lab']}**: {row['covers']}. *Assumes:* {row['assumes']}.")
    return "\n".join(lines)


def _sources(profile: str, path: Path) -> str:
    """Where the table's minutes come from: the machine of the measurements, the records of the estimates."""
    times = measured(path)
    notes = []
    for name in dict.fromkeys(["smoke", profile]):
        p = times.get(name, {}).get("provenance")
        if p:
            load = f", load average {p['load']:.1f} as it started" if p.get("load") is not None else ""
            notes.append(f"*{name}*: measured on {p['cpu']}, {p['threads']} thread(s){load}, code version "
                         f"`{p['code_version']}`, {p['created'][:10]}.")
        elif name == "smoke":
            notes.append("*smoke*: not measured yet (`python -m unitlib.book.labs time`).")
    from .catalogue import LABS

    if all(lab.name in times.get(profile, {}).get("labs", {}) for lab in LABS):
        return " ".join(notes)  # every lab measured at this profile: no estimate to explain
    try:
        st = stage_seconds(profile)
    except ValueError:
        return " ".join(notes)
    notes.append(
        f"*{profile}* (where not measured): the median seconds of the committed `{profile}` records' stages, "
        f"training a backdoored model {st['train'] / 60:.1f} min ({st['n_train']:.0f} records), a UNIT run "
        f"{st['unit']:.0f} s ({st['n_unit']:.0f}), an evaluation on the test set {st['evaluate']:.0f} s, times the "
        f"work of each lab; a model trained with the adaptive attacker's loss counts {REGULARISED_TRAINING:g} "
        f"trainings.")
    return " ".join(notes)
