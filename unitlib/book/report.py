"""What the book's notebooks show: our result records beside the appendix's reported numbers.

A notebook's ``parameters`` cell maps onto one :class:`Section` (validated; unknown names are refused with the list of
valid ones). A table or figure of the appendix is a list of :class:`Cell` s (``appendix.py`` builds them): one
experiment each, with the paper's number for it where the paper reports one. :meth:`Section.compare` looks every cell
up in the result records (the committed ``results/`` and the section's own ``results_dir``), runs the missing ones
when asked to (``compute_missing``; by default only at the ``smoke`` profile, whose runs take seconds), and returns a
table with ours, the paper's, the setting each was measured at, and a status that says plainly what is not reproduced.
A page shows that table through :func:`table_view` (the setting once, in the caption; rows without any number left
out) and :func:`missing_line` (what is not reproduced, in one line).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import attacks, defenses
from .. import results as store
from ..config import PROFILES, Experiment, profile, smoke_params, smoke_poison_rate
from . import paper

__all__ = ["NOT_IMPLEMENTED", "NOT_RUN", "REPRODUCED", "Cell", "Outcome", "Section", "missing_line", "show",
           "table_view"]

REPRODUCED = "reproduced"
NOT_RUN = "not yet reproduced: not run at this profile"
NOT_IMPLEMENTED = "not yet reproduced: not implemented"
BUILD_RESULTS = store.REPO_ROOT / "build" / "results"


@dataclass(frozen=True)
class Cell:
    """One comparison: an experiment of ours and, where the appendix has it, the number it reported.

    ``labels``: the row's description (e.g. ``{"attack": "BadNets", "clean data": "5%"}``). ``attack``/``defense``:
    the appendix's names (``"No Defense"``: the undefended model of the same experiment). ``changes``: further
    ``Experiment`` keys; ``defense_params``: the defense's own parameters. ``paper``: where the reported numbers are
    (``table`` and the table's setting columns), or None. ``missing``: why no experiment of ours can express this
    cell yet (a component this library does not have)."""

    labels: dict[str, Any]
    attack: str
    defense: str
    changes: dict[str, Any] = field(default_factory=dict)
    defense_params: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] | None = None
    missing: str | None = None


@dataclass
class Outcome:
    """What we have for a cell: its status, the record (if any) and the metrics of the cell's model."""

    status: str
    record: store.Record | None = None
    metrics: dict[str, float] | None = None  # clean_acc, asr (fractions) of the defended (or undefended) model
    reason: str = ""
    experiment: Experiment | None = None


@dataclass(frozen=True)
class Section:
    """The parameters of one appendix section's notebook.

    - ``profile``: ``smoke`` (synthetic data, computed live), ``cpu`` or ``paper`` (shown from the result records).
    - ``attacks``/``defenses``: registry names to show (None: the section's own list, the first one only at smoke).
    - ``seeds``: seeds per experiment (ours is the mean over the seeds that have records).
    - ``budgets``: UNIT accuracy budgets (``degradation``, fractions); the first is used wherever one budget is.
    - ``compute_missing``: run experiments that have no record (None: only at ``smoke``). At ``cpu`` one
      backdoored model takes minutes on two cores; at ``paper`` it needs a GPU.
    - ``max_sweep``: values per swept setting, and baselines per table at smoke (None: all at cpu/paper, 1 at
      smoke, where every value is trained live).
    - ``results_dir``: where new records go and are also read from (None: build/results/<profile>).
    - ``device``, ``data_root``: where to run and where the data sets are.
    """

    name: str = "section"
    profile: str = "cpu"
    attacks: tuple[str, ...] | None = None
    defenses: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    budgets: tuple[float, ...] = (0.02,)
    compute_missing: bool | None = None
    max_sweep: int | None = None
    results_dir: str | None = None
    device: str = "auto"
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; valid choices: {', '.join(PROFILES)}")
        for key, registry in (("attacks", attacks.ATTACKS), ("defenses", defenses.DEFENSES)):
            names = getattr(self, key)
            if names is not None:
                names = (names,) if isinstance(names, str) else tuple(names)
                unknown = [n for n in names if n not in registry]
                if unknown:
                    raise ValueError(f"unknown {key} {', '.join(unknown)}; valid choices: {', '.join(sorted(registry))}")
                object.__setattr__(self, key, names)
        object.__setattr__(self, "seeds", tuple(int(s) for s in _as_tuple(self.seeds)))
        object.__setattr__(self, "budgets", tuple(float(b) for b in _as_tuple(self.budgets)))
        if not self.seeds or not self.budgets:
            raise ValueError("seeds and budgets need at least one value each")
        if any(not 0 <= b < 1 for b in self.budgets):
            raise ValueError(f"budgets are fractions in [0, 1), got {self.budgets}")
        if self.max_sweep is not None and self.max_sweep < 1:
            raise ValueError(f"max_sweep must be >= 1 or None, got {self.max_sweep!r}")

    @classmethod
    def from_parameters(cls, name: str, **params: Any) -> Section:
        """The section from a notebook's parameters; unknown names are refused with the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; valid parameters: {', '.join(valid)}")
        return cls(name=name, **params)

    # -- what to show ------------------------------------------------------------------------------------------------
    @property
    def compute(self) -> bool:
        return self.profile == "smoke" if self.compute_missing is None else bool(self.compute_missing)

    @property
    def budget(self) -> float:
        return self.budgets[0]

    def sweep(self, values: list[Any] | tuple[Any, ...]) -> list[Any]:
        """The values of a swept setting to show: all, or the first ``max_sweep`` (1 at smoke)."""
        limit = self.max_sweep if self.max_sweep is not None else (1 if self.profile == "smoke" else None)
        return list(values)[:limit] if limit else list(values)

    def pick_attacks(self, paper_attacks: list[str]) -> list[str]:
        """The appendix attacks (paper names) to show: those whose registry name was asked for, else all of them
        (only the first implemented one at smoke)."""
        if self.attacks is not None:
            chosen = [p for p in paper_attacks if paper.registry_name(p) in self.attacks]
            extra = [paper.paper_name(a) for a in self.attacks if paper.paper_name(a) not in paper_attacks]
            return chosen + extra
        if self.profile == "smoke":
            implemented = [p for p in paper_attacks if paper.registry_name(p)]
            return implemented[:1] or paper_attacks[:1]
        return list(paper_attacks)

    def pick_defenses(self, paper_defenses: list[str]) -> list[str]:
        """The appendix defenses (paper names) to show, as :meth:`pick_attacks` (no defense and UNIT always)."""
        always = [d for d in paper_defenses if d in ("No Defense", "UNIT")]
        if self.defenses is not None:
            chosen = [d for d in paper_defenses if paper.defense_name(d) in self.defenses]
            return [d for d in paper_defenses if d in chosen or d in always]
        if self.profile == "smoke":
            others = self.sweep([d for d in paper_defenses if d not in always and paper.defense_name(d)])
            return [d for d in paper_defenses if d in always or d in others]
        return list(paper_defenses)

    def setting(self) -> str:
        """The profile's setting in words, for labelling our numbers."""
        exp = profile(self.profile)
        return _setting(exp.to_dict())

    # -- experiments ---------------------------------------------------------------------------------------------------
    def experiment(self, cell: Cell, seed: int = 0) -> Experiment | None:
        """The experiment of ``cell`` at this section's profile, or None where a component is not implemented."""
        attack = paper.registry_name(cell.attack) if cell.attack in paper.ATTACKS else (
            cell.attack if cell.attack in attacks.ATTACKS else None)
        if attack is None:
            return None
        base = profile(self.profile)
        if cell.defense == "No Defense":
            defense, params = "none", {}
        else:
            defense = paper.defense_name(cell.defense) if cell.defense in paper.DEFENSES else (
                cell.defense if cell.defense in defenses.DEFENSES else None)
            if defense is None:
                return None
            params = dict(base.defense_params) if defense == base.defense else {}
            # every run is live at smoke: the baselines' short smoke schedules (recorded with the experiment)
            params.update(smoke_params(self.profile, "defense", defense))
            if defense == "unit":
                params["degradation"] = self.budget
            params.update(cell.defense_params)
            defaults = defenses.parameters(defense)
            unknown = sorted(set(params) - set(defaults))
            if unknown:
                return None
            # Parameters at their defaults are left out, so the experiment is the same one (same hash) as a run
            # that never named them.
            params = {k: v for k, v in params.items() if defaults.get(k, object()) != v}
        changes = dict(cell.changes)
        if paper.attack_params(cell.attack, self.profile):
            # the recipe the appendix's numbers for this attack come from, and the profile's exceptions to it (a
            # cell's own params win)
            changes["attack_params"] = {**paper.attack_params(cell.attack, self.profile),
                                        **changes.get("attack_params", {})}
        if smoke_params(self.profile, "attack", attack):
            # the generator attacks' smaller smoke budgets (recorded with the experiment); a cell's own params win
            changes["attack_params"] = {**smoke_params(self.profile, "attack", attack),
                                        **changes.get("attack_params", {})}
        if smoke_poison_rate(self.profile, attack, base.poison_rate) != base.poison_rate:
            # a clean-label attack at smoke (config.SMOKE_CLEAN_LABEL_RATE)
            changes.setdefault("poison_rate", smoke_poison_rate(self.profile, attack, base.poison_rate))
        elif paper.poison_rate(cell.attack, self.profile) is not None:
            # the attacks that cannot use the appendix's fixed 10% (a cell that sets its own rate keeps it)
            changes.setdefault("poison_rate", paper.poison_rate(cell.attack, self.profile))
        return base.replace(attack=attack, defense=defense, defense_params=params, seed=seed, **changes)

    def record_dirs(self) -> list[Path]:
        dirs = [store.RESULTS_DIR, self.output_dir()]
        return [d for i, d in enumerate(dirs) if d.exists() and d not in dirs[:i]]

    def output_dir(self) -> Path:
        return Path(self.results_dir) if self.results_dir else BUILD_RESULTS / self.profile

    def outcome(self, cell: Cell, seed: int = 0, *, index: RecordIndex | None = None, log=print) -> Outcome:
        """Our result for ``cell`` (one seed): from a record, or computed when allowed, or why there is none."""
        if cell.missing:
            return Outcome(NOT_IMPLEMENTED, reason=cell.missing)
        exp = self.experiment(cell, seed)
        if exp is None:
            return Outcome(NOT_IMPLEMENTED, reason=_why_missing(cell))
        index = index or RecordIndex(self.record_dirs())
        record, which = index.lookup(exp, undefended=cell.defense == "No Defense")
        if record is None and self.compute:
            from ..experiment import run

            log(f"computing {exp.attack} -> {exp.defense} at profile {exp.profile} (seed {exp.seed})")
            record = run(exp, device=self.device, results_dir=self.output_dir(), data_root=self.data_root,
                         progress=False, log=lambda *a: None)
            index.add(record)
            which = "before" if cell.defense == "No Defense" else "after"
        if record is None:
            return Outcome(NOT_RUN, reason=f"no record of {exp.attack} -> {exp.defense} at profile {exp.profile}",
                           experiment=exp)
        return Outcome(REPRODUCED, record, dict(record.metrics[which]), experiment=exp)

    def compare(self, cells: list[Cell], *, extra: dict[str, str] | None = None, log=print) -> pd.DataFrame:
        """One row per cell: its labels, ours (percent, mean over seeds), the paper's, where each was measured, and
        the status. Metrics are ``acc`` (clean accuracy) and ``asr``; ``extra`` adds more of a record's metrics,
        each our metric's key mapped to the paper's name for it (e.g. ``{"asr_non_victim": "nonvictim_asr_after"}``
        for Table 5), as the columns ``ours <key>`` and ``paper <key>``."""
        index = RecordIndex(self.record_dirs())
        rows = []
        for cell in cells:
            outcomes = [self.outcome(cell, s, index=index, log=log) for s in self.seeds]
            done = [o for o in outcomes if o.status == REPRODUCED]
            row: dict[str, Any] = dict(cell.labels)
            for metric, key in (("acc", "clean_acc"), ("asr", "asr")):
                values = [100 * o.metrics[key] for o in done]
                row[f"ours {metric}"] = float(np.mean(values)) if values else np.nan
                if len(values) > 1:
                    row[f"ours {metric} std"] = float(np.std(values))
                row[f"paper {metric}"] = _paper_value(cell, metric)
            for key, paper_metric in (extra or {}).items():
                values = [100 * o.metrics[key] for o in done if key in o.metrics]
                row[f"ours {key}"] = float(np.mean(values)) if values else np.nan
                row[f"paper {key}"] = _paper_value(cell, paper_metric)
            # the undefended model each defense ran on (its record's "before"): the note says when it is not the
            # no-defense row's model, or was not backdoored
            for metric, key in (("acc", "clean_acc"), ("asr", "asr")):
                values = [100 * o.record.metrics["before"][key] for o in done if "before" in o.record.metrics]
                row[f"ours model {metric}"] = float(np.mean(values)) if values else np.nan
            row["ours: measured at"] = _setting(done[0].record.config) if done else ""
            row["paper: measured at"] = paper.PAPER_SETTING if cell.paper else ""
            if done and len(done) < len(outcomes):
                row["status"] = f"partly: {len(done)} of {len(outcomes)} seeds"
            elif done:
                row["status"] = REPRODUCED
            else:
                # a missing record needs no explanation; a missing component is named
                reason = outcomes[0].reason if outcomes[0].status == NOT_IMPLEMENTED else ""
                row["status"] = f"{outcomes[0].status} ({reason})" if reason else outcomes[0].status
            rows.append(row)
        df = pd.DataFrame(rows)
        std_cols = [c for c in df.columns if c.endswith(" std")]
        label_cols = [c for c in df.columns if not c.startswith(("ours", "paper", "status"))]
        extra_cols = [f"{side} {key}" for key in (extra or {}) for side in ("ours", "paper")]
        df["ours model"] = model_notes(df, label_cols)
        order = label_cols + ["ours acc", "ours asr", *std_cols, "paper acc", "paper asr", *extra_cols,
                              "ours model acc", "ours model asr", "ours model", "ours: measured at",
                              "paper: measured at", "status"]
        return df[order]

    def seconds(self, cells: list[Cell]) -> pd.DataFrame:
        """Per defense (as the cells label it: UNIT and UNIT with the official schedule apart), the measured seconds
        of the defense stage over the records behind ``cells`` (every seed; each record once; no-defense cells and
        cells without a record left out; nothing is computed): how many runs, their mean, least and most seconds,
        and the devices they ran on."""
        index = RecordIndex(self.record_dirs())
        runs: dict[str, dict[str, store.Record]] = {}
        for cell in cells:
            if cell.missing or cell.defense == "No Defense":
                continue
            for seed in self.seeds:
                exp = self.experiment(cell, seed)
                record = index.lookup(exp)[0] if exp is not None else None
                if record is not None and record.seconds.get("defense") is not None:
                    runs.setdefault(str(cell.labels.get("defense", cell.defense)), {})[record.key] = record
        rows = []
        for defense, records in runs.items():
            secs = [float(r.seconds["defense"]) for r in records.values()]
            devices = sorted({str(r.provenance.get("device_name") or r.provenance.get("device", "")) for r in
                              records.values()})
            rows.append({"defense": defense, "runs": len(secs), "mean s": float(np.mean(secs)),
                         "min s": float(np.min(secs)), "max s": float(np.max(secs)), "device": ", ".join(devices)})
        return pd.DataFrame(rows, columns=["defense", "runs", "mean s", "min s", "max s", "device"])


class RecordIndex:
    """The records of some folders, looked up by experiment (defended) or by backdoored model (undefended)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.by_key: dict[str, store.Record] = {}
        self.by_model: dict[str, store.Record] = {}
        for d in dirs:
            for rec in store.load_all(d):
                self.add(rec)

    def add(self, record: store.Record) -> None:
        self.by_key[record.key] = record
        try:
            # a record that names parameters at today's defaults is also found under the key without them
            self.by_key.setdefault(store.canonical_key(record.experiment), record)
        except ValueError:
            pass
        self.by_model.setdefault(record.provenance.get("model_key", ""), record)

    def lookup(self, exp: Experiment, *, undefended: bool = False) -> tuple[store.Record | None, str]:
        """The record of ``exp``, or (``undefended``) any record of its backdoored model, and which metrics to read."""
        if undefended:
            rec = self.by_key.get(exp.key()) or self.by_model.get(exp.model_key())
            if rec is not None and store.stale_reason(rec, exp, defense=False) is not None:
                rec = None
            return rec, "before"
        rec = self.by_key.get(exp.key())
        if rec is not None and store.stale_reason(rec, exp) is not None:
            rec = None  # made under other defaults: not this experiment any more
        return rec, "after"


def _paper_value(cell: Cell, metric: str) -> float:
    if not cell.paper:
        return np.nan
    spec = dict(cell.paper)
    table = spec.pop("table")
    attack = spec.pop("attack", cell.attack)
    defense = spec.pop("defense", cell.defense)
    try:
        value = paper.reported(attack, defense, metric, table=table, **spec)
    except KeyError:
        return np.nan
    return np.nan if value is None else value


def _why_missing(cell: Cell) -> str:
    missing = []
    if cell.attack in paper.ATTACKS and paper.registry_name(cell.attack) is None:
        missing.append(f"attack {cell.attack}")
    if cell.defense in paper.DEFENSES and paper.defense_name(cell.defense) is None:
        missing.append(f"defense {cell.defense}")
    return ", ".join(missing) or "a parameter this library's component does not have"


def _setting(config: dict[str, Any]) -> str:
    model = config["model"] + (f" (width {config['width']})" if config.get("width") else "")
    base = profile(config["profile"]).poison_rate if config["profile"] in PROFILES else None
    rate = config.get("poison_rate")
    poison = f", poison rate {rate:g}" if rate is not None and rate != base else ""
    return f"{config['profile']}: {config['dataset']}, {model}{poison}"


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return (value,) if isinstance(value, (int, float, str)) else tuple(value)


# -- the page's view of a comparison table -----------------------------------------------------------------------------
# the view's number columns (two header rows: the metric over ours and the paper's) and where they come from
_NUMBERS = {("clean acc", "ours"): "ours acc", ("clean acc", "paper"): "paper acc", ("ASR", "ours"): "ours asr",
            ("ASR", "paper"): "paper asr"}


def label_columns(df: pd.DataFrame) -> list[str]:
    """The columns of a comparison table that describe its rows (attack, defense, swept value...)."""
    return [c for c in df.columns if not c.startswith(("ours", "paper", "status"))]


def _has_ours(df: pd.DataFrame) -> pd.Series:
    return df["ours acc"].notna() | df["ours asr"].notna()


def _has_paper(df: pd.DataFrame) -> pd.Series:
    return df["paper acc"].notna() | df["paper asr"].notna()


def _number(value: Any, std: Any = None) -> str:
    if value is None or pd.isna(value):
        return "—"
    return f"{value:.2f}" if std is None or pd.isna(std) else f"{value:.2f} ± {std:.2f}"


def _words(setting: str) -> str:
    """``"cpu: cifar10-jpeg, resnet-mini"`` as ``"cpu — cifar10-jpeg, resnet-mini"``."""
    head, _, rest = setting.partition(": ")
    return f"{head} — {rest}" if rest else setting


def _ours_setting(df: pd.DataFrame, section: Section | None) -> str | None:
    """The setting ours are said to be measured at: the section's profile, else the most common among the rows."""
    if section is not None:
        return section.setting()
    measured = df.loc[_has_ours(df), "ours: measured at"]
    return measured.mode().iloc[0] if len(measured) else None


def caption(df: pd.DataFrame, *, title: str = "", section: Section | None = None) -> str:
    """The setting of a comparison table, said once: where ours were measured (the section's profile, or the most
    common setting among the rows) and where the paper's were."""
    ours = _ours_setting(df, section)
    seeds = f", seeds {', '.join(map(str, section.seeds))}" if section is not None else ""
    parts = [f"{title}." if title else "", "Clean accuracy and ASR in percent.",
             f"Ours: {_words(ours)}{seeds}." if ours else "Ours: no result yet."]
    papers = sorted(set(df.loc[_has_paper(df), "paper: measured at"]) - {""})
    if papers:
        parts.append("Paper: " + "; ".join(p.removeprefix("paper: ") for p in papers) + ".")
    else:
        parts.append("The paper prints no numbers for these cells.")
    return " ".join(p for p in parts if p)


def model_notes(df: pd.DataFrame, label_cols: list[str]) -> list[str]:
    """Per row of a comparison table, what to say about the undefended model its defense ran on (the columns
    ``ours model acc`` and ``ours model asr``, percent): for a defended row whose model's ASR is under
    :data:`PLANTED_ASR`, its numbers (a low ASR after a defense says little where the attack did not plant); for
    one whose clean accuracy is more than :data:`PLANTED_ACC_GAP` points under the table's best undefended model,
    its numbers and that gap (a broken model, not a backdoored one); else,
    where the table has a no-defense row with the same other labels whose numbers differ, that the defense ran on
    another training of the same configuration (a model trained again need not be the same model). Empty
    otherwise."""
    defended = df["defense"] != "No Defense" if "defense" in df else pd.Series(True, index=df.index)
    others = [c for c in label_cols if c != "defense"]
    undefended: dict[tuple, tuple[float, float]] = {}
    if "defense" in df:
        for _, row in df[~defended].iterrows():
            if pd.notna(row["ours acc"]) and pd.notna(row["ours asr"]):
                undefended[tuple(str(row[c]) for c in others)] = (row["ours acc"], row["ours asr"])
    best = _best_undefended_acc(df)
    notes = []
    for i, row in df.iterrows():
        acc, asr = row.get("ours model acc", np.nan), row.get("ours model asr", np.nan)
        if not defended[i] or pd.isna(acc) or pd.isna(asr):
            notes.append("")
            continue
        model = f"{acc:.2f} / {asr:.2f}"
        base = undefended.get(tuple(str(row[c]) for c in others))
        if asr < PLANTED_ASR:
            notes.append(f"undefended model {model} (ASR under {PLANTED_ASR:g}%)")
        elif _broken(acc, best):
            notes.append(f"undefended model {model} (clean accuracy {best - acc:.2f} points under the best "
                         f"undefended model here: broken, not backdoored)")
        elif base is not None and max(abs(acc - base[0]), abs(asr - base[1])) > 0.005:
            notes.append(f"another training of this configuration: {model} undefended")
        else:
            notes.append("")
    return notes


def _note(row: pd.Series, base: str | None) -> str:
    """What a shown row says beyond its numbers: a setting other than the caption's, seeds that are missing, the
    undefended model where it matters (:func:`model_notes`)."""
    notes = []
    measured = row["ours: measured at"]
    if measured and measured != base:
        notes.append(measured.removeprefix(base).lstrip(", ") if base and measured.startswith(base) else measured)
    if isinstance(row.get("ours model"), str) and row["ours model"]:
        notes.append(row["ours model"])
    if str(row["status"]).startswith("partly"):
        notes.append(str(row["status"]).removeprefix("partly: "))
    return "; ".join(notes)


def table_view(df: pd.DataFrame, *, title: str = "", section: Section | None = None) -> pd.io.formats.style.Styler:
    """The comparison table of :meth:`Section.compare` as a page shows it: the row labels, then ours beside the
    paper's under clean accuracy and under ASR (two header rows; two decimals, mean ± std where several seeds have
    records, a dash where a number is missing), with the setting said once in the caption. Rows with no number at
    all (neither ours nor the paper's) are left out: :func:`missing_line` counts them. A ``note`` column appears
    only where a row has something to say (a setting other than the caption's, seeds without a record); the paper's
    columns only where the paper prints a number. ``df`` itself is not changed."""
    base = _ours_setting(df, section)
    shown = df[_has_ours(df) | _has_paper(df)]
    columns: dict[tuple[str, str], list[Any]] = {("", c): list(shown[c]) for c in label_columns(df)}
    for name, col in _NUMBERS.items():
        if col.startswith("paper") and not _has_paper(df).any():
            continue
        std = shown[f"{col} std"] if f"{col} std" in shown else pd.Series(np.nan, index=shown.index)
        columns[name] = [_number(v, s) for v, s in zip(shown[col], std)]
    notes = [_note(row, base) if has else "" for (_, row), has in zip(shown.iterrows(), _has_ours(shown))]
    if any(notes):
        columns[("", "note")] = notes
    view = pd.DataFrame(columns, columns=pd.MultiIndex.from_tuples(list(columns)))
    numeric = [c for c in view.columns if c in _NUMBERS]
    # an id from the content: a rebuilt page's HTML changes only where its table does
    uuid = "t" + hashlib.sha1((title + view.to_csv()).encode()).hexdigest()[:10]
    # numbers never wrap and line up on the right; labels and notes wrap, so the table fits the page's column
    spaced = {c: [{"selector": "", "props": "padding-left: 0.6em;"}] for c in view.columns if c == ("", "note")}
    spaced |= {c: [{"selector": "", "props": "text-align: right; white-space: nowrap; padding-left: 0.6em;"}]
               for c in numeric}
    return (view.style.hide(axis="index").set_caption(caption(df, title=title, section=section)).set_uuid(uuid)
            .set_table_styles([{"selector": "caption", "props": "caption-side: top; text-align: left;"},
                               {"selector": "th.level0", "props": "text-align: center;"}])
            .set_table_styles(spaced, overwrite=False))


def _describe(rows: pd.DataFrame, cols: list[str]) -> str:
    """The label values of ``rows`` in few words: ``"attack A, B × clean data 1%, 10%"`` where the rows are every
    combination of the values, else grouped by the first column (values with the same rest share one entry)."""
    if not cols:
        return ""
    values = {c: list(dict.fromkeys(str(v) for v in rows[c])) for c in cols}
    if len(rows[cols].astype(str).drop_duplicates()) == int(np.prod([len(v) for v in values.values()])):
        return " × ".join(f"{c} {', '.join(values[c])}" for c in cols)
    groups: dict[str, list[str]] = {}
    for value, sub in rows.groupby(rows[cols[0]].astype(str), sort=False):
        groups.setdefault(_describe(sub, cols[1:]), []).append(value)
    return "; ".join(f"{cols[0]} {', '.join(vs)}" + (f" × ({d})" if ";" in d else f" × {d}" if d else "")
                     for d, vs in groups.items())


def _components(reasons: list[str]) -> str:
    """Reasons of the not-implemented cells, e.g. ``"attack IA"``, ``"attack DFST"``, as ``"attacks IA, DFST"``."""
    kinds: dict[str, list[str]] = {}
    other = []
    for reason in dict.fromkeys(r.removesuffix(" is not implemented") for r in reasons):
        kind, _, name = reason.partition(" ")
        if kind in ("attack", "defense", "model") and name and " " not in name:
            kinds.setdefault(kind, []).append(name)
        else:
            other.append(reason)
    named = [f"{k}{'s' if len(v) > 1 else ''} {', '.join(v)}" for k, v in kinds.items()]
    return "; ".join(named + other)


def missing_line(df: pd.DataFrame, *, profile: str | None = None) -> str:
    """One line for the cells of a comparison table that have no number of ours, grouped by why (not run at the
    profile; not implemented, naming the component), each group listing its cells compactly; it says how many of
    them are left out of :func:`table_view` (no number of the paper's either)."""
    missing = df[~_has_ours(df)]
    at = f"at {profile}" if profile else "at this profile"
    if missing.empty:
        return f"All {len(df)} cells are reproduced {at}."
    labels = [c for c in label_columns(df) if df[c].astype(str).nunique() > 1] or label_columns(df)[:1]
    reason = missing["status"].map(lambda s: NOT_IMPLEMENTED if s.startswith(NOT_IMPLEMENTED) else s)
    groups = []
    for status, rows in missing.groupby(reason, sort=False):
        if status == NOT_RUN:
            groups.append(f"{len(rows)} not run {at} ({_describe(rows, labels)})")
        elif status == NOT_IMPLEMENTED:
            why = [s.removeprefix(NOT_IMPLEMENTED).strip(" ()") for s in rows["status"]]
            groups.append(f"{len(rows)} not implemented ({_components(why)})")
        else:
            groups.append(f"{len(rows)} {status.removeprefix('not yet reproduced: ')} ({_describe(rows, labels)})")
    line = f"{len(missing)} of {len(df)} cells not yet reproduced: " + "; ".join(groups) + "."
    hidden = int((~_has_ours(df) & ~_has_paper(df)).sum())
    if hidden == len(df):
        line += " No cell has a number of ours or of the paper's, so there is no table."
    elif hidden:
        line += f" {hidden} of them, with no number of the paper's either, are left out of the table."
    return line


def show(df: pd.DataFrame, *, title: str = "", section: Section | None = None) -> None:
    """Display a comparison table on the page: :func:`table_view` (when any row has a number) and the
    :func:`missing_line` under it."""
    from IPython.display import Markdown, display

    view = table_view(df, title=title, section=section)
    if len(view.data):
        display(view)
    display(Markdown(missing_line(df, profile=section.profile if section is not None else None)))


def sample_images(section: Section, k: int = 4, data_root: str | None = None) -> tuple[torch.Tensor, str]:
    """``k`` test images (float, [0, 1]) of the section's data set, one per class from class 1 on (class 0 is the
    default target), for showing triggers; falls back to the offline CIFAR-10 copy, then to synthetic data, when
    the profile's data set is not on this machine. Returns the images and the data set's name."""
    from .. import data

    wanted = profile(section.profile).dataset
    for name in dict.fromkeys([wanted, "cifar10-jpeg", "synthetic"]):
        try:
            ds = data.load(name, data_root or section.data_root)
        except (FileNotFoundError, RuntimeError, OSError):
            continue
        idx = [int((ds.y_test == c).nonzero()[0]) for c in range(1, 1 + k)]
        return data.to_float(ds.x_test[idx]), name
    raise FileNotFoundError("no data set is available for the trigger images")


def summary(df: pd.DataFrame, *, what: str) -> str:
    """A short, factual finding for a comparison table: how many rows are reproduced and how far ours is from the
    paper's numbers where both exist (different settings: a gap is expected, the direction is what matters)."""
    done = df[df["status"] == REPRODUCED]
    lines = [f"{len(done)} of {len(df)} rows ({what}) have our numbers."]
    both = done.dropna(subset=["paper acc", "paper asr"])
    if len(both):
        d_acc = (both["ours acc"] - both["paper acc"]).mean()
        d_asr = (both["ours asr"] - both["paper asr"]).mean()
        settings = ", ".join(sorted(set(both["ours: measured at"])))
        lines.append(f"Where both exist ({len(both)} rows), ours is on average {d_acc:+.2f} points of clean accuracy "
                     f"and {d_asr:+.2f} points of ASR from the paper's; ours were measured at {settings}, the "
                     f"paper's on CIFAR-10 with ResNet-18, so absolute accuracy is not comparable.")
    if len(done) < len(df):
        lines.append(f"{len(df) - len(done)} rows are not yet reproduced (counted under each table).")
    return " ".join(lines)


def lowest_asr_at_comparable_accuracy(df: pd.DataFrame, *, group: str = "attack", reference: str = "UNIT",
                                      within: float = 2.0) -> pd.DataFrame:
    """The paper's claim for Table 3, checked on our numbers: per ``group`` (attack), does ``reference`` have the
    lowest ASR among the defenses whose clean accuracy is within ``within`` points of the most accurate baseline's?

    One row per group: the most accurate baseline, the baselines comparable to it, the one of them with the lowest
    ASR, ``reference``'s accuracy and ASR, and the verdict (``yes``, ``no``, or ``incomplete`` where ``reference`` or
    every baseline lacks our number). ``No Defense`` rows are not defenses and are left out."""
    if within < 0:
        raise ValueError(f"within must be >= 0 points, got {within!r}")
    rows = []
    for key, g in df.groupby(group, sort=False):
        g = g[g["defense"] != "No Defense"].dropna(subset=["ours acc", "ours asr"])
        ref, base = g[g["defense"] == reference], g[g["defense"] != reference]
        r_acc = float(ref["ours acc"].iloc[0]) if len(ref) else np.nan
        r_asr = float(ref["ours asr"].iloc[0]) if len(ref) else np.nan
        row: dict[str, Any] = {group: key, "baselines with ours": len(base), f"{reference} acc": r_acc,
                               f"{reference} asr": r_asr}
        if ref.empty or base.empty:
            rows.append({**row, "most accurate baseline": "", "lowest ASR among comparable": "",
                         f"{reference} comparable": None, "verdict": "incomplete"})
            continue
        best = base.loc[base["ours acc"].idxmax()]
        comparable = base[base["ours acc"] >= best["ours acc"] - within]
        low = comparable.loc[comparable["ours asr"].idxmin()]
        comparable_ref = r_acc >= best["ours acc"] - within
        rows.append({**row, "most accurate baseline": f"{best['defense']} ({best['ours acc']:.2f})",
                     "lowest ASR among comparable": f"{low['defense']} ({low['ours asr']:.2f})",
                     f"{reference} comparable": bool(comparable_ref),
                     "verdict": "yes" if comparable_ref and r_asr <= low["ours asr"] else "no"})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Claim:
    """One sentence of the appendix's prose that carries a number (``id`` in ``paper.text_numbers``), as a check on
    one comparison table (``table``, e.g. ``"Table 4"``): the rows of ``defense`` (those whose columns match
    ``where``), their ``measure`` (``"asr"``, ``"acc"``, a further record metric such as ``"asr_non_victim"``, or
    ``"acc cost"``: No Defense's clean accuracy minus the row's, rows paired on the ``pair_on`` columns), combined by
    ``how`` (``max``, ``min`` or ``mean``), against the sentence's number (or ``bound`` where it gives none) in the
    ``direction`` ``"not above"`` (the appendix's "less than", "below", "only": its own tables reach the number, e.g.
    "less than 1.07%" and Table 4's 1.07), ``"at most"`` or ``"at least"`` (give or take a tolerance: "nearly",
    "about", "approximately", "around", "from", "average")."""

    id: str
    table: str
    defense: str
    measure: str
    how: str
    direction: str
    where: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    pair_on: tuple[str, ...] = ()
    bound: float | None = None


# A.4. Table 6's "significantly reduced" has no number in the text: held to 10%, above the paper's own worst
# noisy-trigger ASR at those levels (6.84% at 0.05).
A4_CLAIMS: tuple[Claim, ...] = (
    Claim("t23", "Table 4", "UNIT", "asr", "max", "not above", pair_on=("alpha", "loss")),
    Claim("t26", "Table 5", "No Defense", "asr", "min", "at least"),
    Claim("t25", "Table 5", "No Defense", "asr_non_victim", "max", "at most"),
    Claim("t28", "Table 5", "UNIT", "asr", "max", "not above", pair_on=("victim-target",)),
    Claim("t27", "Table 5", "UNIT", "acc cost", "mean", "at most", pair_on=("victim-target",)),
    Claim("t33", "Table 6", "No Defense", "asr", "min", "at least"),
    Claim("t34", "Table 6", "UNIT", "asr", "max", "at most", pair_on=("noise level",)),
    Claim("t29", "Table 6", "No Defense", "asr_noisy", "max", "at most",
          where=(("noise level", (0.05, 0.1, 0.5, 1.0)),), bound=10.0),
)
# A.5, where the text gives a number about our rows (Fig. 14's minutes and time saving are the seconds table's).
A5_CLAIMS: tuple[Claim, ...] = (
    Claim("t37", "Table 7", "UNIT", "asr", "max", "not above", pair_on=("activation",)),
    Claim("t38", "Table 7", "UNIT", "acc cost", "max", "not above", pair_on=("activation",)),
    Claim("t44", "Table 8", "UNIT", "asr", "mean", "at most", where=(("clean data", ("0.1%",)),), pair_on=("attack",)),
    Claim("t45", "Table 8", "UNIT", "acc cost", "mean", "at most", where=(("clean data", ("0.1%",)),),
          pair_on=("attack",)),
    Claim("t52", "Fig. 12", "UNIT", "asr", "max", "at most", pair_on=("poison rate",)),
    Claim("t53", "Fig. 12", "UNIT", "acc cost", "max", "not above", pair_on=("poison rate",)),
    Claim("t64", "Fig. 13", "UNIT", "asr", "max", "not above", pair_on=("target",)),
    Claim("t65", "Fig. 14", "UNIT", "asr", "max", "not above", where=(("model", ("resnet101",)),),
          pair_on=("model",)),
    Claim("t66", "Fig. 14", "UNIT", "acc cost", "max", "not above", where=(("model", ("resnet101",)),),
          pair_on=("model",)),
)
CLAIM_TOLERANCE = 1.0
_DIRECTIONS = ("not above", "at most", "at least")


def _covered(claim: Claim, df: pd.DataFrame) -> pd.DataFrame:
    """The rows ``claim`` speaks of: its defense's, those matching ``where`` (their No Defense pairs may sit
    elsewhere in ``df``)."""
    rows = df[df["defense"] == claim.defense]
    for column, values in claim.where:
        wanted = {str(v) for v in values}
        rows = rows[rows[column].map(lambda v, wanted=wanted: str(v) in wanted
                                     or (isinstance(v, float) and f"{v:g}" in wanted))]
    return rows


# A backdoor counts as planted where the undefended model's ASR reaches this (percent): a defense's low ASR on a
# model the attack never backdoored says nothing about the defense.
PLANTED_ASR = 90.0
# ... and where the undefended model's clean accuracy is no more than this many points under the best undefended
# model of its table: a model far below it is broken, not backdoored (at the extreme it sends most clean images to
# the target as well, so its ASR is high for that reason alone), and a defense's numbers on it say little.
PLANTED_ACC_GAP = 10.0


def _best_undefended_acc(df: pd.DataFrame) -> float:
    """The clean accuracy (percent) of the best undefended model of a comparison table: its No Defense rows, or
    where it has none, the models its rows' defenses ran on; NaN if none is known."""
    has = "defense" in df and "ours acc" in df
    accs = df.loc[df["defense"] == "No Defense", "ours acc"] if has else pd.Series(dtype=float)
    if not accs.notna().any() and "ours model acc" in df:
        accs = df["ours model acc"]
    accs = pd.to_numeric(accs, errors="coerce")
    return float(accs.max()) if accs.notna().any() else float("nan")


def _broken(acc: float, best: float) -> bool:
    """Whether an undefended model of ``acc`` clean accuracy is broken rather than backdoored (see
    :data:`PLANTED_ACC_GAP`); unknown numbers are not."""
    return bool(pd.notna(acc) and pd.notna(best) and acc < best - PLANTED_ACC_GAP)


def _planted(claim: Claim, df: pd.DataFrame) -> tuple[int, int] | None:
    """For a claim about a defense's ASR with ``pair_on``: how many of its rows with our numbers sit on a backdoored
    model (undefended ASR at least :data:`PLANTED_ASR`, clean accuracy not broken: :data:`PLANTED_ACC_GAP`), and on
    how many the undefended ASR is known; None for other claims. Each row is judged by the model its own defense ran
    on (``ours model asr`` and ``ours model acc``, from :meth:`Section.compare`) where the table has it, since a
    retrained model need not be the one the No Defense row measured; otherwise, or where that is missing, by the No
    Defense row that ``pair_on`` pairs it with."""
    if claim.defense == "No Defense" or not claim.pair_on or not claim.measure.startswith("asr"):
        return None
    key = list(claim.pair_on)
    rows = _covered(claim, df)
    rows = rows[rows[f"ours {claim.measure}"].notna()] if f"ours {claim.measure}" in rows else rows.iloc[:0]
    undefended = df[df["defense"] == "No Defense"].set_index(key)

    def model(column: str) -> pd.Series:
        if f"ours {column}" not in undefended:
            paired = pd.Series(np.nan, index=rows.index)
        else:
            paired = pd.Series(undefended[f"ours {column}"].reindex(rows.set_index(key).index)
                               .to_numpy(dtype=float), index=rows.index)
        own = f"ours model {column}"
        return rows[own].astype(float).fillna(paired) if own in rows else paired

    asr, acc = model("asr"), model("acc")
    best = _best_undefended_acc(df)
    broken = pd.Series([_broken(a, best) for a in acc], index=rows.index, dtype=bool)
    return int(((asr >= PLANTED_ASR) & ~broken).sum()), int(asr.notna().sum())


def _claim_values(claim: Claim, df: pd.DataFrame, side: str) -> pd.Series:
    """The numbers ``claim`` combines, ``side`` ``"ours"`` or ``"paper"``: one per row it covers (NaN where none)."""
    rows = _covered(claim, df)
    if claim.measure == "acc cost" and f"{side} acc" not in df:
        return pd.Series(np.nan, index=range(len(rows)))
    if claim.measure == "acc cost":
        key = list(claim.pair_on)
        base = df[df["defense"] == "No Defense"].set_index(key)[f"{side} acc"] if key else pd.Series(dtype=float)
        if not key or base.index.has_duplicates:
            raise ValueError(f"claim {claim.id}: pair_on must name the columns that pair each {claim.defense} row "
                             f"with one No Defense row, got {claim.pair_on!r}")
        return (base.reindex(rows.set_index(key).index) - rows.set_index(key)[f"{side} acc"]).reset_index(drop=True)
    column = f"{side} {claim.measure}"
    return rows[column].reset_index(drop=True) if column in rows else pd.Series(np.nan, index=range(len(rows)))


def _verdict(claim: Claim, values: pd.Series, bound: float, tolerance: float) -> tuple[float, str]:
    have = values.dropna()
    value = float(getattr(have, claim.how)()) if len(have) else np.nan
    if not len(values) or len(have) < len(values):
        return value, "incomplete"
    if claim.direction == "not above":
        ok = value <= bound
    elif claim.direction == "at most":
        ok = value <= bound + tolerance
    else:
        ok = value >= bound - tolerance
    return value, "yes" if ok else "no"


def check_claims(claims: tuple[Claim, ...], tables: dict[str, pd.DataFrame], *,
                 tolerance: float = CLAIM_TOLERANCE) -> pd.DataFrame:
    """Each of ``claims`` checked on the comparison tables (:meth:`Section.compare`) in ``tables``, keyed by the
    claims' ``table``: the paper's sentence, its number, ours (percent, combined over the rows the claim covers),
    how many of those rows have our number, whether it holds ("incomplete" while a row it covers has none; a note
    where some of the rows sit on a model whose undefended ASR is under :data:`PLANTED_ASR`, so that a low ASR there
    says nothing about the defense, or whose clean accuracy is more than :data:`PLANTED_ACC_GAP` points under the
    table's best undefended model, a broken model rather than a backdoored one), and whether it holds on the paper's
    own numbers in the same table where the paper prints them."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 points, got {tolerance!r}")
    numbers = paper.text_numbers().set_index("id")
    rows = []
    for claim in claims:
        if claim.table not in tables:
            raise ValueError(f"claim {claim.id} reads {claim.table!r}; tables given: {', '.join(tables) or 'none'}")
        if claim.direction not in _DIRECTIONS or claim.how not in ("max", "min", "mean"):
            raise ValueError(f"claim {claim.id}: direction must be one of {', '.join(_DIRECTIONS)} and how one of "
                             f"max, min, mean; got {claim.direction!r}, {claim.how!r}")
        text = numbers.loc[claim.id]
        bound = float(text.value) if claim.bound is None else claim.bound
        values = _claim_values(claim, tables[claim.table], "ours")
        ours, holds = _verdict(claim, values, bound, tolerance)
        planted = _planted(claim, tables[claim.table])
        if planted is not None and holds in ("yes", "no") and planted[0] < planted[1]:
            holds += f" ({planted[1] - planted[0]} of {planted[1]} rows on a model the attack did not backdoor)"
        paper_values = _claim_values(claim, tables[claim.table], "paper")
        paper_holds = _verdict(claim, paper_values, bound, tolerance)[1] if paper_values.notna().any() else "—"
        rows.append({"item": claim.table, "claim": text.quote,
                     "measures": f"{claim.how} of {claim.measure} ({claim.defense})", "paper": bound,
                     "test": claim.direction if claim.direction == "not above" else
                     f"{claim.direction} (±{tolerance:g})", "ours": ours,
                     "rows": f"{int(values.notna().sum())} of {len(values)}", "holds": holds,
                     "on the paper's table": paper_holds})
    return pd.DataFrame(rows)


def a4_claims(table4: pd.DataFrame, table5: pd.DataFrame, table6: pd.DataFrame,
              tolerance: float = CLAIM_TOLERANCE) -> pd.DataFrame:
    """The appendix's claims for A.4 (:data:`A4_CLAIMS`) checked on our Tables 4, 5 and 6 (:meth:`Section.compare`;
    5 with ``extra={"asr_non_victim": "nonvictim_asr_after"}``, 6 with ``extra={"asr_noisy": "noisy_asr_after"}``),
    as :func:`check_claims`."""
    return check_claims(A4_CLAIMS, {"Table 4": table4, "Table 5": table5, "Table 6": table6}, tolerance=tolerance)


def timings(directory: str | Path | None = None) -> pd.DataFrame:
    """The measured seconds of every record in ``directory`` (default: the committed ``results/``): training, the
    defense, and where it ran."""
    rows = []
    for rec in store.load_all(directory or store.RESULTS_DIR):
        c, s, p = rec.config, rec.seconds, rec.provenance
        params = ", ".join(f"{k}={v}" for k, v in sorted(c["defense_params"].items()))
        rows.append({"profile": c["profile"], "attack": c["attack"],
                     "defense": c["defense"] + (f" ({params})" if params else ""),
                     "train s": None if p.get("model_from_cache") else s.get("train"),
                     "defense s": s.get("defense"), "device": p.get("device_name", p.get("device", "")),
                     "record": rec.filename()})
    return pd.DataFrame(rows, columns=["profile", "attack", "defense", "train s", "defense s", "device", "record"])


def sensitivity_view(grid: pd.DataFrame, baseline: str) -> tuple[str, str, dict[str, float] | None, pd.DataFrame] | None:
    """What the A.3 grid explorer needs from a comparison table of :func:`unitlib.book.appendix.sensitivity`: the two
    parameters (bars, slider), UNIT's accuracy and ASR (the dashed lines) and the reproduced grid rows; None when no
    grid point is reproduced."""
    p1, p2 = [c for c in grid.columns if c not in ("defense",) and not c.startswith(("ours", "paper", "status"))][:2]
    done = grid[grid["status"] == REPRODUCED]
    rows = done[done["defense"] == baseline]
    if rows.empty:
        return None
    unit_rows = done[done["defense"] == "UNIT"]
    unit = None if unit_rows.empty else {"acc": float(unit_rows["ours acc"].iloc[0]),
                                         "asr": float(unit_rows["ours asr"].iloc[0])}
    return p1, p2, unit, rows.reset_index(drop=True)


def grid_spread(grids: dict[str, pd.DataFrame], reference: str = "UNIT") -> pd.DataFrame:
    """A.3's question in one table: how far each baseline's clean accuracy and ASR swing over its parameter grid
    (max - min over the grid points with our numbers), beside ``reference``'s accuracy and ASR on the same model.
    ``grids`` maps a baseline's name to its comparison table (:func:`unitlib.book.appendix.sensitivity`,
    :func:`~unitlib.book.appendix.figure11`)."""
    rows = []
    for baseline, grid in grids.items():
        points = grid[grid["defense"] != reference]
        done = points[points["status"] == REPRODUCED]
        ref = grid[(grid["defense"] == reference) & (grid["status"] == REPRODUCED)]
        row: dict[str, Any] = {"baseline": baseline, "grid points": f"{len(done)} of {len(points)}"}
        for metric in ("acc", "asr"):
            values = done[f"ours {metric}"]
            row[f"{metric} min"] = float(values.min()) if len(values) else np.nan
            row[f"{metric} max"] = float(values.max()) if len(values) else np.nan
            row[f"{metric} spread"] = float(values.max() - values.min()) if len(values) else np.nan
        row[f"{reference} acc"] = float(ref["ours acc"].iloc[0]) if len(ref) else np.nan
        row[f"{reference} asr"] = float(ref["ours asr"].iloc[0]) if len(ref) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _changes(config: dict[str, Any]) -> str:
    """What a record's experiment sets differently from its profile (besides the attack and the defense)."""
    try:
        base = profile(config["profile"], attack=config["attack"], defense=config["defense"]).to_dict()
    except (KeyError, ValueError):
        return "?"
    out = []
    for key, value in config.items():
        if key in ("attack", "defense", "profile") or base.get(key) == value:
            continue
        if isinstance(value, dict):
            out += [f"{key.removesuffix('_params')}.{k}={v}" for k, v in sorted(value.items())
                    if base.get(key, {}).get(k) != v]
        else:
            out.append(f"{key}={value}")
    return ", ".join(out)


