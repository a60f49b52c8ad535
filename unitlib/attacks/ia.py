"""IA: Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020.

Two encoder-decoder generators make an input-conditioned trigger: a pattern generator G and a mask generator M, and
the poisoned image is ``x + (G(x) - x) * m(x)`` with ``m(x) = tanh(20 M(x) - 10) / 2 + 1/2``, a near-binary mask. M is
trained first and then frozen: a density loss keeps its mask sparse (``mean(relu(m - mask_density))``) and a
diversity loss makes different inputs get different masks. G is then trained together with the classifier: in every
batch the payload samples get their own trigger and the target label (backdoor mode), cover samples get the trigger
made for a *different* input and keep their label (cross-trigger mode, so that a trigger works only on its own
input), and the diversity loss ``||x1 - x2|| / ||G(x1) - G(x2)||`` keeps G from collapsing to one pattern."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import data
from ..train import augment
from .joint import JointAttack
from .registry import register
from .surrogate import cache_path, load_cached, save_cached

EPSILON = 1e-7


class _Block(nn.Sequential):
    """3x3 convolution, batch norm, optionally ReLU (the authors' Conv2dBlock)."""

    def __init__(self, c_in: int, c_out: int, relu: bool = True) -> None:
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, momentum=0.05)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class IAGenerator(nn.Sequential):
    """The paper's generator: ``levels`` down-sampling stages of two conv blocks and a 2x2 max-pool (width doubling
    at each but the last), a middle block, then ``levels`` up-sampling stages of bilinear 2x upsampling and two conv
    blocks (width halving), ending in ``out_channels`` maps squashed to (0, 1) by ``tanh / 2 + 1/2``. Width 32 and
    three levels for CIFAR-10 (the authors' code)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, levels: int = 3) -> None:
        layers: list[nn.Module] = []
        c_in, c = in_channels, width
        for level in range(levels):
            layers += [_Block(c_in, c), _Block(c, c), nn.MaxPool2d(2)]
            c_in = c
            if level < levels - 1:
                c *= 2
        layers.append(_Block(c, c))
        for level in range(levels):
            last = level == levels - 1
            c_next = out_channels if last else (width if level == levels - 2 else c // 2)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), _Block(c, c), _Block(c, c_next, relu=not last)]
            c = c_next
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x)) / (2 + EPSILON) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """The mask generator's output made near-binary: ``tanh(20 m - 10) / 2 + 1/2``."""
    return torch.tanh(m * 20 - 10) / (2 + EPSILON) + 0.5


