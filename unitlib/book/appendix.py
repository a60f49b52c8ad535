"""The appendix's tables and figures as lists of :class:`~unitlib.book.report.Cell` s, one builder per item, and the
book's status table (which item is reproduced at which profile, partly, or not yet).

Each builder takes the section's parameters (which attacks, budgets, how many swept values) and returns the cells of
that item in the appendix's order; the paper's numbers are attached where the appendix reports them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from .. import defenses, models
from ..config import PROFILES
from ..defenses.unit import OFFICIAL_SCHEDULE
from . import paper
from .report import REPRODUCED, Cell, RecordIndex, Section

# The 14 attacks of A.1 in Table 8's order, then the two that A.2 adds (NARCISSUS, COMBAT): the book's A.1 pages,
# Table 8 and the A.1 baseline table cover all 16 (the appendix's own tables print numbers for the 14 only).
A1_ATTACKS = ["BadNets", "Trojan", "CL", "Dynamic", "IA", "Reflection", "SIG", "Blend", "WaNet", "ISSBA", "LIRA",
              "Instagram", "DFST", "Adap-Blend", "NARCISSUS", "COMBAT"]
A1_DEFENSES = ["No Defense", "FT", "FP", "NAD", "ANP", "NC", "I-BAU", "SEAM", "UNIT"]
OFFICIAL_UNIT = "UNIT (official schedule)"
T3_ATTACKS = ["BadNets", "Instagram", "Reflection", "NARCISSUS", "COMBAT"]
T3_DEFENSES = ["No Defense", "CLP", "FST", "RNP", "FT-SAM", "Super-FT", "UNIT"]
ACTIVATIONS = {"ReLU": "relu", "LeakyReLU": "leakyrelu", "SELU": "selu", "ELU": "elu", "TanhShrink": "tanhshrink",
               "Softplus": "softplus", "Sigmoid": "sigmoid", "Tanh": "tanh"}
CLEAN_FRACTIONS = [5, 10, 1, 0.1]  # percent; the default first, so a short sweep keeps it
DESIGNS = {"Current Setting": {}, "Act. Rejection": {"mode": "reject"}, "First Two Layers": {"layers": "first:2"},
           "Last Two Layers": {"layers": "last:2"}}
DEGRADATIONS = [2, 0.01, 0.1, 5, 10]  # percent (Table 11), the default first
STEPS_LR = [(10, 0.01), (10, 0.001), (50, 0.01), (50, 0.001)]  # Table 12
POISON_RATES = [10, 1, 5, 25, 50]  # percent (Fig. 12), the default first
LOW_POISON = [1, 0.1]  # percent (Table 9)
TARGETS = [1, 3, 5, 7, 9]  # Fig. 13
MODEL_SCALES = ["resnet18", "resnet34", "resnet50", "resnet101"]  # Fig. 14
# A.3: the two key parameters of each baseline (the figure's axes), as the defense's own parameter names; the values
# are ours (the figures print none).
SENSITIVITY = {
    "FP": {"figure": 8, "params": {"ratio": [0.1, 0.2, 0.4, 0.6], "lr": [0.001, 0.01, 0.05]}},
    "NAD": {"figure": 9, "params": {"beta": [500.0, 2000.0, 5000.0], "lr": [0.001, 0.01, 0.05]}},
    "ANP": {"figure": 10, "params": {"eps": [0.2, 0.4, 0.6], "alpha": [0.2, 0.5, 0.8]}},
}


def _pct(x: float) -> str:
    return f"{x:g}%"


# -- tables ----------------------------------------------------------------------------------------------------------
def no_defense(sec: Section) -> list[Cell]:
    """A.1 / Fig. 7's companion: each attack's backdoored model without defense (Table 8's first columns)."""
    return [Cell({"attack": a}, a, "No Defense", paper={"table": 8}) for a in sec.pick_attacks(A1_ATTACKS)]


def baselines(sec: Section) -> list[Cell]:
    """A.1 baselines: every attack against FT, FP, NAD, ANP, NC, I-BAU, SEAM and UNIT. The appendix prints no
    numbers for these baselines (they are in the main paper); its Table 8 gives no defense and UNIT at 5%."""
    cells = []
    for a in sec.pick_attacks(A1_ATTACKS):
        for d in sec.pick_defenses(A1_DEFENSES):
            ref = {"table": 8} if d == "No Defense" else {"table": 8, "clean_fraction": 5} if d == "UNIT" else None
            cells.append(Cell({"attack": a, "defense": d}, a, d, paper=ref))
            if d == "UNIT" and sec.profile != "smoke":
                # the official code's schedule beside this library's defaults, on the same backdoored model
                cells.append(Cell({"attack": a, "defense": OFFICIAL_UNIT}, a, "UNIT",
                                  defense_params=dict(OFFICIAL_SCHEDULE), paper=ref))
    return cells


def table3(sec: Section) -> list[Cell]:
    return [Cell({"attack": a, "defense": d}, a, d, paper={"table": 3})
            for a in sec.pick_attacks(T3_ATTACKS) for d in sec.pick_defenses(T3_DEFENSES)]


# Table 4's two readings of the attack (``ActivationSuppression.objective``): the appendix's text (BadNets' poisoned
# share carries the backdoor, the suppression term is added) and its Eq. 6 as printed (every image's triggered copy is
# also trained to the target).
T4_READINGS = {"poisoned": "BadNets + term", "paired": "Eq. 6 as printed"}


def table4(sec: Section) -> list[Cell]:
    # alpha = 0 is plain BadNets (no adaptive loss), the text's reading; Eq. 6's rows start at the first alpha > 0
    cells = []
    for al in sec.sweep([0, 0.1, 1, 10, 100]):
        for objective, loss in T4_READINGS.items():
            for d in ("No Defense", "UNIT"):
                labels = {"alpha": al, "loss": loss, "defense": d}
                if al == 0 and objective == "poisoned":
                    cells.append(Cell(labels, "BadNets", d, paper={"table": 4, "alpha": al}))
                elif al != 0:
                    params = {"alpha": float(al)} | ({"objective": objective} if objective != "poisoned" else {})
                    cells.append(Cell(labels, "activation-suppression", d, changes={"attack_params": params},
                                      paper={"table": 4, "alpha": al, "attack": "BadNets"}))
    return cells


# The appendix gives no poisoning rate for its label-specific attack; 10% of the training set would be every image of
# a CIFAR-10 victim class, so half of it is poisoned.
LABEL_SPECIFIC_RATE = 0.05


def table5(sec: Section) -> list[Cell]:
    pairs = ["0-9", "8-3", "2-4", "6-5", "7-1"]
    cells = []
    for p in sec.sweep(pairs):
        victim, target = (int(v) for v in p.split("-"))
        changes = {"target": target, "poison_rate": LABEL_SPECIFIC_RATE, "attack_params": {"victim": victim}}
        for d in ("No Defense", "UNIT"):
            cells.append(Cell({"victim-target": p, "defense": d}, "label-specific", d, changes=changes,
                              paper={"table": 5, "victim_target": p, "attack": "BadNets"}))
    return cells


def table6(sec: Section) -> list[Cell]:
    return [Cell({"noise level": n, "defense": d}, "trigger-specific", d,
                 changes={"attack_params": {"noise_level": n}},
                 paper={"table": 6, "noise_level": n, "attack": "BadNets"})
            for n in sec.sweep([0.01, 0.05, 0.1, 0.5, 1]) for d in ("No Defense", "UNIT")]


def table7(sec: Section) -> list[Cell]:
    cells = []
    for name, act in sec.sweep([(n, a) for n, a in ACTIVATIONS.items() if a in models.ACTIVATIONS]):
        for d in ("No Defense", "UNIT"):
            cells.append(Cell({"activation": name, "defense": d}, "BadNets", d, changes={"activation": act},
                              paper={"table": 7, "activation": name}))
    return cells


def table8(sec: Section) -> list[Cell]:
    cells = []
    for a in sec.pick_attacks(A1_ATTACKS):
        cells.append(Cell({"attack": a, "clean data": "—", "defense": "No Defense"}, a, "No Defense",
                          paper={"table": 8}))
        for cf in sec.sweep(CLEAN_FRACTIONS):
            cells.append(Cell({"attack": a, "clean data": _pct(cf), "defense": "UNIT"}, a, "UNIT",
                              changes={"clean_fraction": cf / 100}, paper={"table": 8, "clean_fraction": cf}))
    return cells


def table9(sec: Section) -> list[Cell]:
    cells = []
    # The fourth defense's name is unreadable in the source ("?P"); ANP is the likeliest (A.3 uses FP/NAD/ANP).
    for a in sec.pick_attacks(["BadNets", "Blend", "WaNet"]):
        for pr in sec.sweep(LOW_POISON):
            for d in sec.pick_defenses(["No Defense", "FP", "NAD", "ANP", "UNIT"]):
                ref = {"table": 9, "poison_rate": pr, "defense": "?P" if d == "ANP" else d}
                cells.append(Cell({"attack": a, "poison rate": _pct(pr), "defense": "?P (ANP?)" if d == "ANP" else d},
                                  a, d, changes={"poison_rate": pr / 100}, paper=ref))
    return cells


def table10(sec: Section) -> list[Cell]:
    cells = []
    for a in sec.pick_attacks(["BadNets", "Trojan", "Reflection", "Instagram", "DFST", "Adap-Blend"]):
        cells.append(Cell({"attack": a, "design": "No Defense"}, a, "No Defense", paper={"table": 10}))
        for design in sec.sweep(list(DESIGNS)):
            cells.append(Cell({"attack": a, "design": design}, a, "UNIT", defense_params=DESIGNS[design],
                              paper={"table": 10, "design": design}))
    return cells


def table11(sec: Section) -> list[Cell]:
    cells = [Cell({"degradation": "No Defense"}, "Trojan", "No Defense", paper={"table": 11})]
    for d in sec.sweep(DEGRADATIONS):
        cells.append(Cell({"degradation": _pct(d)}, "Trojan", "UNIT", defense_params={"degradation": d / 100},
                          paper={"table": 11, "degradation": d}))
    return cells


def table12(sec: Section) -> list[Cell]:
    cells = [Cell({"steps S": "No Defense", "lr": ""}, "Blend", "No Defense", paper={"table": 12})]
    for s, lr in sec.sweep(STEPS_LR):
        cells.append(Cell({"steps S": s, "lr": lr}, "Blend", "UNIT", defense_params={"steps": s, "lr": lr},
                          paper={"table": 12, "steps": s, "lr": lr}))
    return cells


# -- figures ---------------------------------------------------------------------------------------------------------
def sensitivity(sec: Section, baseline: str) -> list[Cell]:
    """Figs. 8-10: CL defended by ``baseline`` over a grid of its two key parameters (and UNIT, the dashed lines)."""
    spec = SENSITIVITY[baseline]
    (p1, v1), (p2, v2) = spec["params"].items()
    name = paper.defense_name(baseline)
    own = defenses.parameters(name) if name else {}
    missing = None
    if name and not {p1, p2} <= set(own):
        missing = f"{baseline} in this library has no parameter {' / '.join(p for p in (p1, p2) if p not in own)}"
    cells = [Cell({"defense": "UNIT", p1: "", p2: ""}, "CL", "UNIT")]
    for a in sec.sweep(v1):
        for b in sec.sweep(v2):
            cells.append(Cell({"defense": baseline, p1: a, p2: b}, "CL", baseline, defense_params={p1: a, p2: b},
                              missing=missing))
    return cells


def figure11(sec: Section) -> list[Cell]:
    name = paper.defense_name("RNP")
    has = name is not None and "pruning_threshold" in defenses.parameters(name)
    why = None if has else "RNP with a pruning threshold is not implemented"
    cells = [Cell({"defense": "UNIT", "threshold": ""}, "Reflection", "UNIT")]
    cells += [Cell({"defense": "RNP", "threshold": t}, "Reflection", "RNP", defense_params={"pruning_threshold": t},
                   missing=why) for t in sec.sweep([0.05, 0.1, 0.2, 0.4, 0.6])]
    return cells


def figure12(sec: Section) -> list[Cell]:
    return [Cell({"poison rate": _pct(pr), "defense": d}, "BadNets", d, changes={"poison_rate": pr / 100})
            for pr in sorted(sec.sweep(POISON_RATES)) for d in ("No Defense", "UNIT")]


def figure13(sec: Section) -> list[Cell]:
    return [Cell({"target": t, "defense": d}, "BadNets", d, changes={"target": t})
            for t in sec.sweep(TARGETS) for d in ("No Defense", "UNIT")]


def figure14(sec: Section) -> list[Cell]:
    """BadNets on each ResNet depth: no defense, UNIT, and UNIT with bounds on the key layers only (the appendix's
    "each residual block": ``layers="blocks"``), at the profile's model scale (:data:`MODEL_SCALE_CHANGES`)."""
    cells = []
    for m in sec.sweep(MODEL_SCALES):
        missing = None if m in models.MODELS else f"model {m} is not implemented"
        changes = {"model": m, **model_scale_changes(sec)}
        for label, d, params in (("No Defense", "No Defense", {}), ("UNIT", "UNIT", {}),
                                 ("UNIT (key layers)", "UNIT", {"layers": "blocks"})):
            cells.append(Cell({"model": m, "defense": label}, "BadNets", d, changes=changes, defense_params=params,
                              missing=missing))
    return cells


# The scale Fig. 14's ResNets are trained at, per profile (the paper's: full width, all of CIFAR-10). On two CPU
# cores a full-width ResNet-18 trains at about 26 images/s (32 minutes an epoch), so `cpu` keeps the four depths at
# width 16 (a quarter of the channels), on all the training images for the profile's 8 epochs; `smoke` at width 8 on
# its synthetic set. The depths, and so the number of bound points UNIT works on, are the paper's. A smaller `cpu`
# scale (width 16 on a class-balanced 10,000 images, 8 epochs) did not plant: ResNet-18 reached 61.04% clean accuracy
# at 8.60% ASR. At width 16 on all images, 6 epochs (the profile's recipe before it took 8), a ResNet-18 with Blend
# reached 80.18% at 99.98% ASR in 25.5 minutes (the UNIT-fidelity issue's trial). The measured training throughputs
# at width 16 (ResNet-18 299 images/s, -34 157, -50 64, -101 52) put the four depths at about 5 hours of training on
# two cores.
MODEL_SCALE_CHANGES: dict[str, dict[str, int]] = {"smoke": {"width": 8}, "cpu": {"width": 16}}


def model_scale_changes(sec: Section) -> dict[str, int]:
    """The experiment changes that set Fig. 14's model scale at the section's profile (a copy)."""
    return dict(MODEL_SCALE_CHANGES.get(sec.profile, {}))


# -- the status table -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One table or figure of the appendix: where the book shows it and how to list its cells."""

    ref: str
    title: str
    notebook: str
    cells: Callable[[Section], list[Cell]] | None


ITEMS: list[Item] = [
    Item("Fig. 7", "Trigger examples (poisoned images and their difference)", "a1_attacks", None),
    Item("A.1", "No-defense accuracy and ASR of the 16 attacks", "a1_attacks", no_defense),
    Item("A.1", "The seven baseline defenses", "a1_baselines", baselines),
    Item("Table 3", "Latest attacks and defenses", "a2_latest_defenses", table3),
    Item("Fig. 8", "Sensitivity of FP", "a3_sensitivity", lambda s: sensitivity(s, "FP")),
    Item("Fig. 9", "Sensitivity of NAD", "a3_sensitivity", lambda s: sensitivity(s, "NAD")),
    Item("Fig. 10", "Sensitivity of ANP", "a3_sensitivity", lambda s: sensitivity(s, "ANP")),
    Item("Fig. 11", "RNP pruning thresholds against Reflection", "a3_sensitivity", figure11),
    Item("Table 4", "Adaptive attack: activation suppression", "a4_adaptive", table4),
    Item("Table 5", "Adaptive attack: label-specific backdoor", "a4_adaptive", table5),
    Item("Table 6", "Adaptive attack: trigger-specific backdoor", "a4_adaptive", table6),
    Item("Table 7", "Activation functions", "a5_ablations", table7),
    Item("Table 8", "Amount of clean data", "a5_ablations", table8),
    Item("Table 9", "Low poisoning rates", "a5_ablations", table9),
    Item("Table 10", "Design choices: rejection, layers", "a5_ablations", table10),
    Item("Table 11", "Accuracy budget (degradation)", "a5_ablations", table11),
    Item("Table 12", "Optimisation steps and learning rate", "a5_ablations", table12),
    Item("Fig. 12", "Poisoning rates", "a5_ablations", figure12),
    Item("Fig. 13", "Target labels", "a5_ablations", figure13),
    Item("Fig. 14", "Model scales", "a5_ablations", figure14),
]


def status(profiles: tuple[str, ...] = ("cpu", "paper"), results_dir: str | None = None,
           gallery_attacks: list[str] | None = None, to_fill: str | None = None) -> pd.DataFrame:
    """For every appendix item: how many of its cells have a record at each profile, in words. With ``to_fill`` (a
    profile), a column that says what filling the item's missing cells at that profile takes: the runs the grid
    runner would make, their estimated hours from the seconds of earlier records (:func:`grid.estimate`) and the
    command. Nothing is run."""
    if to_fill is not None and to_fill not in PROFILES:
        raise ValueError(f"unknown profile {to_fill!r}; valid choices: {', '.join(PROFILES)}")
    rows = []
    for item in ITEMS:
        row = {"item": item.ref, "what": item.title, "notebook": item.notebook}
        for p in profiles:
            if item.cells is None:
                n = len(gallery_attacks or [])
                row[p] = (f"shown for {n} of {len(A1_ATTACKS)} attacks (no backdoored model needed; the generator "
                          f"attacks train their trigger at a short budget)" if n else "not yet")
                continue
            sec = Section(name=item.notebook, profile=p, results_dir=results_dir, compute_missing=False)
            index = RecordIndex(sec.record_dirs())
            cells = item.cells(sec)
            found = sum(sec.outcome(c, 0, index=index).status == REPRODUCED for c in cells)
            row[p] = ("reproduced" if found == len(cells) else f"partly: {found} of {len(cells)} cells"
                      if found else "not yet")
        if to_fill is not None:
            row[f"to fill at {to_fill}"] = _to_fill(item, to_fill, results_dir)
        rows.append(row)
    return pd.DataFrame(rows)


def _to_fill(item: Item, profile_name: str, results_dir: str | None) -> str:
    """What running ``item``'s missing cells at ``profile_name`` takes, in words (see :func:`status`)."""
    from . import grid

    if item.cells is None:
        return ""
    the_plan = grid.plan(profile_name, [item], results_dir=results_dir)
    if not the_plan.jobs:
        return "nothing left" if not the_plan.not_implemented else (
            f"{the_plan.not_implemented} cell(s) need an attack or defense the library does not have")
    est = grid.estimate(the_plan, results_dir=results_dir)
    hours = (f"about {est.total_s / 3600:.1f} h on one worker" if est.records and est.train_s is not None
             else "time unknown (no record at this profile to estimate from)")
    return (f"{len(the_plan.jobs)} run(s), {len(the_plan.groups())} backdoored model(s), {hours}; run "
            f"python -m unitlib.book grid --profile {profile_name} --table '{item.ref}'")
