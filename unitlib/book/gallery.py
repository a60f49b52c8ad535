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
# The attacks whose trigger is a trained encoder or generator take their own gallery budget: the trigger's strength
# and kind stay the defaults (ISSBA's residual scale and secret, DFST's blend and style, COMBAT's eps and low-pass);
# only the training is shorter. Measured in CPU seconds with one thread on the gallery's prepare data (5,000 CIFAR-10
# images), seed 0, poisoned vs source over 200 test images, against the default budget on the same data:
# - ISSBA: 250 encoder steps (2 secret-only epochs of 50; one such epoch leaves the decoder at chance and the
#   residual at zero), 14-16 s; default 936 steps, 54 s. PSNR 36.8 dB (seed 1: 38.3) vs 39.2, mean |diff| 0.0045
#   (0.0063) vs 0.0069, per-image L-inf 0.17 (0.15) vs 0.10, bits read back from the poisoned images 83% vs 100%.
# - DFST: 150 style steps and no detoxification rounds (they train the attacker's model and the detoxicants, not the
#   trigger: ``apply`` uses the style generator alone), 12-14 s; default 400 steps, 33 s before its rounds.
#   Per-channel mean shift (+0.095, -0.079, -0.146) vs (+0.093, -0.079, -0.145), PSNR 16.2 vs 16.4 dB, cosine of
#   the two difference maps 0.92.
# - COMBAT: 100 alternated steps of 64 images, the classifier C and the clean model F of width 8 (F: one epoch on
#   2,000 images), 10-12 s; default 390 steps of 128 after a 4-epoch F, 162 s. L-inf at the bound (0.04) on every image
#   in both, mean |diff| 0.034 (seed 1: 0.028) vs 0.036, PSNR 29.1 (30.4) vs 28.6 dB, share of the trigger's energy
#   in a per-image colour offset 0.74 (0.63) vs 0.79 (at 40 steps of 128 it is 0.98: a flat offset without the
#   trigger's pattern).
GALLERY_PARAMS: dict[str, dict[str, object]] = {
    "issba": {"encoder_size": 1600, "encoder_epochs": 5},
    "dfst": {"style_steps": 150, "detox_rounds": 0},
    "combat": {"generator_width": 8, "generator_size": 1280, "generator_epochs": 5, "batch_size": 64,
               "surrogate_width": 8, "surrogate_epochs": 1, "surrogate_size": 2000},
}
# Attacks left out of the gallery by name, with the reason (none at present).
UNDRAWN: dict[str, str] = {}


def _default_images(target: int) -> torch.Tensor:
    test = data.load("cifar10-jpeg")
    keep = torch.nonzero(test.y_test != target).flatten()
    return data.to_float(test.x_test[keep[:1]])


def _default_prepare_data(size: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    ds = data.load("cifar10-jpeg", size=size)
    return data.to_float(ds.x_train), ds.y_train


def _budget_for(name: str, cls: type, budget: dict) -> dict:
    """The parameters attack ``name`` takes in the gallery besides the caller's ``params``."""
    if getattr(cls, "trains_with_model", False):
        # IA, Dynamic, LIRA take their smoke budgets (a narrower generator, a shorter mask pre-training)
        return attacks.SMOKE_PARAMS.get(name, {})
    if name in GALLERY_PARAMS:
        return GALLERY_PARAMS[name]
    return budget if cls.needs_prepare else {}


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
    small model ``budget`` (default ``GALLERY_BUDGET``), except the attacks of ``GALLERY_PARAMS``, which take their
    own measured budget; ``params`` overrides any attack's parameters by name."""
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
        extra = {**_budget_for(name, cls, budget), **params.get(name, {})}
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


__all__ = ["GALLERY_BUDGET", "GALLERY_PARAMS", "UNDRAWN", "plot_trigger_gallery", "trigger_gallery"]
