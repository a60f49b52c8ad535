"""ipywidgets explorers for the book.

Static pages have no kernel, so each explorer is a ``Stack`` of precomputed panels whose ``selected_index`` is
``jslink``-ed to a dropdown or slider: the browser switches panels by itself. Where a kernel runs, the ``live_*``
versions recompute a panel on demand with ``interactive``. Either way a panel is made by one library function
(:func:`attack_panel`, :func:`layer_panel`, :func:`sensitivity_panel`) that a test can call.

Data come from :func:`attack_views` (trigger images, and clean accuracy and ASR before and after every defense in
the records) and :func:`unit_views` (one backdoored model, UNIT's learned bounds and the activations of clean and
poisoned inputs at each bounded layer)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch

from .. import attacks
from . import paper, plots
from .report import RecordIndex, Section, _setting

__all__ = [
    "AttackView",
    "LayerView",
    "attack_explorer",
    "attack_panel",
    "attack_views",
    "first_image",
    "layer_panel",
    "live_attack_explorer",
    "live_unit_explorer",
    "sensitivity_explorer",
    "sensitivity_panel",
    "stack_explorer",
    "trigger_gallery",
    "unit_explorer",
    "unit_views",
]


# -- the generic switch ---------------------------------------------------------------------------------------------
def stack_explorer(panels: dict[str, widgets.Widget], description: str, *, slider: bool = False) -> widgets.VBox:
    """A dropdown (or selection slider) over ``panels``' names and a ``Stack`` of the panels, linked in the browser
    (``jslink`` of the control's ``index`` to the stack's ``selected_index``): works in a static page."""
    if not panels:
        raise ValueError("an explorer needs at least one panel")
    names = list(panels)
    control_cls = widgets.SelectionSlider if slider else widgets.Dropdown
    control = control_cls(options=names, value=names[0], description=description,
                          style={"description_width": "initial"}, layout=widgets.Layout(width="420px"))
    stack = widgets.Stack(list(panels.values()), selected_index=0)
    widgets.jslink((control, "index"), (stack, "selected_index"))
    box = widgets.VBox([control, stack])
    box.add_class("unitlib-explorer")
    return box


def _png(fig) -> widgets.Image:
    # shown at its own size (no upscaling of small figures), narrower where the page is
    width = int(fig.get_size_inches()[0] * fig.dpi)
    return widgets.Image(value=plots.to_png(fig), format="png",
                         layout=widgets.Layout(width=f"{width}px", max_width="100%"))


def _html_table(df: pd.DataFrame) -> str:
    numeric = [c for c in df.columns if df[c].dtype.kind == "f"]
    fmt = {c: (lambda v: "—" if pd.isna(v) else f"{v:.2f}") for c in numeric}
    return df.to_html(index=False, formatters=fmt, border=0, classes="unitlib-table", na_rep="—")


# -- the attack explorer --------------------------------------------------------------------------------------------
def trigger_gallery(names: Sequence[str] | None = None, images: torch.Tensor | None = None, *,
                    seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Fig. 7's panels, ``{attack: {"clean", "poisoned", "difference"}}``: ``unitlib.book.gallery.trigger_gallery`` where
    that module exists, else each registered attack's ``apply`` on ``images`` (attacks whose trigger is learned from
    a model, ``needs_prepare``, are left out there)."""
    try:
        from .gallery import trigger_gallery as gallery
    except ImportError:
        gallery = None
    if gallery is not None:
        return gallery(list(names) if names is not None else None, images, seed=seed)
    if images is None:
        from ..data import load, to_float

        images = to_float(load("synthetic").x_test[:1])
    panels = {}
    for name in names or sorted(attacks.ATTACKS):
        attack = attacks.get(name, seed=seed)
        if getattr(attack, "needs_prepare", False):
            continue
        poisoned = torch.cat([attack.apply(images[i:i + 1]) for i in range(len(images))]).clamp(0, 1)
        panels[name] = {"clean": images, "poisoned": poisoned, "difference": poisoned - images}
    return panels


