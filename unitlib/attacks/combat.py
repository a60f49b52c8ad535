"""COMBAT: Huynh, Nguyen, Pham and Tran, "COMBAT: Alternated Training for Effective Clean-Label Backdoor Attacks",
AAAI 2024. Clean-label: a trigger generator G makes an input-specific, low-frequency, L-inf-bounded additive trigger,
``x + eps * lowpass(G(x))``. G is trained in alternation with a surrogate classifier C learnt from scratch: in every
batch C takes one step on the clean images plus a share of the target-class images carrying G's trigger (all with
their true labels, so the poisons are clean-label), then G takes one step to make its triggers send every image of
the batch to the target class on C, while a small L2 term keeps the poisoned image close to the clean one and the
attacker's pre-trained clean model must still classify the poisoned images by their true labels (so that the trigger
carries no target-class features of its own and the backdoor is one that only training on the poisons plants).
Afterwards ``poison_rate`` of the training set, target-class images only, carries G's trigger, and at test time any
image does."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import data, models
from ..train import augment
from .registry import register
from .surrogate import ModelAttack

# The learning rates of G and C drop 10x at these fractions of the alternated training (the authors' code: epochs
# 100 and 150 of 200).
MILESTONES = (0.5, 0.75)


class CombatGenerator(nn.Module):
    """The authors' U-Net trigger generator: ``levels`` encoder stages (a stride-2 3x3 convolution, then a 3x3
    convolution, each but the very first followed by instance norm; LeakyReLU 0.2 before every convolution but the
    first) with widths ``width * 2**i``, then as many decoder stages (bilinear 2x upsampling and two 3x3 convolutions
    with instance norm), each added to the encoder's output of the same size, and a last 3x3 convolution to the image's
    channels squashed by tanh into [-1, 1]. The authors' CIFAR-10 generator: width 64, four levels."""

    def __init__(self, channels: int, width: int = 64, levels: int = 4) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(levels)]
        self.act = nn.LeakyReLU(0.2)
        self.down = nn.ModuleList()
        c_in = channels
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleDict({
                "reduce": nn.Conv2d(c_in, w, 3, stride=2, padding=1),
                "reduce_norm": nn.Identity() if i == 0 else nn.InstanceNorm2d(w),
                "conv": nn.Conv2d(w, w, 3, padding=1),
                "conv_norm": nn.InstanceNorm2d(w),
            }))
            c_in = w
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            w, w_out = widths[i], widths[i - 1] if i > 0 else widths[0]
            self.up.append(nn.ModuleDict({
                "conv": nn.Conv2d(w, w, 3, padding=1), "conv_norm": nn.InstanceNorm2d(w),
                "expand": nn.Conv2d(w, w_out, 3, padding=1), "expand_norm": nn.InstanceNorm2d(w_out),
            }))
        self.out = nn.Conv2d(widths[0], channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.down):
            x = stage["reduce_norm"](stage["reduce"](x if i == 0 else self.act(x)))
            x = stage["conv_norm"](stage["conv"](self.act(x)))
            skips.append(x)
        skips.pop()  # the deepest stage's output is the decoder's input, not a skip
        for stage in self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = stage["conv_norm"](stage["conv"](self.act(x)))
            x = stage["expand_norm"](stage["expand"](self.act(x)))
            if skips:
                x = x + skips.pop()
        return torch.tanh(self.out(self.act(x)))


@functools.lru_cache(maxsize=8)
def _dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix of size n (rows: frequencies)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


@functools.lru_cache(maxsize=8)
def _lowpass_matrix(n: int, keep: int) -> torch.Tensor:
    """The projection onto the ``keep`` lowest DCT frequencies of a length-n signal: D^T diag(mask) D."""
    d = _dct_matrix(n)
    return (d[:keep].T @ d[:keep]).float()


