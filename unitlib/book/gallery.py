"""The trigger gallery of the appendix's Fig. 7: for each attack, a source image, its poisoned version and the
amplified difference between them. Used by the A.1 notebook."""

from __future__ import annotations

import torch

from .. import attacks, data
from ..attacks.joint import train_with_model

# Small, fixed budget for the attacks that learn their trigger from a model (Trojan, CL, NARCISSUS; IA and Dynamic
# train their generator with a small model for as many epochs): the gallery shows what the trigger looks like, not
# how strong it is. Cached, so only the first call trains.
GALLERY_BUDGET = {"surrogate_epochs": 2, "surrogate_size": None}
# Attacks whose trigger needs a trained encoder or generator with no measured budget for the gallery yet (the default
# budgets take minutes on two cores, the smoke ones change the trigger's strength): left out of the gallery by name.
UNDRAWN: dict[str, str] = {
    "issba": "its StegaStamp encoder takes minutes to train at the default budget",
    "dfst": "its style generator and detoxification rounds take minutes at the default budget",
    "combat": "its alternated generator training takes minutes at the default budget",
}


def _default_images(target: int) -> torch.Tensor:
    test = data.load("cifar10-jpeg")
    keep = torch.nonzero(test.y_test != target).flatten()
    return data.to_float(test.x_test[keep[:1]])


def _default_prepare_data(size: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    ds = data.load("cifar10-jpeg", size=size)
    return data.to_float(ds.x_train), ds.y_train


def trigger_gallery(
    names: list[str] | None = None,
    images: torch.Tensor | None = None,
    *,
    seed: int = 0,
    target: int = 0,
    prepare_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    budget: dict | None = None,
    params: dict[str, dict] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """For each attack in ``names`` (default: every registered one), the source image (``clean``), the image as
    the attack poisons it for training (``poisoned``: its training-time trigger, e.g. CL's adversarial perturbation
    plus pattern, Adap-Blend's partial trigger) and ``difference`` = |poisoned - clean|, all C x H x W in [0, 1].

    ``images`` (N x C x H x W, float in [0, 1] or uint8): attack i uses image i mod N; default, the first
    non-target test image of ``cifar10-jpeg``. Attacks that learn their trigger from a model are prepared on
    ``prepare_data`` (x, y) (default: a balanced 5,000-image subset of the ``cifar10-jpeg`` training set) with the
    small model ``budget`` (default ``GALLERY_BUDGET``); ``params`` overrides any attack's parameters by name."""
    names = sorted(attacks.ATTACKS) if names is None else list(names)
    for name in names:
        attacks.attack_class(name)  # unknown names fail before any work
    if images is None:
        images = _default_images(target)
    elif images.dtype == torch.uint8:
        images = data.to_float(images)
    if images.dim() != 4 or not len(images):
        raise ValueError(f"images must be N x C x H x W with N >= 1, got shape {tuple(images.shape)}")
    budget = GALLERY_BUDGET if budget is None else budget
    params = params or {}
    panels: dict[str, dict[str, torch.Tensor]] = {}
    for i, name in enumerate(names):
        cls = attacks.attack_class(name)
        joint = getattr(cls, "trains_with_model", False)
        # IA and Dynamic take their smoke budgets (a narrower generator, a shorter mask pre-training) instead
        extra = {**(attacks.SMOKE_PARAMS.get(name, {}) if joint else budget if cls.needs_prepare else {}),
                 **params.get(name, {})}
        atk = attacks.get(name, target=target, seed=seed, **extra)
        if atk.needs_prepare:
            if prepare_data is None:
                prepare_data = _default_prepare_data()
            if joint:  # IA, Dynamic: the generator trains with a small model (cached)
                train_with_model(atk, *prepare_data, epochs=budget.get("surrogate_epochs", 2))
            else:
                atk.prepare(*prepare_data, progress=False)
        clean = images[i % len(images)][None]
        poisoned = atk.apply_train(clean).clamp(0, 1).detach()  # CL runs PGD here: no torch.no_grad()
        panels[name] = {"clean": clean[0], "poisoned": poisoned[0], "difference": (poisoned - clean).abs()[0]}
    return panels


def plot_trigger_gallery(panels: dict[str, dict[str, torch.Tensor]]):
    """Fig. 7 as a grid: one row per attack; columns the source image, the poisoned image and |difference|,
    amplified per row to its own maximum (the factor is printed) so that faint triggers are visible."""
    import matplotlib.pyplot as plt

    rows = len(panels)
    if not rows:
        raise ValueError("no panels to plot")
    fig, axes = plt.subplots(rows, 3, figsize=(5.4, 1.8 * rows + 0.4), squeeze=False)
    for r, (name, p) in enumerate(panels.items()):
        diff = p["difference"]
        gain = 1.0 / max(float(diff.max()), 1e-8)
        shown = [p["clean"], p["poisoned"], (diff * gain).clamp(0, 1)]
        titles = ["source", "poisoned", f"|difference| x{gain:.0f}"]
        for c, (img, title) in enumerate(zip(shown, titles, strict=True)):
            ax = axes[r, c]
            arr = img.permute(1, 2, 0).numpy()
            ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray" if arr.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or c == 2:
                ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("Backdoor triggers (Fig. 7)", fontsize=10)
    fig.tight_layout()
    return fig


__all__ = ["GALLERY_BUDGET", "plot_trigger_gallery", "trigger_gallery"]