def first_image(panels: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The gallery's panels with one image per attack (the first where a panel holds several)."""
    return {k: {kk: (v[0] if v.ndim == 4 else v) for kk, v in p.items()} for k, p in panels.items()}


@dataclass
class AttackView:
    """One attack as the explorer shows it: its trigger on a few images and every record's metrics."""

    name: str  # the appendix's name
    registry: str | None  # the library's name (None: not implemented)
    triggers: dict[str, torch.Tensor] | None = None  # clean, poisoned, difference: K x C x H x W
    results: pd.DataFrame = field(default_factory=pd.DataFrame)
    note: str = ""


def attack_views(section: Section, paper_attacks: Sequence[str],
                 panels: dict[str, dict[str, torch.Tensor]]) -> dict[str, AttackView]:
    """For each attack (the appendix's names): its trigger panels (from :func:`trigger_gallery`, keyed by registry
    name) and, from the records at the section's profile, clean accuracy and ASR before and after each defense."""
    index = RecordIndex(section.record_dirs())
    views = {}
    for name in paper_attacks:
        reg = paper.registry_name(name) if name in paper.ATTACKS else (name if name in attacks.ATTACKS else None)
        if reg is None:
            views[name] = AttackView(name, None, note=f"{name} is not implemented in this library yet: not yet "
                                                      "reproduced.")
            continue
        triggers = None
        if reg in panels:
            triggers = {k: (v if v.ndim == 4 else v[None]) for k, v in panels[reg].items()}
        rows = []
        for rec in sorted(index.by_key.values(), key=lambda r: (r.config["defense"], r.key)):
            c = rec.config
            if c["attack"] != reg or c["profile"] != section.profile:
                continue
            b, a = rec.metrics["before"], rec.metrics["after"]
            params = ", ".join(f"{k}={v}" for k, v in sorted(c["defense_params"].items())
                               if k not in ("chunk",))
            rows.append({"defense": paper.paper_name(c["defense"], "defense") + (f" ({params})" if params else ""),
                         "acc before": 100 * b["clean_acc"], "ASR before": 100 * b["asr"],
                         "acc after": 100 * a["clean_acc"], "ASR after": 100 * a["asr"],
                         "measured at": _setting(c), "seed": c["seed"]})
        notes = []
        if triggers is None:
            notes.append(f"{name}'s trigger is learned from a trained model; it is not drawn here.")
        if not rows:
            notes.append(f"No record of {name} at profile {section.profile} yet: not yet reproduced.")
        views[name] = AttackView(name, reg, triggers, pd.DataFrame(rows), " ".join(notes))
    return views


def attack_panel(view: AttackView) -> widgets.VBox:
    """The explorer's panel for one attack: poisoned images and their differences, then the records' metrics."""
    children: list[widgets.Widget] = [widgets.HTML(f"<h4>{html.escape(view.name)}</h4>")]
    if view.triggers is not None:
        t = view.triggers
        panels = {f"#{i}": {"poisoned": t["poisoned"][i], "difference": t["difference"][i]}
                  for i in range(len(t["poisoned"]))}
        children.append(_png(plots.trigger_figure(panels)))
    if len(view.results):
        children.append(widgets.HTML(_html_table(view.results)))
    if view.note:
        children.append(widgets.HTML(f"<p class='unitlib-note'>{html.escape(view.note)}</p>"))
    box = widgets.VBox(children)
    box.add_class(f"unitlib-attack-{view.registry or 'missing'}")
    return box


def attack_explorer(views: dict[str, AttackView]) -> widgets.VBox:
    """Static attack explorer: attack -> its trigger and its accuracy / ASR before and after each defense."""
    return stack_explorer({name: attack_panel(v) for name, v in views.items()}, "attack")


def live_attack_explorer(views: dict[str, AttackView]) -> widgets.interactive:
    """The attack explorer recomputed on each choice (needs a running kernel)."""
    from IPython.display import display

    return widgets.interactive(lambda attack: display(attack_panel(views[attack])), attack=list(views))


# -- the UNIT explorer ----------------------------------------------------------------------------------------------
@dataclass
class LayerView:
    """One bounded layer: activations of clean and poisoned test inputs on the backdoored model (N x shape), the
    learned bound and the initial one (mean + ``init_std`` std of the defender's clean data), both of the layer's
    shape."""

    name: str
    clean: np.ndarray
    poisoned: np.ndarray
    bound: np.ndarray
    initial: np.ndarray


@torch.no_grad()
def _activations(model: torch.nn.Module, names: list[str], x: torch.Tensor, chunk: int = 256) -> dict[str, np.ndarray]:
    modules = dict(model.named_modules())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: out[n].append(o.float().cpu())) for n in names]
    try:
        model.eval()
        for i in range(0, len(x), chunk):
            model(x[i:i + chunk])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v).numpy() for n, v in out.items()}


