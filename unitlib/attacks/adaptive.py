"""Two of the appendix's adaptive attacks (A.4), both BadNets with negative samples that teach the backdoor to be
specific, in the hope of shrinking the gap between clean and backdoor activations that UNIT relies on:

- label-specific (Table 5): the trigger flips only images of the ``victim`` class to the target; images of other
  classes stamped with the trigger keep their own labels (negative samples);
- trigger-specific (Table 6): only the exact trigger fires; the trigger with Gaussian noise of std ``noise_level``
  added to it, stamped on other images that keep their labels, does not (negative samples).

The appendix gives neither attack's poisoning or negative-sample rate; here both are fractions of the whole
training set (``poison_rate``, ``negative_rate``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .badnets import BadNets
from .base import Poisoned
from .registry import register

OBJECTIVES = ("poisoned", "paired")


def _draw(pool: torch.Tensor, n: int, generator: torch.Generator, what: str) -> torch.Tensor:
    if n > len(pool):
        raise ValueError(f"{what} asks for {n} samples but only {len(pool)} are available")
    return pool[torch.randperm(len(pool), generator=generator)[:n]].sort().values


@register
@dataclass
class LabelSpecific(BadNets):
    """BadNets whose trigger flips only the ``victim`` class to the target (Cheng et al., ECCV 2024, A.4): victim
    images with the trigger are relabelled to the target; ``negative_rate`` of the training set, drawn from the
    other classes, carry the trigger with their own labels. ASR is measured on victim-class test images;
    ``asr_non_victim`` on the other non-target classes (Table 5's label-specificity column)."""

    name = "label-specific"
    citation = "Cheng et al., UNIT, ECCV 2024, appendix A.4 (label-specific backdoor)"

    victim: int = 1
    negative_rate: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.victim, bool) or not isinstance(self.victim, int) or self.victim < 0:
            raise ValueError(f"victim must be a class index >= 0, got {self.victim!r}")
        if self.victim == self.target:
            raise ValueError(f"victim must differ from the target ({self.target}), got {self.victim!r}")
        if not 0.0 <= self.negative_rate < 1.0:
            raise ValueError(f"negative_rate must be in [0, 1), got {self.negative_rate!r}")

    def select(self, y: torch.Tensor) -> torch.Tensor:
        pool = torch.nonzero(y == self.victim).flatten()
        return _draw(pool, round(self.poison_rate * len(y)), self.generator(salt=1),
                     f"poison_rate {self.poison_rate} (victim class {self.victim})")

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        payload = self.select(y)
        others = torch.nonzero((y != self.victim) & (y != self.target)).flatten()
        cover = _draw(others, round(self.negative_rate * len(y)), self.generator(salt=2),
                      f"negative_rate {self.negative_rate}")
        x, y = x.clone(), y.clone()
        for idx in (payload, cover):
            if len(idx):
                x[idx] = self.apply(x[idx]).clamp(0, 1)
        y[payload] = self.target
        return Poisoned(x, y, torch.cat([payload, cover]).sort().values, cover)

    def asr_sets(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"asr": x[y == self.victim], "asr_non_victim": x[(y != self.victim) & (y != self.target)]}


