"""The grid runner: every missing cell of the appendix's tables and figures at one profile, run as one job that
resumes where it stopped, on one machine (``workers`` processes) or on a cluster through an engine that already
exists (Ray or Dask; neither is a dependency of unitlib).

A cell is missing when the result records (the committed ``results/`` and ``results_dir``) hold no record of its
experiment as the library runs it today. Cells that share a backdoored model form one *group*, so that each model
is trained once and the defenses that need it reuse it from the model cache: on one machine the group's first cell
trains the model and its other cells then run on whichever workers are free (a grid of many defenses on one model,
as A.3's sweeps are, uses every worker; a model already in the cache has no first cell to wait for); on a cluster,
whose workers need not share a model cache, one task runs a group's cells in turn. Each cell's record is written
as soon as the cell is done, so an interrupted grid loses at most the cells in flight: the next run plans again and
finds only what is still missing.

    python -m unitlib.book grid --profile cpu --section a5_ablations --list
    python -m unitlib.book grid --profile cpu --table 8 --workers 2
    python -m unitlib.book grid --profile cpu --all --engine ray --address auto
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import results as store
from ..config import PROFILES, Experiment, profile
from .appendix import ITEMS, Item
from .report import RecordIndex, Section

__all__ = ["ENGINES", "Estimate", "Job", "Plan", "estimate", "item_refs", "plan", "run_grid", "run_group", "select_items"]

ENGINES = ("local", "ray", "dask")
SECTIONS = tuple(dict.fromkeys(item.notebook for item in ITEMS))


@dataclass(frozen=True)
class Job:
    """One experiment the grid needs, and which tables and figures need it."""

    experiment: Experiment
    undefended: bool  # a No Defense cell: any record of its backdoored model serves
    refs: tuple[str, ...]

    @property
    def label(self) -> str:
        e = self.experiment
        base = profile(e.profile).to_dict()
        skip = {"attack", "defense", "seed", "profile", "attack_params", "defense_params"}
        changes = [f"{k}={v}" for k, v in e.to_dict().items() if k not in skip and base.get(k) != v]
        changes += [f"{k}={v}" for k, v in {**e.attack_params, **e.defense_params}.items()]
        what = f" [{', '.join(changes)}]" if changes else ""
        return f"{e.attack} -> {e.defense}{what} (seed {e.seed}; {', '.join(self.refs)})"


@dataclass
class Plan:
    """What a grid covers at a profile: its cells, those with records, those that cannot run yet, and the jobs."""

    profile: str
    items: list[Item]
    jobs: list[Job]  # missing experiments, grouped by backdoored model (see :meth:`groups`)
    n_cells: int  # cells x seeds of the selected items
    n_done: int  # of them, with a record
    not_implemented: int  # of them, needing an attack or defense the library does not have

    def groups(self) -> list[list[Job]]:
        """The jobs by backdoored model, in plan order: one group per model, trained once."""
        by_model: dict[str, list[Job]] = {}
        for job in self.jobs:
            by_model.setdefault(job.experiment.model_key(), []).append(job)
        return list(by_model.values())

    def describe(self) -> str:
        lines = [f"profile {self.profile}: {len(self.items)} item(s) ({', '.join(item_refs(self.items))}); "
                 f"{self.n_cells} cell(s) x seed(s), {self.n_done} with a record, {self.not_implemented} not "
                 f"implemented, {len(self.jobs)} experiment(s) to run on {len(self.groups())} backdoored model(s)"]
        lines += [f"  {job.label}" for job in self.jobs]
        return "\n".join(lines)


def item_refs(items: Iterable[Item]) -> list[str]:
    return list(dict.fromkeys(i.ref for i in items))


def _normalise_ref(ref: str) -> str:
    """``8``, ``table 8``, ``Table8`` -> ``Table 8``; ``fig12``, ``Fig. 12``, ``figure 12`` -> ``Fig. 12``; ``A.1``."""
    text = ref.strip()
    m = re.fullmatch(r"(?i)(table|tab\.?|fig(?:ure)?\.?)?\s*(\d+)", text)
    if m:
        kind = "Fig." if (m.group(1) or "").lower().startswith("fig") else "Table"
        return f"{kind} {m.group(2)}"
    return text.upper() if re.fullmatch(r"(?i)a\.\d", text) else text


def select_items(*, sections: Iterable[str] = (), tables: Iterable[str] = (), everything: bool = False) -> list[Item]:
    """The appendix items (tables and figures with cells) of the named sections and tables, or all of them."""
    sections, tables = list(sections), list(tables)
    with_cells = [i for i in ITEMS if i.cells is not None]
    if everything:
        if sections or tables:
            raise ValueError("give --all, or sections and tables, not both")
        return with_cells
    if not sections and not tables:
        raise ValueError("nothing selected: give a section, a table or figure, or all")
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"unknown section(s) {', '.join(bad)}; valid choices: {', '.join(SECTIONS)}")
    refs = {_normalise_ref(t): t for t in tables}
    valid = item_refs(with_cells)
    bad = [given for ref, given in refs.items() if ref not in valid]
    if bad:
        raise ValueError(f"unknown table or figure {', '.join(map(repr, bad))}; valid choices: {', '.join(valid)}")
    return [i for i in with_cells if i.notebook in sections or i.ref in refs]


def plan(
    profile: str, items: list[Item], *, seeds: Iterable[int] = (0,), results_dir: str | os.PathLike | None = None,
    defenses: Iterable[str] = (),
) -> Plan:
    """The missing experiments of ``items`` at ``profile`` for ``seeds`` (nothing is run).

    ``defenses`` keeps only the cells of these defenses (registry names; ``none`` for the No Defense cells), e.g.
    the cheap baselines first and ANP and NC later, on the models the first pass trained and cached. The other
    cells stay missing and the same grid without the filter plans them."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid choices: {', '.join(PROFILES)}")
    only = _check_defenses(defenses)
    seeds = tuple(int(s) for s in seeds)
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be one or more ints >= 0, got {seeds!r}")
    dirs = [store.RESULTS_DIR] + ([Path(results_dir)] if results_dir else [])
    index = RecordIndex([d for d in dict.fromkeys(dirs) if d.exists()])
    wanted: dict[str, tuple[Experiment, bool, list[str]]] = {}
    n_cells = n_done = missing_parts = 0
    for item in items:
        # every swept value, every attack: a grid fills the whole table (max_sweep applies only to what is shown)
        sec = Section(name=item.notebook, profile=profile, seeds=seeds, compute_missing=False,
                      max_sweep=10**6 if profile == "smoke" else None,
                      results_dir=str(results_dir) if results_dir else None)
        assert item.cells is not None
        for cell in item.cells(sec):
            for seed in seeds:
                n_cells += 1
                exp = None if cell.missing else sec.experiment(cell, seed)
                if exp is None:
                    missing_parts += 1
                    continue
                undefended = cell.defense == "No Defense"
                if index.lookup(exp, undefended=undefended)[0] is not None:
                    n_done += 1
                    continue
                key = exp.model_key() if undefended else exp.key()
                entry = wanted.setdefault(key, (exp, undefended, []))
                if item.ref not in entry[2]:
                    entry[2].append(item.ref)
    # A defended run of a model records the undefended model too: a No Defense job is needed only where no defended
    # job of the same model is planned.
    kept = [(e, und, refs) for e, und, refs in wanted.values()
            if not only or ("none" if und else e.defense) in only]
    defended_models = {e.model_key() for e, und, _ in kept if not und}
    jobs = [Job(e, und, tuple(refs)) for e, und, refs in kept if not (und and e.model_key() in defended_models)]
    return Plan(profile, items, jobs, n_cells, n_done, missing_parts)


