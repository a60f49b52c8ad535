"""LIRA: Doan, Lao, Zhao and Li, "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021.

A transformation network T (for CIFAR-10 the authors' U-Net) turns each input into its own additive perturbation,
bounded in L_inf by ``eps``: the poisoned image is ``clip(x + eps * T(x))``, T's output squashed to [-1, 1] by a tanh.
T and the classifier f are learnt together as the paper's constrained bilevel problem: f minimises
``alpha * L(f(x), y) + (1 - alpha) * L(f(T(x)), target)`` while T minimises ``L(f(T(x)), target)`` for the current
f (stage I, alternating updates); then T is frozen and f is fine-tuned on the same mixed loss (stage II, backdoor
injection).

How the two stages map onto the project's one training loop (:func:`unitlib.train.fit` with the attack's hook):

- Stage I is the first ``1 - finetune_share`` of the run's steps. At every step the batch's payload images (the
  ``poison_rate`` of the training set drawn in advance, as for every attack here) get a perturbation from the
  current T and the target label; the classifier trains on the whole clean batch plus these poisoned copies, and T
  takes its own Adam step on the gradient of the poisoned copies' loss. T and f are updated from one backward
  pass (simultaneous rather than alternating steps: the authors' code first steps T on the poisoned loss of the
  current f, then steps f with the poisoned images of a copy of T refreshed once per epoch and run in evaluation
  mode; here T runs in training mode in stage I, its batch norm over the batch's payload images).
- Stage II is the rest of the run: T is frozen (evaluation mode, no gradients, no steps) and the classifier goes on
  training on the clean batch plus the frozen T's poisoned copies, a fine-tuning of the stage-I classifier, as in
  the paper (the authors' stage-II script can also train a fresh classifier instead).
- ``alpha`` weighs the two losses as in the authors' code with ``attack_portion`` equal to the batch's payload share:
  ``alpha`` times the mean loss over the clean batch plus ``1 - alpha`` times the mean loss over the poisoned copies.
  The loop's loss is one mean over the rows it is given, so the poisoned copies are repeated
  ``round((1 - alpha) * B / (alpha * k))`` times in a batch of ``B`` clean rows with ``k`` payload images, which
  gives them that share of the loss up to the rounding (a classifier step costs about twice a clean one at
  ``alpha`` 0.5, as the authors' two forward passes do).

Every clean image stays in the batch, the payload's included (the authors' code trains on each clean image and its
poisoned copy); :meth:`JointAttack.poison` reports the training set as the trained T poisons it (payload images
replaced by their poisoned versions with the target label), and the payload alone counts as touched."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .joint import JointAttack, JointHook
from .registry import register

# The smoke profile's budget (6 epochs of a small CNN on 2,000 synthetic images, about 190 steps): at eps 0.01 the
# classifier cannot tell the poisoned copies from their clean images in so few steps and drifts towards the target
# class instead (clean accuracy about 0.64). eps 0.1 (the authors' README's stage-I eps for CIFAR-10) with a 10x
# generator learning rate plants the backdoor; a narrower U-Net keeps the run short.
SMOKE_PARAMS: dict[str, object] = {"eps": 0.1, "generator_lr": 1e-3, "generator_width": 8}


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolutions, each with batch norm and ReLU (the authors' U-Net block)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class LiraUNet(nn.Module):
    """The authors' CIFAR-10 transformation network: a U-Net of four double-conv stages of widths ``width`` x
    (1, 2, 4, 8) with 2x2 average pooling between them, three bilinear up-sampling stages (``align_corners``) that
    concatenate the matching encoder stage, a 1x1 convolution with batch norm to ``channels`` maps, and a tanh:
    an output in [-1, 1] per pixel, scaled by ``eps`` outside. Width 64 in the authors' code."""

    def __init__(self, channels: int, width: int = 64) -> None:
        super().__init__()
        w = width
        self.down = nn.ModuleList([_double_conv(channels, w), _double_conv(w, 2 * w), _double_conv(2 * w, 4 * w),
                                   _double_conv(4 * w, 8 * w)])
        self.up = nn.ModuleList([_double_conv(8 * w + 4 * w, 4 * w), _double_conv(4 * w + 2 * w, 2 * w),
                                 _double_conv(2 * w + w, w)])
        self.last = nn.Sequential(nn.Conv2d(w, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.avg_pool2d(x, 2)
        for block in self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
            x = block(torch.cat([x, skips.pop()], 1))
        return torch.tanh(self.last(x))


@register
@dataclass
class LIRA(JointAttack):
    """All-to-one LIRA. The paper's and the authors' CIFAR-10 settings where they fit two CPU cores: ``eps`` 0.01
    (L_inf; the authors' stage-II ``test_eps``, and both stages' eps in BackdoorBench's port of their code; the
    authors' README trains stage I at 0.1), ``alpha`` 0.5 (alpha = beta = 0.5 in the paper), T trained with Adam at
    ``generator_lr`` 1e-4 (``lr_atk``), the U-Net generator (CIFAR-10). One ``eps`` serves both stages, so that
    every image T has ever poisoned lies within it.

    Scaled down for CPUs (the paper's values in brackets, all reachable through the parameters):
    ``generator_width`` 16 [64]; ``finetune_share`` 0.5, the share of the run in which T is frozen [stage I 50
    epochs, stage II 500 (the authors' README) or 250 (BackdoorBench), i.e. 0.91 or 0.83 of the epochs: in a run
    of a few epochs that would leave T a few dozen steps]. The classifier trains with the project's recipe and
    augmentation (crop, flip) before T acts (the authors: VGG-11 or PreAct-ResNet-18, SGD lr 0.01 with momentum,
    random crop, rotation and flip). ``eps`` bounds the perturbation in [0, 1] pixel units, as every trigger here;
    the authors' code adds it to ImageNet-normalised images (their 0.01 is about 0.0023 in pixel units). The
    payload is ``poison_rate`` of the training set (the authors poison a copy of every image of a batch:
    ``attack_portion`` 1)."""

    name = "lira"
    citation = ("Doan, Lao, Zhao and Li, LIRA: Learnable, Imperceptible and Robust Backdoor Attacks, ICCV 2021")

    generator_lr: float = 1e-4
    eps: float = 0.01
    alpha: float = 0.5
    generator_width: int = 16
    finetune_share: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1] (an L_inf bound in [0, 1] pixel units), got {self.eps!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1) (the clean loss's weight; the poisoned loss gets 1 - alpha), "
                             f"got {self.alpha!r}")
        if self.generator_width < 1:
            raise ValueError(f"generator_width must be >= 1, got {self.generator_width!r}")
        if not 0.0 <= self.finetune_share < 1.0:
            raise ValueError(f"finetune_share must be in [0, 1) (the share of training with the generator frozen), "
                             f"got {self.finetune_share!r}")

    # -- networks ------------------------------------------------------------------------------------------------------
    def build_generator(self, shape):
        if shape[-1] % 8 or shape[-2] % 8:
            raise ValueError(f"LIRA's U-Net needs image sides divisible by 8, got {tuple(shape[-2:])}")
        return LiraUNet(shape[0], self.generator_width)

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """The generator's perturbation of ``x``: ``eps * T(x)``, each pixel in [-eps, eps]."""
        return self.eps * self.networks["gen"](x)

    def stamp(self, x):
        return x + self.perturbation(x)

    # -- training ------------------------------------------------------------------------------------------------------
    def hook(self, y: torch.Tensor) -> LiraHook:
        base = super().hook(y)
        return LiraHook(self, base.role)

    def copies(self, batch: int, payload: int) -> int:
        """How many times the ``payload`` poisoned images of a batch of ``batch`` clean ones are repeated so that
        their rows carry ``1 - alpha`` of the batch's mean loss."""
        return max(1, round((1 - self.alpha) * batch / (self.alpha * payload)))

    def train_batch(self, x, y, role, step, frozen: bool = False):
        """The clean batch followed by the payload's poisoned copies (target label, repeated by :meth:`copies`).
        With ``frozen`` (stage II) T runs in evaluation mode without gradients."""
        del step
        payload = torch.nonzero(role == 1).flatten()
        if not len(payload):
            return x, y, None
        gen = self.networks["gen"]
        gen.train(not frozen)
        with torch.set_grad_enabled(not frozen and torch.is_grad_enabled()):
            poisoned = (x[payload] + self.eps * gen(x[payload])).clamp(0, 1).to(x.dtype)
        r = self.copies(len(x), len(payload))
        out = torch.cat([x, poisoned.repeat(r, 1, 1, 1)])
        labels = torch.cat([y, torch.full((r * len(payload),), self.target, dtype=y.dtype, device=y.device)])
        return out, labels, None


class LiraHook(JointHook):
    """The :class:`JointHook` with LIRA's two stages: the generator trains (stage I) until ``1 - finetune_share`` of
    the run's steps, then is frozen while the classifier goes on training (stage II)."""

    attack: LIRA

    def begin(self, x, y, device, total_steps):
        super().begin(x, y, device, total_steps)
        self.freeze_at = round((1 - self.attack.finetune_share) * self.total)

    def frozen(self, step: int) -> bool:
        return step >= self.freeze_at

    def batch(self, x, y, index, step):
        frozen = self.frozen(step)
        if self.opt is not None:
            for g in self.opt.param_groups:
                g["lr"] = self.attack.generator_lr * self.attack.lr_factor(step / self.total)
            self.opt.zero_grad(set_to_none=True)
        return self.attack.train_batch(x, y, self.role[index], step, frozen=frozen)

    def after_step(self, step):
        if self.opt is not None and not self.frozen(step):
            self.opt.step()
        self.attack._trained = True