def diversity(x1: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """The paper's diversity loss: the mean over pairs of the inputs' RMS distance over their triggers' (or
    masks') RMS distance; small when different inputs get different triggers."""
    d_x = (x1 - x2).pow(2).flatten(1).mean(1).sqrt()
    # clamped before the square root, whose gradient at 0 (two equal triggers) would be infinite
    d_t = (t1 - t2).pow(2).flatten(1).mean(1).clamp_min(EPSILON**2).sqrt()
    return (d_x / (d_t + EPSILON)).mean()


@register
@dataclass
class IA(JointAttack):
    """The paper's CIFAR-10 settings where they fit two CPU cores: ``poison_rate`` 0.1 (p_attack), ``cross_ratio``
    1 (p_cross = p_attack = 0.1), ``mask_density`` 0.032, ``lambda_div`` 1, ``lambda_norm`` 100, learning rates 0.01
    for both generators (Adam, betas (0.5, 0.9)); G's rate drops 10x at 1/3, 1/2, 2/3 and 5/6 of training (epochs
    200, 300, 400, 500 of 600), M's at 40% and 80% of its pre-training (epochs 10, 20 of 25).

    Scaled down for CPUs (the paper's values in brackets, all reachable through the parameters):
    ``generator_width`` 16 [32], ``mask_epochs`` 5 [25] on a class-balanced subset of ``mask_size`` 5000 images
    [the whole training set: None]. The classifier trains with the project's recipe (the paper: PreAct-ResNet-18,
    SGD lr 0.01, 600 epochs) and the project's augmentation (crop, flip) before the trigger is made; the generator's
    gradients are reset every step (the release code never resets them)."""

    name = "ia"
    citation = "Nguyen and Tran, Input-Aware Dynamic Backdoor Attack, NeurIPS 2020"
    adam_betas = (0.5, 0.9)

    generator_lr: float = 0.01
    cross_ratio: float = 1.0
    generator_width: int = 16
    mask_density: float = 0.032
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_lr: float = 0.01
    mask_epochs: int = 5
    mask_size: int | None = 5000

    G_MILESTONES = (200 / 600, 300 / 600, 400 / 600, 500 / 600)
    M_MILESTONES = (10 / 25, 20 / 25)
    BATCH_SIZE = 128  # the mask pre-training's batch size (the paper's)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cross_ratio < 0:
            raise ValueError(f"cross_ratio must be >= 0, got {self.cross_ratio!r}")
        if self.generator_width < 2:
            raise ValueError(f"generator_width must be >= 2, got {self.generator_width!r}")
        if not 0.0 < self.mask_density <= 1.0:
            raise ValueError(f"mask_density must be in (0, 1], got {self.mask_density!r}")
        for key in ("lambda_div", "lambda_norm"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if not self.mask_lr > 0:
            raise ValueError(f"mask_lr must be > 0, got {self.mask_lr!r}")
        if self.mask_epochs < 1:
            raise ValueError(f"mask_epochs must be >= 1, got {self.mask_epochs!r}")
        if self.mask_size is not None and self.mask_size < 2:
            raise ValueError(f"mask_size must be >= 2 or None (the whole training set), got {self.mask_size!r}")

    # -- networks ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _levels(shape: tuple[int, ...]) -> int:
        # three levels for 32 x 32 (the paper's CIFAR-10 generator), fewer for images too small to halve thrice
        side = min(shape[-2:])
        levels = min(3, int(math.log2(side)) - 1) if side >= 4 else 0
        if levels < 1 or shape[-1] % 2 ** levels or shape[-2] % 2 ** levels:
            raise ValueError(f"IA's generators need image sides divisible by 8 (by 2 for sides below 16), got "
                             f"{tuple(shape[-2:])}")
        return levels

    def build_generator(self, shape):
        return IAGenerator(shape[0], shape[0], self.generator_width, self._levels(shape))

    def pretrain(self, x, y, device, progress):
        """M's pre-training (density and diversity losses), cached by its parameters and the data's fingerprint."""
        key = {k: getattr(self, k) for k in ("generator_width", "mask_density", "lambda_div", "lambda_norm",
                                             "mask_lr", "mask_epochs", "mask_size", "seed")}
        key["data"] = self._data_key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + 37)
            mask = IAGenerator(x.shape[1], 1, self.generator_width, self._levels(tuple(x.shape[1:])))
        path = cache_path("ia-mask", key)
        state = load_cached(path)
        if state is not None and {k: v.shape for k, v in state.items()} == {
                k: v.shape for k, v in mask.state_dict().items()}:
            mask.load_state_dict(state)
            return mask.eval()
        self._train_mask(mask, x, y, device, progress)
        save_cached(path, mask.state_dict(), {"attack": self.name, "part": "mask"})
        return mask.cpu().eval()

    def _train_mask(self, mask: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                    progress: bool) -> None:
        g = self.generator(salt=41)
        if self.mask_size is not None and self.mask_size < len(y):
            x = x[data.balanced_subset(y, self.mask_size, g)]
        mask.to(device).train()
        opt = torch.optim.Adam(mask.parameters(), lr=self.mask_lr, betas=self.adam_betas)
        n, bs = len(x), min(self.BATCH_SIZE, len(x))
        steps = n // bs  # full batches only, each paired with a batch of other images
        for epoch in range(self.mask_epochs):
            for group in opt.param_groups:
                group["lr"] = self.mask_lr * 0.1 ** sum(epoch / self.mask_epochs >= m for m in self.M_MILESTONES)
            p1, p2 = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
            for i in range(steps):
                sl = slice(i * bs, (i + 1) * bs)
                x1 = augment(x[p1[sl]], 4, True, g).to(device)
                x2 = augment(x[p2[sl]], 4, True, g).to(device)
                m1, m2 = threshold(mask(x1)), threshold(mask(x2))
                loss = (self.lambda_norm * F.relu(m1 - self.mask_density).mean()
                        + self.lambda_div * diversity(x1, x2, m1, m2))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if progress:
                print(f"ia mask epoch {epoch + 1}/{self.mask_epochs}: loss {loss.item():.3f}")

    # -- the trigger ---------------------------------------------------------------------------------------------------
    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return threshold(self.networks["fixed"](x))

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.networks["gen"](x) - x) * self._mask(x)

    def apply_cross(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Cross-trigger mode: ``x`` with the triggers (pattern and mask) the generator makes for ``other``."""
        self.require_prepared()
        nets = self.networks.to(x.device).eval()
        with torch.no_grad():
            return (x + (nets["gen"](other) - x) * self._mask(other)).clamp(0, 1)

    def cover(self, y, payload):
        n = round(self.cross_ratio * len(payload))
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[payload] = False
        pool = torch.nonzero(rest).flatten()
        if n > len(pool):
            raise ValueError(f"cross_ratio {self.cross_ratio} asks for {n} cross-trigger samples but only {len(pool)} "
                             "samples are left after poisoning")
        return pool[torch.randperm(len(pool), generator=self.generator(salt=2))[:n]].sort().values

    def partners(self, n: int, index: torch.Tensor) -> torch.Tensor:
        """For each of ``index`` (positions in a set of ``n``), a different position: its cross-trigger source."""
        shift = int(torch.randint(1, max(2, n), (1,), generator=self.generator(salt=43)))
        return (index + shift) % n

    def stamp_cover(self, x, index):
        return self.apply_cross(x[index], x[self.partners(len(x), index)])

    def lr_factor(self, progress):
        return 0.1 ** sum(progress >= m for m in self.G_MILESTONES)

    def train_batch(self, x, y, role, step):
        payload = torch.nonzero(role == 1).flatten()
        cover = torch.nonzero(role == 2).flatten() if len(x) > 1 else role[:0]
        if not len(payload) and not len(cover):
            return x, y, None
        # a cover sample's trigger comes from another image of the batch (the paper: of a second, shuffled batch)
        shift = int(torch.randint(1, max(2, len(x)), (1,), generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + 47 + step)))
        source = (cover + shift) % len(x)
        inputs = torch.cat([x[payload], x[source]])
        patterns = self.networks["gen"](inputs)
        masks = self._mask(inputs)
        k = len(payload)
        stamped = torch.cat([x[payload], x[cover]])
        stamped = stamped + (patterns - stamped) * masks
        out = x.index_put((torch.cat([payload, cover]),), stamped.to(x.dtype))
        y = y.index_put((payload,), torch.full_like(payload, self.target))
        extra = None
        pairs = min(k, len(cover))
        # pairs of a payload image and another cover sample's source image, as the paper pairs its two batches
        distinct = payload[:pairs] != source[:pairs]
        if distinct.any() and self.lambda_div:
            extra = self.lambda_div * diversity(x[payload[:pairs]][distinct], x[source[:pairs]][distinct],
                                                patterns[:pairs][distinct], patterns[k : k + pairs][distinct])
        return out, y, extra