@register
@dataclass
class TriggerSpecific(BadNets):
    """BadNets that fires on its exact trigger only (Cheng et al., ECCV 2024, A.4): ``negative_rate`` of the
    training set carry the trigger with Gaussian noise of std ``noise_level`` (in pixel units, then clipped to
    [0, 1]) and keep their labels. ``asr_noisy`` is the ASR of test images with a noisy trigger (Table 6's
    trigger-specificity column), drawn with a fixed seed."""

    name = "trigger-specific"
    citation = "Cheng et al., UNIT, ECCV 2024, appendix A.4 (trigger-specific backdoor)"

    noise_level: float = 0.1
    negative_rate: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.noise_level, bool) or not isinstance(self.noise_level, (int, float)) or not (
                self.noise_level > 0):
            raise ValueError(f"noise_level must be > 0, got {self.noise_level!r}")
        if not 0.0 <= self.negative_rate < 1.0:
            raise ValueError(f"negative_rate must be in [0, 1), got {self.negative_rate!r}")

    def apply_noisy(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The trigger with fresh Gaussian noise per image stamped on ``x``."""
        c, h, w = x.shape[-3:]
        top, left = self.corner(h, w)
        k = self.patch_size
        noise = torch.randn((len(x), c, k, k), generator=generator) * self.noise_level
        out = x.clone()
        out[..., top : top + k, left : left + k] = (self.patch(c)[None] + noise).clamp(0, 1).to(x)
        return out

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        payload = self.select(y)
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[payload] = False
        cover = _draw(torch.nonzero(rest).flatten(), round(self.negative_rate * len(y)), self.generator(salt=2),
                      f"negative_rate {self.negative_rate}")
        x, y = x.clone(), y.clone()
        if len(payload):
            x[payload] = self.apply(x[payload]).clamp(0, 1)
            y[payload] = self.target
        if len(cover):
            x[cover] = self.apply_noisy(x[cover], self.generator(salt=3))
        return Poisoned(x, y, torch.cat([payload, cover]).sort().values, cover)

    def asr_sets(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = x[y != self.target]
        return {"asr": keep, "asr_noisy": keep}

    def trigger_for(self, key: str):
        if key == "asr_noisy":
            gen = self.generator(salt=4)
            return lambda xs: self.apply_noisy(xs, gen)
        return self.apply


@register
@dataclass
class ActivationSuppression(BadNets):
    """BadNets trained with the appendix's adaptive loss (Eq. 6; Cheng et al., ECCV 2024, A.4): the attacker adds
    ``alpha * sum_l ||F_l(x) - F_l(x + T)||^2`` to the training loss, pulling every activation layer's output on a
    triggered image towards its output on the clean one, so that the backdoor leaves no abnormally large activation
    for UNIT to bound. ``F_l`` are the model's activation modules (the sites UNIT bounds); the squared distance is
    the mean over a layer's elements and the batch (the appendix does not say how it is normalised), so ``alpha``
    weighs each layer equally. ``alpha = 0`` is plain BadNets (Table 4's first row).

    ``objective`` says where the backdoor's own loss comes from (the appendix's text and its Eq. 6 differ):

    - ``"poisoned"`` (default; the text: "BadNets ... with the adaptive loss"): the poisoned share of the training
      set (``poison_rate``) carries it; the suppression term covers every image of a batch.
    - ``"paired"`` (Eq. 6 as printed): every image of a batch also gives ``L(M(x + T), y_T)``, its triggered copy
      trained to the target, from the same forward pass as the suppression term, on top of the poisoned share.
      The backdoor then weighs as much as the clean task, as the suppression term pulls against it."""

    name = "activation-suppression"
    citation = "Cheng et al., UNIT, ECCV 2024, appendix A.4 (Eq. 6, activation suppression)"
    added_params: ClassVar[dict[str, object]] = {"objective": "poisoned"}

    alpha: float = 1.0
    objective: str = "poisoned"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
            raise ValueError(f"alpha must be a number >= 0, got {self.alpha!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    def training_regulariser(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``alpha`` times the summed per-layer mean squared difference of activations on ``x`` and on ``x`` with
        the trigger (one forward pass over both); with ``objective="paired"``, plus the mean cross-entropy of the
        triggered copies against the target."""
        del y
        paired = self.objective == "paired"
        if self.alpha == 0 and not paired:
            return torch.zeros((), device=x.device)
        from ..models.activations import ACTIVATION_TYPES

        outputs: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o))
                   for m in model.modules() if isinstance(m, ACTIVATION_TYPES)] if self.alpha else []
        n = len(x)
        try:
            logits = model(torch.cat([x, self.apply(x).clamp(0, 1)]))
        finally:
            for h in handles:
                h.remove()
        loss = torch.zeros((), device=x.device)
        if self.alpha:
            loss = loss + self.alpha * sum(((o[:n] - o[n:]) ** 2).mean() for o in outputs)
        if paired:
            target = torch.full((n,), self.target, dtype=torch.long, device=x.device)
            loss = loss + F.cross_entropy(logits[n:], target)
        return loss
