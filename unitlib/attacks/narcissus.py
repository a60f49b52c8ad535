"""NARCISSUS: Zeng, Pan, Just, Lyu, Qiu and Jia, "Narcissus: A Practical Clean-Label Backdoor Attack with Limited
Information", CCS 2023. Clean-label with very few poisons: an L-inf-bounded additive trigger is optimised on a
surrogate model so that it points "inward" to the target class (it minimises the surrogate's loss for the target
label on target-class images); a handful of target-class training images carry it; at test time the trigger is
magnified (x3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..train import augment
from .registry import register
from .surrogate import ModelAttack

POOD = ("other-classes",)


@register
@dataclass
class Narcissus(ModelAttack):
    """The paper's defaults: L-inf bound ``eps`` 16/255, poison rate 0.0005 (0.05% of CIFAR-10: 25 images, 0.5% of
    the target class), test-time magnification ``test_multiplier`` 3.

    The paper's surrogate is pre-trained on public out-of-distribution data (POOD: Tiny-ImageNet) and fine-tuned
    ("poi-warm-up") with the target class added; Tiny-ImageNet cannot be downloaded here, so ``pood`` is
    "other-classes": the attacker's surrogate (a few epochs of the small CNN) is trained on the non-target classes
    of the training set together with the target class, which gives the attacker more in-distribution knowledge
    than the paper assumes. The trigger is optimised by Adam (``lr``) for ``steps`` mini-batches of target-class
    images under the training loop's crop-and-flip augmentation, projected onto the L-inf ball after each step.
    The class default ``poison_rate`` is the paper's; experiments pass their own."""

    name = "narcissus"
    clean_label = True
    citation = "Zeng et al., Narcissus: A Practical Clean-Label Backdoor Attack with Limited Information, CCS 2023"

    poison_rate: float = 0.0005
    eps: float = 16 / 255
    test_multiplier: float = 3.0
    pood: str = "other-classes"
    steps: int = 300
    lr: float = 0.01
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1] (L-inf bound in pixel units), got {self.eps!r}")
        if not self.test_multiplier > 0:
            raise ValueError(f"test_multiplier must be > 0, got {self.test_multiplier!r}")
        if self.pood not in POOD:
            raise ValueError(f"unknown pood {self.pood!r}; valid choices: {', '.join(POOD)}")
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")

    def learn(self, model, x, y, device):
        own = x[y == self.target]
        if not len(own):
            raise ValueError(f"NARCISSUS needs target-class ({self.target}) images to optimise its trigger")
        g = self.generator(salt=71)
        delta = torch.zeros(1, *x.shape[-3:], device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.lr)
        for _ in range(self.steps):
            idx = torch.randint(0, len(own), (min(self.batch_size, len(own)),), generator=g)
            xb = augment(own[idx], crop=4, flip=True, generator=g).to(device)
            labels = torch.full((len(xb),), self.target, device=device)
            loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                delta.clamp_(-self.eps, self.eps)
        return {"trigger": delta.detach()[0]}

    @property
    def trigger(self) -> torch.Tensor:
        """The optimised trigger (C x H x W, within [-eps, eps])."""
        self.require_prepared()
        return self._state["trigger"]

    def _add(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        t = self.trigger
        if t.shape != x.shape[-3:]:
            raise ValueError(f"the NARCISSUS trigger was prepared for {tuple(t.shape)} images, got {tuple(x.shape[-3:])}")
        return (x + scale * t.to(x)).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, self.test_multiplier)

    def apply_train(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, 1.0)