def lowpass(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the lowest ``ratio`` of the 2-D DCT frequencies along each side of ``x`` (N x C x H x W), zero the
    rest (the authors' ``low_freq``: a DCT, a mask on the top-left ``int(side * ratio)`` square, the inverse DCT).
    Linear, so gradients pass through it."""
    h, w = x.shape[-2:]
    rows = _lowpass_matrix(h, max(1, int(h * ratio))).to(x)
    cols = _lowpass_matrix(w, max(1, int(w * ratio))).to(x)
    return rows @ x @ cols


@register
@dataclass
class Combat(ModelAttack):
    """The authors' CIFAR-10 defaults where they fit: trigger strength ``eps`` 0.04 in pixel units (their
    ``noise_rate`` 0.08 on images scaled to [-1, 1]), the trigger low-passed to the lowest ``low_freq_ratio`` 0.65 of
    the DCT frequencies per side, ``target_share`` 0.5 (their ``pc``: the share of each batch's target-class images that
    carry the trigger in C's step; half of CIFAR-10's target class is 5% of the training set, the class default
    ``poison_rate``), G's loss ``CE(C(x_bd), target) + l2_weight * MSE(x_bd, x) + clean_weight * CE(F(x_bd), y)``
    with F the attacker's clean model, ``clean_weight`` 0.8 and ``l2_weight`` 0.08 on [0, 1] pixels (their 0.02 on
    [-1, 1] images), SGD (momentum 0.9, Nesterov, weight decay 5e-4) at ``generator_lr`` 0.01 for G and
    ``classifier_lr`` 0.01 for C, both 10x lower after half and three quarters of training, batches of 128.

    Scaled for two CPU cores (the paper's values in brackets, all reachable through the parameters):
    ``generator_width`` 16 [64], ``generator_epochs`` 10 [200] of alternated training on a class-balanced subset of
    ``generator_size`` 10000 images [the whole training set: None]. C and the clean model F are the project's small
    CNN of ``surrogate_width`` [PreAct-ResNet-18]; F is the attacker's cached clean model (``surrogate_*``, trained
    with the project's recipe; theirs: 200 epochs), C starts from scratch. Augmentation is the project's crop and
    flip [theirs adds a random rotation of up to 10 degrees].

    One change keeps the bound exact: the low-passed trigger is clipped to [-1, 1] before it is scaled by ``eps``
    (a low-pass of a signal in [-1, 1] can overshoot), so every poisoned pixel is within ``eps`` of the clean one. The
    authors' code also blurs the whole poisoned image (3x3 Gaussian, sigma drawn from [0.1, 1]) at every use; that
    blur is left out, since it moves pixels by more than the bound at edges and the DCT low-pass already removes the
    trigger's high frequencies. The trigger is the same at poisoning and test time."""

    name = "combat"
    clean_label = True
    citation = ("Huynh, Nguyen, Pham and Tran, COMBAT: Alternated Training for Effective Clean-Label Backdoor "
                "Attacks, AAAI 2024")

    poison_rate: float = 0.05
    eps: float = 0.04
    low_freq_ratio: float = 0.65
    target_share: float = 0.5
    clean_weight: float = 0.8
    l2_weight: float = 0.08
    generator_lr: float = 0.01
    classifier_lr: float = 0.01
    generator_width: int = 16
    generator_epochs: int = 10
    generator_size: int | None = 10000
    batch_size: int = 128

    LEVELS = 4  # the authors' U-Net depth: image sides must be divisible by 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1] (L-inf bound in pixel units), got {self.eps!r}")
        if not 0.0 < self.low_freq_ratio <= 1.0:
            raise ValueError(f"low_freq_ratio must be in (0, 1] (share of DCT frequencies kept), got "
                             f"{self.low_freq_ratio!r}")
        if not 0.0 < self.target_share <= 1.0:
            raise ValueError(f"target_share must be in (0, 1], got {self.target_share!r}")
        for key in ("clean_weight", "l2_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("generator_lr", "classifier_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if self.generator_width < 1:
            raise ValueError(f"generator_width must be >= 1, got {self.generator_width!r}")
        for key in ("generator_epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        if self.generator_size is not None and self.generator_size < 2:
            raise ValueError(f"generator_size must be >= 2 or None (the whole training set), got "
                             f"{self.generator_size!r}")

    # -- networks --------------------------------------------------------------------------------------------------
    def _check_shape(self, shape: tuple[int, ...]) -> None:
        side = 2**self.LEVELS
        if shape[-1] % side or shape[-2] % side:
            raise ValueError(f"COMBAT's generator needs image sides divisible by {side}, got {tuple(shape[-2:])}")

    def build_generator(self, channels: int) -> CombatGenerator:
        return CombatGenerator(channels, self.generator_width, self.LEVELS)

    def build_classifier(self, channels: int, num_classes: int) -> nn.Module:
        return models.build("small-cnn", num_classes=num_classes, in_channels=channels, width=self.surrogate_width)

    def _part(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in self._state.items() if k.startswith(prefix)}

    def network(self) -> CombatGenerator:
        """The trained trigger generator G (eval mode, on the CPU)."""
        self.require_prepared()
        if getattr(self, "_net_for", None) is not self._state:
            net = self.build_generator(int(self._state["channels"]))
            net.load_state_dict(self._part("generator."))
            self._net, self._net_for = net.eval(), self._state
        return self._net

    def classifier(self) -> nn.Module:
        """The surrogate classifier C trained in alternation with G (eval mode, on the CPU)."""
        self.require_prepared()
        state = self._part("classifier.")
        net = self.build_classifier(int(self._state["channels"]), state["net.linear.weight"].shape[0])
        net.load_state_dict(state)
        return net.eval()

    # -- the trigger -----------------------------------------------------------------------------------------------
    def _perturbation(self, generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``eps`` times G's low-passed output, clipped to [-1, 1] first: within [-eps, eps]."""
        return self.eps * lowpass(generator(x), self.low_freq_ratio).clamp(-1, 1)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The additive trigger G makes for each image of ``x`` (within [-eps, eps]), before clipping to [0, 1]."""
        self._check_shape(tuple(x.shape))
        net = self.network().to(x.device)
        with torch.no_grad():
            return torch.cat([self._perturbation(net, x[i : i + 512]) for i in range(0, len(x), 512)]) if len(x) \
                else torch.zeros_like(x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.trigger(x)).clamp(0, 1)

    # -- the alternated training -----------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, y: torch.Tensor, *, device=None, progress: bool = False) -> None:
        # checked before the clean model is trained, not after
        self._check_shape(tuple(x.shape))
        if self.target <= int(y.max()) and not (y == self.target).any():
            raise ValueError(f"COMBAT needs target-class ({self.target}) images to train its generator")
        super().prepare(x, y, device=device, progress=progress)

    def learn(self, model, x, y, device):
        g = self.generator(salt=83)
        if self.generator_size is not None and self.generator_size < len(y):
            idx = data.balanced_subset(y, self.generator_size, g)
            x, y = x[idx], y[idx]
        channels, num_classes = x.shape[1], int(y.max()) + 1
        with torch.random.fork_rng(devices=[]):  # initial weights from the seed alone
            torch.manual_seed(self.seed * 1_000_003 + 89)
            gen = self.build_generator(channels).to(device)
            clf = self.build_classifier(channels, num_classes).to(device)
        sgd = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)
        opt_g = torch.optim.SGD(gen.parameters(), lr=self.generator_lr, **sgd)
        opt_c = torch.optim.SGD(clf.parameters(), lr=self.classifier_lr, **sgd)
        n, bs = len(x), min(self.batch_size, len(x))
        steps = max(1, n // bs)  # full batches only (batch norm in C)
        for epoch in range(self.generator_epochs):
            decay = 0.1 ** sum(epoch >= m * self.generator_epochs for m in MILESTONES)
            for opt, lr in ((opt_g, self.generator_lr), (opt_c, self.classifier_lr)):
                for group in opt.param_groups:
                    group["lr"] = lr * decay
            perm = torch.randperm(n, generator=g)
            for i in range(steps):
                sel = perm[i * bs : (i + 1) * bs]
                xb, yb = x[sel].to(device), y[sel].to(device)
                # C's step: the clean batch, a share of its target-class images carrying G's trigger, true labels
                chosen = ((y[sel] == self.target) & (torch.rand(len(sel), generator=g) < self.target_share)).to(device)
                gen.eval()
                clf.train()
                with torch.no_grad():
                    poisoned = torch.where(chosen[:, None, None, None],
                                           (xb + self._perturbation(gen, xb)).clamp(0, 1), xb)
                loss_c = F.cross_entropy(clf(augment(poisoned, 4, True, g)), yb)
                opt_c.zero_grad(set_to_none=True)
                loss_c.backward()
                opt_c.step()
                # G's step: every image of the batch with its trigger goes to the target on C; the clean model
                # still sees its true class; the poisoned image stays close to the clean one
                gen.train()
                clf.eval().requires_grad_(False)
                x_bd = (xb + self._perturbation(gen, xb)).clamp(0, 1)
                seen = augment(x_bd, 4, True, g)
                loss_g = (F.cross_entropy(clf(seen), torch.full_like(yb, self.target))
                          + self.l2_weight * F.mse_loss(x_bd, xb)
                          + self.clean_weight * F.cross_entropy(model(seen), yb))
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                clf.requires_grad_(True)
        state = {f"generator.{k}": v.detach().cpu() for k, v in gen.state_dict().items()}
        state.update({f"classifier.{k}": v.detach().cpu() for k, v in clf.state_dict().items()})
        state["channels"] = torch.tensor(channels)
        return state


# For the book's smoke profile (2,000 synthetic images, a small CNN of width 8 trained for 6 epochs): a narrower
# generator, 10x the paper's learning rates (150 alternated steps instead of 78,000) and a stronger trigger. At the
# paper's strength (eps 0.04) the 100 poisons of the smoke set carry a trigger the smoke model does not learn
# (ASR 2-4%, as low as a clean model's).
SMOKE_PARAMS: dict[str, object] = {"generator_width": 8, "generator_lr": 0.1, "classifier_lr": 0.05, "eps": 0.1}