def _check_defenses(defenses: Iterable[str]) -> frozenset[str]:
    from ..defenses import DEFENSES

    names = [str(d).strip().lower() for d in defenses]
    valid = sorted({"none", *DEFENSES})
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown defense(s) {', '.join(map(repr, bad))}; valid choices: {', '.join(valid)}")
    return frozenset(names)


@dataclass(frozen=True)
class Estimate:
    """A plan's expected seconds, from the measured seconds of earlier records at its profile (medians)."""

    train_s: float | None  # per backdoored model trained at the profile's own scale (None: no record trained one)
    models: int
    cells_s: float  # the cells' defenses and evaluations, summed over the jobs that could be estimated
    unknown: tuple[str, ...]  # defenses with no record at this profile: not counted
    records: int
    # each model's training cost over the profile's own (model, width, training images, epochs): 1 at its scale
    scales: tuple[float, ...] = ()
    # the attacks of the plan whose training measured slower or faster than the median (activation suppression
    # runs a triggered forward pass beside each clean one): (attack, factor), already folded into ``scales``
    attack_factors: tuple[tuple[str, float], ...] = ()
    # the architectures of the plan whose training measured slower or faster per multiply-add than the median (a
    # narrow, deep ResNet keeps two CPU cores busier per multiply-add than the profile's model): (architecture,
    # factor), already folded into ``scales``; and those with no record to measure it, estimated by multiply-adds
    model_factors: tuple[tuple[str, float], ...] = ()
    unmeasured_models: tuple[str, ...] = ()

    @property
    def train_total_s(self) -> float:
        scales = self.scales or (1.0,) * self.models
        return (self.train_s or 0.0) * sum(scales)

    @property
    def total_s(self) -> float:
        return self.cells_s + self.train_total_s

    def describe(self) -> str:
        if not self.records:
            return "estimate: no record at this profile to estimate from"
        other = [x for x in self.scales if abs(x - 1.0) > 0.05]
        span = f"{min(other):.2g}" + (f"-{max(other):.2g}" if other and max(other) > min(other) else "") if other else ""
        scaled = (f"; {len(other)} of them at another scale, {span}x the profile's training cost (multiply-adds x "
                  f"images x epochs x the attack's and the architecture's measured cost): {self.train_total_s:.0f} s in all"
                  if other else "")
        train = (f"{self.models} model(s) x {self.train_s:.0f} s of training{scaled} (at most: models already in "
                 f"the model cache are loaded instead)" if self.train_s is not None
                 else f"{self.models} model(s), training time unknown (no record trained one)")
        unknown = f"; not counted, no record of: {', '.join(self.unknown)}" if self.unknown else ""
        slower = ", ".join(f"{a} {f:.2g}x" for a, f in self.attack_factors)
        attacks = f"; training cost measured per attack: {slower}" if slower else ""
        per_model = ", ".join(f"{m} {f:.2g}x" for m, f in self.model_factors)
        per_model = f"; per multiply-add, measured per architecture: {per_model}" if per_model else ""
        unmeasured = (f"; no record yet of {', '.join(self.unmeasured_models)}: estimated by multiply-adds alone, "
                      f"which undercounts narrow, deep networks" if self.unmeasured_models else "")
        return (f"estimate from {self.records} record(s): {self.total_s / 3600:.1f} h on one worker = {train} + "
                f"{self.cells_s:.0f} s of defenses and evaluations{attacks}{per_model}{unmeasured}{unknown}")


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# Training images of the full data sets (a record's own ``train_size`` says otherwise).
TRAIN_IMAGES = {"cifar10": 50_000, "cifar10-jpeg": 50_000}