def unit_views(exp, *, n_images: int = 200, device: str = "cpu", data_root: str | None = None,
               log=print) -> tuple[list[LayerView], dict[str, Any]]:
    """The backdoored model of ``exp`` (trained or from the cache, through the one pipeline,
    :func:`unitlib.experiment.setup`), defended as ``exp`` says, and each bounded layer's view plus a summary
    (metrics before/after, setting)."""
    from .. import data
    from ..experiment import setup
    from ..metrics import evaluate
    from ..train import resolve_device

    dev = resolve_device(device)
    ready = setup(exp, device=dev, data_root=data_root, progress=False, log=lambda *a: None)
    model, dataset, attack = ready.model, ready.dataset, ready.attack
    log(f"backdoored model {'loaded from the cache' if ready.cached_meta is not None else 'trained'} "
        f"({exp.profile} profile)")
    defense = exp.make_defense()
    defended = defense(model, ready.clean, device=dev, progress=False)
    sites = list(defended.layers)
    keep = dataset.y_test != exp.target
    x_test = data.to_float(dataset.x_test[keep][:n_images]).to(dev)
    x_trig = attack.apply(x_test).clamp(0, 1)
    acts_clean, acts_pois = _activations(model, sites, x_test), _activations(model, sites, x_trig)
    bounds = {n: b.cpu().numpy() for n, b in defended.bound_values().items()}
    initial = {n: b.numpy() for n, b in getattr(defense, "initial", {}).items()}
    views = []
    for n in sites:
        shape = acts_clean[n].shape[1:]
        views.append(LayerView(n, acts_clean[n], acts_pois[n], np.broadcast_to(bounds[n], shape),
                               np.broadcast_to(initial.get(n, bounds[n]), shape)))
    before = evaluate(model, dataset.x_test, dataset.y_test, attack, device=dev)
    after = evaluate(defended, dataset.x_test, dataset.y_test, attack, device=dev)
    summary = {"before": before, "after": after, "setting": _setting(exp.to_dict()), "attack": exp.attack,
               "budget": getattr(defense, "degradation", None)}
    return views, summary


def layer_panel(view: LayerView) -> widgets.VBox:
    """The UNIT explorer's panel for one layer: clean and poisoned activations against the learned bounds."""
    clipped_c = 100 * (view.clean > view.bound).mean()
    clipped_p = 100 * (view.poisoned > view.bound).mean()
    fig = plots.activation_figure(view.clean, view.poisoned, view.bound, initial=view.initial,
                                  title=f"layer {view.name}")
    text = (f"<p>Layer <code>{html.escape(view.name)}</code>: {view.bound.size:,} bounds. Above its bound: "
            f"{clipped_c:.2f}% of the clean values and {clipped_p:.2f}% of the poisoned ones.</p>")
    return widgets.VBox([_png(fig), widgets.HTML(text)])


def unit_explorer(views: list[LayerView]) -> widgets.VBox:
    """Static UNIT explorer: a slider over the bounded layers (forward order) switching precomputed panels."""
    return stack_explorer({v.name: layer_panel(v) for v in views}, "layer", slider=True)


def live_unit_explorer(views: list[LayerView]) -> widgets.interactive:
    from IPython.display import display

    by_name = {v.name: v for v in views}
    return widgets.interactive(lambda layer: display(layer_panel(by_name[layer])), layer=list(by_name))


# -- the A.3 sensitivity grids --------------------------------------------------------------------------------------
def sensitivity_panel(df: pd.DataFrame, param: str, fixed: str, value: Any, unit: dict[str, float] | None,
                      title: str) -> widgets.VBox:
    """One slice of a sensitivity grid: ``param`` on the y axis, ``fixed`` held at ``value``."""
    part = df[df[fixed].astype(str) == str(value)]
    fig = plots.sensitivity_bars(part, param, unit=unit, title=f"{title}, {fixed} = {value}")
    return widgets.VBox([_png(fig)])


def sensitivity_explorer(df: pd.DataFrame, param: str, fixed: str, unit: dict[str, float] | None,
                         title: str) -> widgets.VBox:
    """Static grid explorer: a slider over the values of ``fixed``; each panel shows the bars along ``param``."""
    values = list(dict.fromkeys(df[fixed]))
    return stack_explorer({f"{v}": sensitivity_panel(df, param, fixed, v, unit, title) for v in values}, fixed,
                          slider=True)
