"""The labs of the book's coursework track, in order: what each covers, what it assumes, and the work it does at the
``cpu`` profile (from which its run time there is estimated, see :func:`unitlib.book.labs.timing.estimate`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LABS_DIR = Path(__file__).resolve().parents[3] / "labs"


@dataclass(frozen=True)
class LabInfo:
    """One lab: ``name`` is its file's stem in ``labs/``; ``appendix`` the part of the paper it revisits;
    ``work`` what it runs at the ``cpu`` profile with its default parameters: backdoored models trained (``train``;
    ``train_regularised``: with the adaptive attacker's extra loss, which doubles each step's forward pass), UNIT
    runs (``unit``), and seconds of other work (``other_s``), counted from an empty model cache (Labs 2 to 4 share one
    BadNets model: after the first of them, the others load it)."""

    name: str
    title: str
    appendix: str
    covers: str
    prerequisites: tuple[str, ...]
    work: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return LABS_DIR / f"{self.name}.md"


LABS: tuple[LabInfo, ...] = (
    LabInfo(
        "lab1_plant_a_backdoor", "Plant a backdoor", "A.1, the attacks (Fig. 7, Table 8)",
        "write a trigger as an `Attack` subclass, register it, train a backdoored model with it through the pipeline "
        "and measure its ASR; how much poison it needs, beside BadNets",
        ("Python classes and dataclasses", "PyTorch tensors (N x C x H x W images in [0, 1])"),
        {"train": 6},  # the student's trigger and BadNets at three poison rates each
    ),
    LabInfo(
        "lab2_unit_by_hand", "UNIT by hand", "the method (initial bounds, Sec. 3 and A.3)",
        "record one layer's activations with a forward hook, compute its initial bounds (mean + 4 std of the clean "
        "activations), clip there, and check the result against the bounds `UNIT` starts from",
        ("PyTorch modules and forward hooks", "mean and standard deviation over a batch"),
        {"train": 1, "unit": 1},
    ),
    LabInfo(
        "lab3_accuracy_budget", "The accuracy budget", "A.5, Table 11 (the degradation budget)",
        "sweep UNIT's `degradation` on one backdoored model, plot the accuracy/ASR trade-off, find the smallest "
        "budget that removes the backdoor and compare with Table 11",
        ("Lab 2, or the method page", "pandas DataFrames", "matplotlib"),
        {"train": 1, "unit": 6},  # five budgets and the check's rerun of one
    ),
    LabInfo(
        "lab4_clip_or_reject", "Clipping or rejection, all layers or some", "A.5, Table 10 (design choices)",
        "run UNIT's four designs of Table 10 (clip or reject, all layers, the first two or the last two), pick the "
        "best within an accuracy budget and write an interpretation",
        ("Lab 3", "pandas DataFrames"),
        {"train": 1, "unit": 6},  # four designs, and the check's run of one beside the student's
    ),
    LabInfo(
        "lab5_adaptive_attacker", "An adaptive attacker", "A.4, Table 4 (activation suppression)",
        "add the activation-suppression loss (Eq. 6) to BadNets' training as an `Attack` subclass, train at several "
        "weights and see whether UNIT still removes the backdoor",
        ("Lab 1", "Lab 2 (forward hooks)", "autograd: a loss that is a sum over layers"),
        {"train": 1, "train_regularised": 2, "unit": 3},  # alpha 0 trains as plain BadNets
    ),
    LabInfo(
        "lab6_unit_vs_baseline", "UNIT against a baseline, on a time budget", "A.1 and A.2, the baselines (Table 8)",
        "pick a baseline defense, run it and UNIT on two attacks under a fixed time budget per defense, and compare "
        "accuracy, ASR and seconds",
        ("Lab 1", "Lab 3"),
        # two models; Trojan's trigger (about a minute) and the baseline on each attack (NC: about 3 minutes)
        {"train": 2, "unit": 2, "other_s": 420},
    ),
)


def number(name: str) -> int | None:
    """A lab's number in the book (its position in :data:`LABS`, from 1), or None for a notebook that is not one of
    them. The book's table of contents lists the labs in this order in a numbered part, so an exercise is numbered
    ``<lab>.<k>`` on the page, in the student's copy and in the grader's report alike."""
    names = [lab.name for lab in LABS]
    return names.index(name) + 1 if name in names else None


def get(name: str) -> LabInfo:
    for lab in LABS:
        if lab.name == name:
            return lab
    raise ValueError(f"unknown lab {name!r}; valid: {', '.join(lab.name for lab in LABS)}")