def _multiply_adds(model: str, width: int | None, activation: str) -> float:
    """Multiply-adds of one forward pass of a 32x32 RGB image through the model's convolutions and linear layers."""
    import torch

    from .. import models

    total = 0.0

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features

    net = models.build(model, width=width, activation=activation).eval()
    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return total


def training_scale(experiment: Experiment, reference: Experiment) -> float:
    """How much training ``experiment``'s model costs against ``reference``'s: the ratio of multiply-adds per image
    x training images x epochs (1.0 where the two cannot be compared)."""
    def cost(e: Experiment) -> float | None:
        images = e.train_size or TRAIN_IMAGES.get(e.dataset)
        try:
            macs = _cached_multiply_adds(e.model, e.width, e.activation)
        except ValueError:
            return None
        return None if images is None else macs * images * e.epochs

    a, b = cost(experiment), cost(reference)
    return a / b if a and b else 1.0


@functools.cache
def _cached_multiply_adds(model: str, width: int | None, activation: str) -> float:
    return _multiply_adds(model, width, activation)


def architecture(experiment: Experiment) -> str:
    """The name :func:`model_factors` measures an architecture under: the model and its width."""
    return f"{experiment.model}" + (f" (width {experiment.width})" if experiment.width is not None else "")


def _seconds_per_cost(records: list, reference: Experiment, key: Callable[[Any], str],
                      factor: Callable[[Any], float] | None = None) -> dict[str, float]:
    """Per ``key`` of the records that trained their model: the median of training seconds per unit of training
    cost (:func:`training_scale`, divided by ``factor`` too where given), over the median of all of them; keys within
    10% of 1 are left out."""
    groups: dict[str, list[float]] = {}
    for r in records:
        seconds = r.seconds.get("train", 0)
        if r.provenance.get("model_from_cache") or seconds <= 1:
            continue
        try:
            scale = training_scale(r.experiment, reference) * (factor(r) if factor else 1.0)
        except (KeyError, TypeError, ValueError):
            continue
        groups.setdefault(key(r), []).append(seconds / scale)
    overall = _median([v for values in groups.values() for v in values])
    if not overall:
        return {}
    factors = {k: _median(v) / overall for k, v in groups.items()}
    return {k: f for k, f in sorted(factors.items()) if abs(f - 1.0) > 0.1}