def records_table(directory: str | Path | None = None, profile_name: str | None = None) -> pd.DataFrame:
    """Every record in ``directory`` (default: the committed ``results/``), one row each: the attack, the defense,
    what the experiment changed from its profile, clean accuracy and ASR before and after the defense (percent),
    the measured seconds and the device. ``profile_name`` keeps one profile's records."""
    if profile_name is not None and profile_name not in PROFILES:
        raise ValueError(f"unknown profile {profile_name!r}; valid choices: {', '.join(PROFILES)}")
    rows = []
    for rec in store.load_all(directory or store.RESULTS_DIR):
        c, s, p, m = rec.config, rec.seconds, rec.provenance, rec.metrics
        if profile_name is not None and c["profile"] != profile_name:
            continue
        rows.append({"profile": c["profile"], "attack": c["attack"], "defense": c["defense"],
                     "changes": _changes(c),
                     "acc before": 100 * m["before"]["clean_acc"], "asr before": 100 * m["before"]["asr"],
                     "acc after": 100 * m["after"]["clean_acc"], "asr after": 100 * m["after"]["asr"],
                     "train s": None if p.get("model_from_cache") else s.get("train"),
                     "defense s": s.get("defense"), "device": p.get("device_name", p.get("device", "")),
                     "record": rec.filename()})
    columns = ["profile", "attack", "defense", "changes", "acc before", "asr before", "acc after", "asr after",
               "train s", "defense s", "device", "record"]
    return pd.DataFrame(rows, columns=columns).sort_values(["profile", "attack", "defense"], kind="stable",
                                                           ignore_index=True)


