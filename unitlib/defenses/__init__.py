"""Backdoor defenses, one module each, one registry (``get``, ``DEFENSES``) and one signature.

UNIT and the seven baselines of the appendix (A.1): FT, FP, NAD, ANP, NC, I-BAU and SEAM."""

from . import anp, fp, ft, ibau, nad, nc, seam, unit  # noqa: F401  (registration)
from .anp import ANP
from .base import DEFENSES, REGISTRY, CleanSplit, Defense, NoDefense, get, parameters
from .fp import FP
from .ft import FT
from .ibau import IBAU
from .nad import NAD
from .nc import NC
from .seam import SEAM
from .unit import UNIT, BoundedModel

# Budgets that take seconds on the `smoke` profile's synthetic data and tiny CNN and still remove its planted
# BadNets backdoor (tests/test_defenses.py checks that they do). The defaults are the papers' and take minutes to
# hours there: a smoke run of a baseline should use these.
SMOKE_PARAMS: dict[str, dict[str, object]] = {
    "ft": {"epochs": 4, "lr": 0.1, "lr_step": 0},
    "fp": {"ratio": 0.8, "epochs": 3, "lr": 0.05},
    # NAD's window is narrow at smoke: with 5 epochs, lr 0.003 leaves 87% ASR and 0.007 halves accuracy; 0.004-0.006
    # remove the backdoor (measured on an AMD EPYC, one thread; lr 0.002 for 3 epochs, enough on an Intel Xeon,
    # left 97% there).
    "nad": {"epochs": 5, "teacher_epochs": 3, "teacher_lr": 0.1, "lr": 0.005},
    "nc": {"steps": 20, "batches_per_step": 1, "batch_size": 64, "unlearn_epochs": 3},
    "anp": {"iterations": 100, "batch_size": 32, "alpha": 0.05, "threshold": 0.6},
    "i-bau": {"rounds": 2, "lr": 3e-3},
    "seam": {"forget_lr": 0.05, "forget_acc": 0.12, "recover_epochs": 4, "recover_lr": 0.05, "recover_lr_step": 0},
}

__all__ = ["ANP", "DEFENSES", "FP", "FT", "IBAU", "NAD", "NC", "REGISTRY", "SEAM", "SMOKE_PARAMS", "UNIT", "BoundedModel",
           "CleanSplit", "Defense", "NoDefense", "get", "parameters"]