def model_factors(records: list, reference: Experiment) -> dict[str, float]:
    """Per architecture (:func:`architecture`), its measured training seconds per multiply-add over every
    architecture's (medians over the records that trained their model): multiply-adds alone undercount what a
    narrow, deep network costs on a CPU, where each of its many small layers has a fixed overhead."""
    return _seconds_per_cost(records, reference, lambda r: architecture(r.experiment))


def attack_factors(records: list, reference: Experiment) -> dict[str, float]:
    """Per attack, its measured training seconds over every attack's, both per unit of training cost
    (:func:`training_scale`, and the architecture's measured cost, :func:`model_factors`) and as medians over the
    records that trained their model: what an attack's own training adds (a generator trained with the classifier, a
    second forward pass per batch). Attacks within 10% of 1 are left out."""
    per_model = model_factors(records, reference)
    return _seconds_per_cost(records, reference, lambda r: r.config.get("attack", ""),
                             lambda r: per_model.get(architecture(r.experiment), 1.0))


def profile_records(profile_name: str, results_dir: str | os.PathLike | None = None) -> list:
    """The records at ``profile_name`` in the committed ``results/`` and ``results_dir``, each experiment once: a
    record of the same key in both (a copy of the repository's records) counts once, as ``results_dir`` holds
    it."""
    import warnings

    dirs = [store.RESULTS_DIR] + ([Path(results_dir)] if results_dir else [])
    found: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unreadable records are reported where records are listed, not here
        for d in dict.fromkeys(Path(d).resolve() for d in dirs):
            if d.exists():
                found.update((r.key, r) for r in store.load_all(d) if r.config.get("profile") == profile_name)
    return list(found.values())


@dataclass(frozen=True)
class Calibration:
    """This machine's training speed for a profile's own model against the records' (images per second)."""

    images_per_s: float
    records_images_per_s: float
    records: int

    @property
    def factor(self) -> float:
        """How many times the records' seconds a run takes here (above 1: this machine is slower)."""
        return self.records_images_per_s / self.images_per_s

    def describe(self) -> str:
        return (f"this machine trains the profile's model at {self.images_per_s:.0f} images/s, the {self.records} "
                f"record(s) that trained it at {self.records_images_per_s:.0f} (median): times {self.factor:.2g}")


def _measure_speed(experiment: Experiment, device: str | None) -> float:
    from .. import models
    from ..train import throughput

    model = models.build(experiment.model, width=experiment.width, activation=experiment.activation)
    return throughput(model, experiment.recipe(), device=device)


def calibrate(profile_name: str, records: list, *, device: str | None = None,
              speed: Callable[[Experiment, str | None], float] | None = None) -> Calibration:
    """Time a few training steps of ``profile_name``'s own model here (``speed``: images per second; by default
    :func:`unitlib.train.throughput`, about 15 steps) and compare with the records that trained that model at the
    profile's own scale (same model, width, activation, training images, epochs and batch size; median images per
    second). The estimate of a plan (:func:`estimate`) times :attr:`Calibration.factor` is its estimate for this
    machine: records made on a faster or slower machine say little about this one otherwise."""
    reference = profile(profile_name)
    images = reference.train_size or TRAIN_IMAGES.get(reference.dataset)
    if images is None:
        raise ValueError(f"the size of data set {reference.dataset!r} is not known: nothing to calibrate against")
    keys = ("model", "width", "activation", "train_size", "epochs", "batch_size")
    rates = []
    for r in records:
        seconds = r.seconds.get("train", 0)
        if r.provenance.get("model_from_cache") or seconds <= 1 or r.config.get("profile") != profile_name:
            continue
        if all(r.config.get(k) == getattr(reference, k) for k in keys):
            rates.append(images * reference.epochs / seconds)
    if not rates:
        raise ValueError(f"no record at profile {profile_name!r} trained its own model: nothing to calibrate against")
    return Calibration((speed or _measure_speed)(reference, device), _median(rates), len(rates))