def markdown(df: pd.DataFrame, digits: int = 2) -> str:
    """``df`` as a GitHub Markdown table (floats to ``digits`` places, missing values blank)."""
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def tightening_records(profile_name: str = "cpu", attack: str = "Blend", seed: int = 0,
                       directory: str | Path | None = None) -> dict[str, store.Record]:
    """The records of UNIT with its defaults and with the official code's schedule on one backdoored model (the
    book's experiments for ``attack`` at ``profile_name``), by label; a run without a record is left out."""
    from ..defenses.unit import OFFICIAL_SCHEDULE

    sec = Section(name="method", profile=profile_name)
    cells = {"UNIT (defaults)": Cell({}, attack, "UNIT"),
             "UNIT (official schedule)": Cell({}, attack, "UNIT", defense_params=dict(OFFICIAL_SCHEDULE))}
    found = {}
    for label, cell in cells.items():
        exp = sec.experiment(cell, seed)
        record = store.find(exp, directory) if exp is not None else None
        if record is not None:
            found[label] = record
    return found


UNIT_ATTACKS = ["BadNets", "Trojan", "CL", "Reflection", "SIG", "Blend", "WaNet", "Instagram", "Adap-Blend",
                "NARCISSUS"]


def unit_table(profile_name: str = "cpu", seeds: tuple[int, ...] = (0, 1, 2),
               directory: str | Path | None = None) -> pd.DataFrame:
    """UNIT on each implemented attack of the appendix at ``profile_name`` (the book's experiments), one row per
    attack and seed with a record: clean accuracy / ASR without defense, with UNIT's defaults and with the official
    code's schedule (percent; where the two ran on different trainings of the same backdoored model, the official
    cell names its own model's numbers), and for each UNIT run the step whose bounds were kept, the steps run, why
    tightening ended, the kept bounds' validation accuracy against the budget's threshold, and the defense's
    seconds."""
    from ..defenses.unit import OFFICIAL_SCHEDULE

    sec = Section(name="unit", profile=profile_name)
    index = RecordIndex([Path(directory or store.RESULTS_DIR)])
    runs = {"UNIT": {}, "official": dict(OFFICIAL_SCHEDULE)}
    rows = []
    for attack in UNIT_ATTACKS:
        for seed in seeds:
            row: dict[str, Any] = {"attack": attack, "seed": seed}
            found = False
            for label, params in runs.items():
                exp = sec.experiment(Cell({}, attack, "UNIT", defense_params=params), seed)
                rec = index.lookup(exp)[0] if exp is not None else None  # stale records are not shown
                if rec is None:
                    continue
                found = True
                r, before, after = rec.report, rec.metrics["before"], rec.metrics["after"]
                row["poison rate"] = f"{rec.config['poison_rate']:g}"
                undefended = f"{100 * before['clean_acc']:.2f} / {100 * before['asr']:.2f}"
                row.setdefault("no defense", undefended)
                row[label] = f"{100 * after['clean_acc']:.2f} / {100 * after['asr']:.2f}"
                if undefended != row["no defense"]:
                    # a model of the same configuration trained again (another run, other float sums): say so
                    row[label] += f" (model at {undefended})"
                row[f"{label} kept step"] = f"{r['best_step']} of {r.get('steps_run', len(r['history']))}"
                row[f"{label} stop"] = r.get("stop_reason", "")
                row[f"{label} val / threshold"] = f"{100 * r['final_val_acc']:.1f} / {100 * r['threshold']:.1f}"
                row[f"{label} s"] = f"{rec.seconds['defense']:.0f}"
            if found:
                rows.append(row)
    columns = ["attack", "seed", "poison rate", "no defense"] + [
        f"{label}{suffix}" for label in runs for suffix in ("", " kept step", " stop", " val / threshold", " s")]
    return pd.DataFrame(rows, columns=columns)
