"""The book's figures, all drawn with seaborn in one theme (:func:`set_theme`).

Every function returns a matplotlib ``Figure`` (the caller shows or saves it); :func:`to_png` turns one into bytes for
a widget. Numbers are in percent, as in the appendix's tables."""

from __future__ import annotations

import io
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

__all__ = [
    "PALETTE", "activation_figure", "comparison_bars", "comparison_data", "sensitivity_bars", "set_theme", "sweep_lines",
    "tightening_curves", "tightening_illustration", "to_png", "trigger_figure",
]

# One colour per role, everywhere: clean/accuracy blue, backdoor/ASR red, bounds black, the paper's numbers grey.
PALETTE = {"clean": "#1f77b4", "acc": "#1f77b4", "poisoned": "#d62728", "asr": "#d62728", "bound": "#222222",
           "initial bound": "#7f7f7f", "ours": "#1f77b4", "paper": "#9e9e9e"}


def set_theme() -> None:
    """The book's one theme: seaborn ``whitegrid``, colour-blind palette, compact fonts."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind", font_scale=0.9,
                  rc={"figure.dpi": 100, "savefig.dpi": 100, "figure.autolayout": False, "axes.titleweight": "bold"})


def to_png(fig: plt.Figure, *, close: bool = True) -> bytes:
    """The figure as PNG bytes (closed afterwards unless ``close=False``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    if close:
        plt.close(fig)
    return buf.getvalue()


def _image(t: torch.Tensor | np.ndarray) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return np.clip(a, 0, 1)


def trigger_figure(panels: Mapping[str, Mapping[str, torch.Tensor]], *, columns: int | None = None) -> plt.Figure:
    """Fig. 7's layout: per attack, the poisoned image (top row) and its difference from the source (bottom row),
    the difference rescaled to [0, 1] so that faint triggers show."""
    set_theme()
    names = list(panels)
    n = max(len(names), 1)
    cols = columns or n
    rows = 2 * int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, name in enumerate(names):
        r, c = 2 * (i // cols), i % cols
        p = panels[name]
        poisoned, diff = _image(p["poisoned"]), _image(_normalise(p["difference"]))
        cmap = "gray" if poisoned.ndim == 2 else None
        axes[r, c].imshow(poisoned, cmap=cmap, interpolation="nearest")
        axes[r, c].set_title(name, fontsize=9)
        axes[r + 1, c].imshow(diff, cmap=cmap, interpolation="nearest")
    fig.tight_layout()
    return fig


def _normalise(d: torch.Tensor) -> torch.Tensor:
    d = d.abs() if isinstance(d, torch.Tensor) else torch.as_tensor(np.abs(d))
    top = float(d.max())
    return d / top if top > 0 else d


def comparison_data(df: pd.DataFrame, label: str) -> pd.DataFrame:
    """The bars of :func:`comparison_bars`, one per table row, metric and source (long format). A bar's name joins
    every label column that varies in ``df`` (``label`` first), so rows that share ``label`` (No Defense and UNIT
    for the same activation, one defense on several attacks) are never merged into one bar."""
    label_cols = [c for c in df.columns if not str(c).startswith(("ours", "paper", "status"))]
    varying = [c for c in label_cols if df[c].astype(str).nunique() > 1]
    key_cols = [label] + [c for c in varying if c != label] if label in df.columns else varying or label_cols[:1]
    long = []
    for _, row in df.iterrows():
        name = " · ".join(str(row[c]) for c in key_cols)
        for source in ("ours", "paper"):
            for metric in ("acc", "asr"):
                v = row.get(f"{source} {metric}")
                if v is not None and not pd.isna(v):
                    long.append({"bar": name, "source": source, "metric": metric, "value": float(v)})
    return pd.DataFrame(long, columns=["bar", "source", "metric", "value"])


def comparison_bars(df: pd.DataFrame, label: str, *, title: str = "") -> plt.Figure:
    """Ours beside the paper's, per row of a comparison table (columns ``ours acc``, ``ours asr``, ``paper acc``,
    ``paper asr``): two panels, clean accuracy and ASR, one pair of bars per row (:func:`comparison_data`). Missing
    numbers are left out, not drawn as zero."""
    set_theme()
    data = comparison_data(df, label)
    order = list(dict.fromkeys(data["bar"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.35 * max(len(order), 4) + 1), sharey=True)
    for ax, metric, name in zip(axes, ("acc", "asr"), ("clean accuracy (%)", "ASR (%)")):
        part = data[data.metric == metric]
        if len(part):
            sns.barplot(part, y="bar", x="value", hue="source", order=order, hue_order=["ours", "paper"],
                        palette=[PALETTE["ours"], PALETTE["paper"]], ax=ax, orient="h", errorbar=None)
        ax.set_xlim(0, 100)
        ax.set_xlabel(name)
        ax.set_ylabel("")
        if ax.get_legend():
            ax.get_legend().set_title("")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def sweep_lines(df: pd.DataFrame, x: str, *, title: str = "") -> plt.Figure:
    """Figs. 12-14's layout: clean accuracy and ASR without defense and after UNIT along a swept setting ``x``
    (rows with ``defense`` ``No Defense`` / ``UNIT`` and ``ours acc`` / ``ours asr``)."""
    set_theme()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    style = {("No Defense", "acc"): ("--", "o"), ("No Defense", "asr"): ("--", "s"),
             ("UNIT", "acc"): ("-", "o"), ("UNIT", "asr"): ("-", "s")}
    xs = list(dict.fromkeys(str(v) for v in df[x]))
    for (defense, metric), (ls, marker) in style.items():
        part = df[df.defense == defense]
        ys = [part[part[x].astype(str) == v][f"ours {metric}"].mean() for v in xs]
        ax.plot(xs, ys, ls=ls, marker=marker, color=PALETTE[metric],
                label=f"{'ASR' if metric == 'asr' else 'accuracy'}, {defense.lower()}")
    ax.set_ylim(-2, 102)
    ax.set_xlabel(x)
    ax.set_ylabel("%")
    ax.legend(fontsize=8, loc="center right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def sensitivity_bars(df: pd.DataFrame, param: str, *, unit: Mapping[str, float] | None = None,
                     title: str = "") -> plt.Figure:
    """Figs. 8-10's layout: for each value of ``param`` (y axis) two bars, ASR (top) and accuracy (bottom); UNIT's
    ASR and accuracy as red and blue dashed lines."""
    set_theme()
    fig, ax = plt.subplots(figsize=(5.5, 0.55 * max(len(df), 3) + 1))
    ys = np.arange(len(df))
    ax.barh(ys + 0.2, df["ours asr"], height=0.38, color=PALETTE["asr"], label="ASR")
    ax.barh(ys - 0.2, df["ours acc"], height=0.38, color=PALETTE["acc"], label="accuracy")
    ax.set_yticks(ys, [str(v) for v in df[param]])
    ax.set_ylabel(param)
    ax.set_xlim(0, 100)
    ax.set_xlabel("%")
    if unit:
        ax.axvline(unit["asr"], color=PALETTE["asr"], ls="--", label="UNIT ASR")
        ax.axvline(unit["acc"], color=PALETTE["acc"], ls="--", label="UNIT accuracy")
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def activation_figure(clean: np.ndarray, poisoned: np.ndarray, bound: np.ndarray, *,
                      initial: np.ndarray | None = None, title: str = "") -> plt.Figure:
    """One layer as UNIT sees it: the activation values of clean and poisoned inputs, each divided by its own
    learned bound (so 1 is the bound everywhere; bounds are per element), and the share of each clipped."""
    set_theme()
    fig, ax = plt.subplots(figsize=(6, 3))
    eps = 1e-6
    rc, rp = clean / (bound + eps), poisoned / (bound + eps)
    top = float(np.quantile(np.concatenate([rc.ravel(), rp.ravel()]), 0.999))
    bins = np.linspace(0, max(top, 1.5), 60)
    for values, name in ((rc, "clean"), (rp, "poisoned")):
        v = values.ravel()
        v = v[v > 1e-3]  # the many exact zeros of a ReLU would flatten the plot
        ax.hist(np.clip(v, 0, bins[-1]), bins=bins, alpha=0.55, color=PALETTE[name], density=True,
                label=f"{name}: {100 * (values > 1).mean():.2f}% clipped")
    ax.axvline(1.0, color=PALETTE["bound"], lw=2, label="learned bound")
    if initial is not None:
        ax.axvline(float(np.median(initial / (bound + eps))), color=PALETTE["initial bound"], ls="--",
                   label="initial bound (median)")
    ax.set_yscale("log")
    ax.set_xlabel("activation / its learned bound (non-zero values)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def tightening_illustration(seed: int = 0, n: int = 20_000) -> plt.Figure:
    """A one-neuron picture of UNIT: clean activations (ReLU of a Gaussian), the backdoor's few large activations,
    the initial bound (mean + 4 std of the clean ones) and a tightened bound, and what clipping leaves."""
    set_theme()
    rng = np.random.default_rng(seed)
    clean = np.maximum(rng.normal(0.3, 1.0, n), 0)
    poisoned = np.maximum(rng.normal(5.0, 1.0, n // 10), 0)
    initial = clean.mean() + 4 * clean.std()
    tight = float(np.quantile(clean, 0.98))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
    bins = np.linspace(0, 8, 80)
    for ax, bound, name in ((axes[0], initial, "initial bound: mean + 4 std"), (axes[1], tight, "tightened bound")):
        ax.hist(poisoned, bins=bins, histtype="step", color=PALETTE["poisoned"], density=True,
                label="poisoned, unclipped")
        ax.hist(np.minimum(clean, bound), bins=bins, color=PALETTE["clean"], alpha=0.6, density=True, label="clean")
        ax.hist(np.minimum(poisoned, bound), bins=bins, color=PALETTE["poisoned"], alpha=0.6, density=True,
                label="poisoned, clipped")
        ax.axvline(bound, color=PALETTE["bound"], lw=2)
        ax.set_title(f"{name} = {bound:.2f}")
        ax.set_xlabel("activation")
        ax.set_yscale("log")
        ax.text(0.98, 0.95, f"mean activation after clipping\npoisoned {np.minimum(poisoned, bound).mean():.2f} "
                f"(unclipped {poisoned.mean():.2f})\nclean {np.minimum(clean, bound).mean():.2f} "
                f"({(clean > bound).mean():.1%} of clean values clipped)",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def tightening_curves(reports: Mapping[str, Mapping], *, title: str = "") -> plt.Figure:
    """UNIT's tightening as its reports recorded it, one line per run (``reports``: label -> a UNIT report with
    ``history``, ``threshold`` and ``best_step``): validation accuracy per step against the accuracy budget (left),
    and the regulariser, the sum of the layers' mean bounds (right). A dot marks the step whose bounds were kept."""
    set_theme()
    fig, (acc_ax, reg_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    colours = sns.color_palette("colorblind", len(reports))
    for colour, (label, report) in zip(colours, reports.items()):
        hist = pd.DataFrame(report["history"])
        acc_ax.plot(hist["step"], 100 * hist["val_acc"], color=colour, lw=1.2, label=label)
        reg_ax.plot(hist["step"], hist["reg"], color=colour, lw=1.2, label=label)
        acc_ax.axhline(100 * report["threshold"], color=colour, ls=":", lw=1)
        kept = hist[hist["step"] == report["best_step"]]
        if len(kept):
            acc_ax.plot(kept["step"], 100 * kept["val_acc"], "o", color=colour, ms=5)
            reg_ax.plot(kept["step"], kept["reg"], "o", color=colour, ms=5)
    acc_ax.set_xlabel("step")
    acc_ax.set_ylabel("validation accuracy (%)")
    acc_ax.set_title("accuracy (dotted: the budget's threshold)")
    reg_ax.set_xlabel("step")
    reg_ax.set_ylabel("sum of mean bounds")
    reg_ax.set_title("regulariser")
    reg_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