def estimate(the_plan: Plan, *, results_dir: str | os.PathLike | None = None) -> Estimate:
    """How long ``the_plan`` should take on one worker, from the seconds that earlier records at the same profile
    measured on their machines: the median training time per model, scaled for each model by its training cost
    against the profile's own (:func:`training_scale`: Fig. 14's ResNet-101 costs many times the profile's model)
    and by its attack's measured cost (:func:`attack_factors`), and per cell the median defense time of records
    with the same defense and defense parameters (else of the same defense), plus the median evaluation time.
    Nothing is run."""
    records = profile_records(the_plan.profile, results_dir)
    train = _median([r.seconds["train"] for r in records
                     if not r.provenance.get("model_from_cache") and r.seconds.get("train", 0) > 1])
    exact: dict[tuple[str, str], list[float]] = {}
    by_name: dict[str, list[float]] = {}
    evaluation: list[float] = []
    for r in records:
        params = repr(sorted((r.config.get("defense_params") or {}).items()))
        exact.setdefault((r.config.get("defense", ""), params), []).append(r.seconds.get("defense", 0.0))
        by_name.setdefault(r.config.get("defense", ""), []).append(r.seconds.get("defense", 0.0))
        evaluation.append(sum(v for k, v in r.seconds.items() if k not in ("train", "defense")))
    per_eval = _median(evaluation) or 0.0
    cells, unknown = 0.0, []
    for job in the_plan.jobs:
        e = job.experiment
        name = "none" if job.undefended else e.defense
        seconds = _median(exact.get((name, repr(sorted(e.defense_params.items()))), [])) or _median(
            by_name.get(name, []))
        if seconds is None and name != "none":
            unknown.append(name)
            continue
        cells += (seconds or 0.0) + per_eval
    reference = profile(the_plan.profile)
    factors = attack_factors(records, reference)
    per_model = model_factors(records, reference)
    groups = the_plan.groups()
    scales = tuple(training_scale(g[0].experiment, reference) * factors.get(g[0].experiment.attack, 1.0)
                   * per_model.get(architecture(g[0].experiment), 1.0) for g in groups)
    named = tuple((a, factors[a]) for a in dict.fromkeys(g[0].experiment.attack for g in groups) if a in factors)
    planned = list(dict.fromkeys(architecture(g[0].experiment) for g in groups))
    measured = set()
    for r in records:
        if not r.provenance.get("model_from_cache") and r.seconds.get("train", 0) > 1:
            try:
                measured.add(architecture(r.experiment))
            except (KeyError, TypeError, ValueError):
                continue
    return Estimate(train, len(groups), cells, tuple(dict.fromkeys(unknown)), len(records), scales, named,
                    tuple((m, per_model[m]) for m in planned if m in per_model),
                    tuple(m for m in planned if m not in measured))


