"""Tables the labs show beside the students' answers: the library's own numbers to compare with, and the paper's."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ... import experiment
from .. import paper
from ...defenses.unit import BoundedModel, clean_statistics, initial_bounds
from .helpers import test_metrics

# Columns holding fractions, shown as percent.
FRACTIONS = ("clean_acc", "asr", "clean_acc_before", "asr_before", "clean_acc_after", "asr_after", "val_acc",
             "share lowered")


def show_table(df: pd.DataFrame, digits: int = 1, *, index: bool = True):
    """``df`` styled for a lab's page: fractions as percent, seconds to two decimals, other numbers to three
    significant digits; without its index unless ``index``."""
    fmt = {c: f"{{:.{digits}%}}" for c in df.columns if c in FRACTIONS}
    fmt.update({c: "{:.2f}" for c in df.columns if c == "seconds" or str(c).endswith("(%)")})
    fmt.update({c: "{:.3g}" for c in df.columns if c not in fmt and pd.api.types.is_float_dtype(df[c])})
    styled = df.style.format(fmt, na_rep="")
    return styled if index else styled.hide(axis="index")


def lab2_compare(ready: experiment.Setup, name: str, k: float, clipped: nn.Module | None = None,
                 defended: nn.Module | None = None) -> pd.DataFrame:
    """Test accuracy and ASR without defense, with one layer clipped at its initial bound (the student's model),
    with every layer clipped at its initial bound, and after UNIT, where given."""
    x = ready.clean.x_opt.float().div(255) if ready.clean.x_opt.dtype == torch.uint8 else ready.clean.x_opt
    rows = {"no defense": test_metrics(ready.model, ready)}
    if clipped is not None:
        rows[f"{name} clipped at mean + {k:g} std (yours)"] = test_metrics(clipped, ready)
    import copy

    every = BoundedModel(copy.deepcopy(ready.model), initial_bounds(ready.model, x, init_std=k))
    rows[f"every layer clipped at mean + {k:g} std"] = test_metrics(every, ready)
    if defended is not None:
        rows["UNIT (tightened)"] = test_metrics(defended, ready)
    return pd.DataFrame(rows).T[["clean_acc", "asr"]]


def lab2_tightening(ready: experiment.Setup, defended: BoundedModel, x: torch.Tensor, k: float = 4.0) -> pd.DataFrame:
    """Per bounded layer: how far UNIT's kept bounds lie below the initial ones, in units of each element's clean
    standard deviation (mean over elements), and the share of elements it lowered."""
    stats = clean_statistics(ready.model, x)
    rows = []
    for site, kept in defended.bound_values().items():
        std = stats.std[site].clamp(min=1e-6)
        start = (stats.mean[site] + k * stats.std[site]).clamp(min=0)
        moved = ((start - kept) / std)[stats.std[site] > 0]
        rows.append({"layer": site, "elements": kept.numel(), "moved down (std)": moved.mean().item(),
                     "share lowered": (moved > 1e-3).float().mean().item()})
    return pd.DataFrame(rows).set_index("layer")


def paper_table(number: int, attack: str = "BadNets", column: str | None = None) -> pd.DataFrame:
    """One attack's rows of appendix Table ``number``, in percent, one row per defense and setting (``column``) and
    one column per metric (Table 4 adds the suppression loss, Eq. 6): the paper's numbers (CIFAR-10, ResNet-18) to put beside a lab's. Cells the source does not
    give are left out."""
    df = paper.table(number)
    metrics = df["metric"].isin(["acc", "asr", "adaptive_loss"])
    df = df[(df["attack"] == attack) & metrics & df["value"].notna()].copy()
    keys = ["defense"] + ([column] if column else [])
    if column:  # the undefended row has no setting: a label, so that pivoting keeps it
        df[column] = df[column].astype(object).where(df[column].notna(), "")
    wide = df.pivot_table(index=keys, columns="metric", values="value", aggfunc="first", sort=False).reset_index()
    wide.columns.name = None
    return wide.rename(columns={"acc": "clean acc (%)", "asr": "ASR (%)", "adaptive_loss": "suppression loss"})