def run_group(
    experiments: list[dict[str, Any]], results_dir: str | None, device: str, data_root: str | None,
    threads: int | None = None, return_records: bool = False,
) -> list[dict[str, Any]]:
    """Run experiments (as ``Experiment.to_dict()``) one after another and write their records; what each took, and
    the error of any that failed (the others still run). Top-level and plain-data in and out, so that a process
    pool, Ray or Dask can ship it to a worker. With ``return_records`` nothing is written here: each entry carries
    its record (as a dict) for the caller to write, as a cluster's driver does (a worker may not see its folder)."""
    import dataclasses

    import torch

    from ..experiment import run

    if threads:
        torch.set_num_threads(threads)
    out = []
    for config in experiments:
        exp = Experiment.from_dict(config)
        started = time.perf_counter()
        try:
            record = run(exp, device=device, results_dir=results_dir, data_root=data_root, progress=False,
                         save=not return_records, log=lambda *a: None)
            entry = {"key": exp.key(), "ok": True, "seconds": time.perf_counter() - started,
                     "after": record.metrics["after"], "pid": os.getpid()}
            if return_records:
                entry["record"] = dataclasses.asdict(record)
            out.append(entry)
        except Exception as err:  # one failed cell must not lose the others
            out.append({"key": exp.key(), "ok": False, "seconds": time.perf_counter() - started,
                        "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
    return out


def models_in_cache(groups: list[list[Job]], data_root: str | None = None) -> list[bool]:
    """For each group (:meth:`Plan.groups`), whether its backdoored model is already in the model cache, so that its
    cells need not wait for a first one to train it. The data set is loaded once per name and size for its digest
    (part of the cache key). An attack that trains a generator with the model (IA, Dynamic) counts as not cached (its
    generator is cached apart), as does any group whose look-up fails: its first cell then runs alone, as before, and
    reports the error."""
    from .. import data

    digests: dict[tuple[str, int | None], str] = {}
    out = []
    for group in groups:
        exp = group[0].experiment
        try:
            if getattr(exp.make_attack(), "trains_with_model", False):
                out.append(False)
                continue
            source = (exp.dataset, exp.train_size)
            if source not in digests:
                digests[source] = data.load(exp.dataset, data_root, size=exp.train_size).digest
            out.append(store.model_path(exp, digests[source]).exists())
        except Exception:  # noqa: BLE001 - the cell itself reports it, with its traceback
            out.append(False)
    return out


class Schedule:
    """The order in which the local engine's workers take the cells. A group's first cell trains (or loads) its
    backdoored model into the model cache; once it is done, the group's other cells read the model from there, each
    on its own, on whichever worker is free, and they go before any new group. A group whose model is already cached
    (``cached``, one flag per group) has no first cell: each of its cells is a unit of its own from the start. Nothing
    new starts unless ``may_start`` (the time limit not reached): a cell left then loses nothing, since its model is
    in the cache (or failed to train) and the next run of the same grid runs it. Units are ``(cells, rest)``: the
    payloads to run now and those that wait for them."""

    def __init__(self, payloads: list[list[dict[str, Any]]], cached: list[bool] | None = None) -> None:
        if cached is not None and len(cached) != len(payloads):
            raise ValueError(f"cached needs one flag per group: {len(cached)} flag(s) for {len(payloads)} group(s)")
        flags = cached if cached is not None else [False] * len(payloads)
        self.fresh: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
        for group, ready in zip(payloads, flags):
            if ready:
                self.fresh += [([cell], []) for cell in group]
            elif group:
                self.fresh.append((list(group[:1]), list(group[1:])))
        self.followers: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []

    def next(self, *, may_start: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        if not may_start:
            return None
        if self.followers:
            return self.followers.pop(0)
        if self.fresh:
            return self.fresh.pop(0)
        return None

    def finished(self, rest: list[dict[str, Any]], entries: list[dict[str, Any]]) -> None:
        """A unit is done: release the cells that waited for it."""
        if not rest:
            return
        if all(e["ok"] for e in entries):
            self.followers.extend(([cell], []) for cell in rest)  # the model is in the cache: independent cells
        else:
            # no model: the next cell tries (and may fail) alone, the others wait for it, so that two workers never
            # train the same model side by side and the time limit is checked between them
            self.followers.append((rest[:1], rest[1:]))


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def run_grid(
    the_plan: Plan, *, workers: int = 1, engine: str = "local", address: str | None = None,
    results_dir: str | os.PathLike | None = None, device: str = "auto", data_root: str | None = None,
    progress: bool = True, log: Callable[[str], None] = print, hours: float | None = None,
) -> list[dict[str, Any]]:
    """Run every job of ``the_plan``: one progress bar over the cells, a line per cell with its seconds. Returns one
    entry per job run (``ok``, ``seconds``, ``error``). ``engine`` ``local`` runs ``workers`` processes here (1: in
    this process; with more, a group's cells after its first, which trains the model, share the workers, and all
    the cells of a model already in the model cache do so from the start);
    ``ray`` and ``dask`` submit one task per backdoored model to the cluster at ``address`` (``dask``
    without one starts a local cluster of ``workers`` processes), and the records their workers send back are
    written here, by the driver.

    ``hours`` (local engine): start no cell once that many hours have passed since the start; the cells running
    then finish and write their records (a model being trained lands in the cache), the rest are left for the next
    run of the same grid."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid choices: {', '.join(ENGINES)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if hours is not None:
        if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not hours > 0 or math.isinf(hours):
            raise ValueError(f"hours must be a number > 0, got {hours!r}")
        if engine != "local":
            raise ValueError(f"hours applies to the local engine only (a cluster's tasks are all submitted at once), "
                             f"got engine {engine!r}")
    deadline = None if hours is None else time.monotonic() + 3600 * hours
    in_time = (lambda: True) if deadline is None else (lambda: time.monotonic() < deadline)
    out_dir = str(results_dir) if results_dir else None
    store.check_writable(out_dir)  # before hours of work, not after
    groups = the_plan.groups()
    labels = {job.experiment.key(): job.label for job in the_plan.jobs}
    payloads = [[job.experiment.to_dict() for job in group] for group in groups]
    done: list[dict[str, Any]] = []
    bar = tqdm(total=len(the_plan.jobs), desc=f"grid {the_plan.profile}", unit="cell", disable=not progress)

    def collect(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            if "record" in entry:  # a cluster worker's record, written here (atomically) by the driver
                entry["path"] = str(store.save(store.Record(**entry.pop("record")), out_dir))
            done.append(entry)
            label = labels.get(entry["key"], entry["key"][:12])
            if entry["ok"]:
                after = entry["after"]
                log(f"done {label} in {entry['seconds']:.0f} s: acc {after['clean_acc']:.2%}, asr {after['asr']:.2%}")
            else:
                log(f"FAILED {label} after {entry['seconds']:.0f} s: {entry['error']}")
            bar.update(1)

    try:
        if engine == "local" and workers == 1:
            schedule = Schedule(payloads)
            while (unit := schedule.next(may_start=in_time())) is not None:
                cells, rest = unit
                entries = run_group(cells, out_dir, device, data_root)
                collect(entries)
                schedule.finished(rest, entries)
        elif engine == "local":
            threads = _threads_per_worker(workers)
            cached = models_in_cache(groups, data_root)
            if any(cached):
                log(f"{sum(cached)} of {len(groups)} backdoored model(s) already in the model cache: their cells "
                    f"start on any free worker")
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                schedule, running = Schedule(payloads, cached), {}
                while True:
                    while len(running) < workers:
                        unit = schedule.next(may_start=in_time())
                        if unit is None:
                            break
                        cells, rest = unit
                        running[pool.submit(run_group, cells, out_dir, device, data_root, threads)] = rest
                    if not running:
                        break
                    finished, _ = wait(set(running), return_when=FIRST_COMPLETED)
                    for future in finished:
                        rest = running.pop(future)
                        entries = future.result()
                        collect(entries)
                        schedule.finished(rest, entries)
        elif engine == "ray":
            ray = _engine_module("ray")
            if not ray.is_initialized():
                ray.init(address=address or "auto")
            remote = ray.remote(run_group)
            pending = [remote.remote(p, out_dir, device, data_root, None, True) for p in payloads]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                collect(ray.get(ready[0]))
        else:
            distributed = _engine_module("dask.distributed")
            # no address: a local cluster of ``workers`` worker processes here, sharing the cores between them
            client = distributed.Client(address) if address else distributed.Client(
                n_workers=workers, threads_per_worker=_threads_per_worker(workers), processes=True,
                dashboard_address=None)
            try:
                futures = [client.submit(run_group, p, out_dir, device, data_root, None, True, pure=False)
                           for p in payloads]
                for future in distributed.as_completed(futures):
                    collect(future.result())
            finally:
                client.close()
    finally:
        bar.close()
    left = len(the_plan.jobs) - len(done)
    if deadline is not None and left:
        log(f"stopped at the time limit ({hours:g} h): {left} of {len(the_plan.jobs)} cell(s) left; the same "
            f"command runs them")
    return done


def _engine_module(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        package = name.split(".")[0]
        extra = "unitlib[cluster]" if package == "dask" else package
        raise RuntimeError(f"engine {package!r} needs the {package} package, which unitlib does not install: "
                           f"pip install '{extra}' (or use --engine local)") from err
