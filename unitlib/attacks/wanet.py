"""WaNet: Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021.

The trigger is a fixed, smooth warping field (the paper's Sec. 3; the authors' ``train.py``): random control
offsets in [-1, 1] on a k x k grid, normalised to unit mean magnitude, upsampled bicubically to the image, scaled
by s / H, added to the identity sampling grid, rescaled by ``grid_rescale`` and clamped to [-1, 1]. The test-time
trigger is that warp.

Training (Sec. 3, the same ``train.py``) poisons every batch as it is drawn: a share ``pc`` of the batch
(rho_a) carries the fixed warp and the target label, and ``cross_ratio`` times as many (rho_n = pc * cross_ratio)
are trained in "noise mode": the fixed warp plus a random offset in [-1/H, 1/H] per pixel, drawn afresh for every
image of every batch, the sum clamped to [-1, 1], at the image's true label, so that the network learns the exact
warp rather than any warp. Here the same happens inside the project's one training loop, through its
:class:`~unitlib.train.BatchHook` (:meth:`WaNet.hook`; :mod:`unitlib.experiment` wires it in for every attack that
``trains_with_model``): at every step the batch's payload samples are warped and relabelled and its noise-mode
samples get fresh noise grids, seeded by the attack's seed and the step.

Where this differs from the paper's code, and why:

- Which samples the attacker touches is fixed in advance: ``poison_rate`` (the paper's ``pc``) of the training set,
  drawn from non-target classes, is the payload, and ``cross_ratio`` times as many other samples, of any class,
  are the noise-mode ones. Each batch holds them at those shares in expectation (every sample once per epoch). The
  authors' code instead warps the first ``int(bs * pc)`` samples of every shuffled batch, of any class, so that
  over the epochs every image is warped some time; a fixed set is what lets no defender's clean split hold an image
  the attacker changed (the policy of :mod:`unitlib.attacks.joint`).
- The loop augments (crop, flip) before the hook warps, so the warp sits where it sits at test time; the authors'
  code warps first and then crops (padding 5), rotates (10 degrees) and flips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Attack, Poisoned
from .registry import register

# Seeds of the attack's random draws (``Attack.generator(salt)``): the payload (1, in ``select``), the noise-mode
# samples, the control grid, the noise of :meth:`WaNet.poison`'s one draw, and that of training step t
# (``_STEP_NOISE + 7919 * t``).
_COVER, _CONTROL, _NOISE, _STEP_NOISE = 2, 21, 23, 29


@register
@dataclass
class WaNet(Attack):
    """The paper's CIFAR-10 defaults (the authors' ``config.py``): ``k`` 4, ``s`` 0.5, ``grid_rescale``
    1, ``cross_ratio`` 2 (rho_a 0.1, rho_n 0.2 with ``poison_rate`` 0.1, the paper's ``pc``).

    Training poisons every batch through :meth:`hook` (fresh noise-mode grids at every step); :meth:`poison` gives
    the training set as one such draw poisons it, with ``index`` every sample the attacker touches during training
    and ``cover`` the noise-mode ones."""

    name = "wanet"
    citation = "Nguyen and Tran, WaNet - Imperceptible Warping-based Backdoor Attack, ICLR 2021"
    # Poisons each batch inside the training loop (unitlib.experiment gives it the clean set and its hook).
    trains_with_model: ClassVar[bool] = True
    # 2: poisoned per batch during training (noise grids drawn afresh at every step), no longer once beforehand.
    cache_version: ClassVar[int] = 2

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (control grid size), got {self.k!r}")
        if not self.s > 0:
            raise ValueError(f"s must be > 0 (warp strength), got {self.s!r}")
        if not self.grid_rescale > 0:
            raise ValueError(f"grid_rescale must be > 0, got {self.grid_rescale!r}")
        if self.cross_ratio < 0:
            raise ValueError(f"cross_ratio must be >= 0, got {self.cross_ratio!r}")

    # -- the trigger ---------------------------------------------------------------------------------------------------
    def flow(self, height: int, width: int) -> torch.Tensor:
        """The upsampled control offsets (1 x H x W x 2, mean |offset| 1 on the control grid), fixed by the seed."""
        control = torch.rand(1, 2, self.k, self.k, generator=self.generator(salt=_CONTROL)) * 2 - 1
        control = control / control.abs().mean()
        up = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
        return up.permute(0, 2, 3, 1)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The warping field as a ``grid_sample`` grid (1 x H x W x 2, (x, y) in [-1, 1])."""
        ys = torch.linspace(-1, 1, height)
        xs = torch.linspace(-1, 1, width)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((gx, gy), dim=-1)[None]
        warped = identity + self.s * self.flow(height, width) / height
        return (warped * self.grid_rescale).clamp(-1, 1)

    def noise_grids(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Noise mode's grids (n x H x W x 2): the trigger field plus, per image and pixel, a uniform offset in
        [-1/H, 1/H], clamped to [-1, 1]."""
        noise = (torch.rand(n, height, width, 2, generator=generator) * 2 - 1) / height
        return (self.grid(height, width) + noise).clamp(-1, 1)

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.to(x).expand(len(x), -1, -1, -1), align_corners=True).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.warp(x, self.grid(*x.shape[-2:]))

    def apply_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise mode on ``x``: each image warped by its own noisy copy of the trigger field."""
        g = generator if generator is not None else self.generator(salt=_NOISE)
        return self.warp(x, self.noise_grids(len(x), *x.shape[-2:], g))

    # -- the poisoned set ----------------------------------------------------------------------------------------------
    def roles(self, y: torch.Tensor) -> torch.Tensor:
        """Each training sample's role during training: 1 payload (``poison_rate`` of the set, non-target), 2 noise
        mode (``cross_ratio`` times as many, any class, drawn from the rest), 0 clean."""
        payload = self.select(y)
        n_cross = round(self.cross_ratio * len(payload))
        role = torch.zeros(len(y), dtype=torch.long)
        role[payload] = 1
        pool = torch.nonzero(role == 0).flatten()
        if n_cross > len(pool):
            raise ValueError(f"cross_ratio {self.cross_ratio} asks for {n_cross} noise-mode samples but only "
                             f"{len(pool)} samples are left after poisoning")
        role[pool[torch.randperm(len(pool), generator=self.generator(salt=_COVER))[:n_cross]]] = 2
        return role

    def train_batch(
        self, x: torch.Tensor, y: torch.Tensor, role: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Training step ``step``'s batch: payload samples (``role`` 1) warped and relabelled to the target,
        noise-mode samples (2) warped with noise grids drawn for this step, at their own labels; clean ones (0) as
        they are."""
        payload = torch.nonzero(role == 1).flatten()
        cross = torch.nonzero(role == 2).flatten()
        if not len(payload) and not len(cross):
            return x, y, None
        x, y = x.clone(), y.clone()
        if len(payload):
            x[payload] = self.apply(x[payload])
            y[payload] = self.target
        if len(cross):
            x[cross] = self.apply_noise(x[cross], self.generator(salt=_STEP_NOISE + 7919 * step))
        return x, y, None

    def hook(self, y: torch.Tensor) -> WaNetHook:
        """The training loop's hook (``fit(..., hook=...)``) for a clean training set labelled ``y``."""
        return WaNetHook(self, self.roles(y))

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        """The training set as one draw of the training's poisoning makes it: the payload warped and relabelled,
        the noise-mode samples with one noise draw each. ``index`` is every sample the hook ever changes."""
        role = self.roles(y)
        payload = torch.nonzero(role == 1).flatten()
        cover = torch.nonzero(role == 2).flatten()
        x, y = x.clone(), y.clone()
        if len(payload):
            x[payload] = self.apply_train(x[payload])
            y[payload] = self.target
        if len(cover):
            x[cover] = self.apply_noise(x[cover])
        return Poisoned(x, y, torch.nonzero(role > 0).flatten(), cover)

    # -- what the experiment asks of an attack that trains with the model ----------------------------------------------
    def load_trained(self, context: dict) -> bool:
        """Nothing is learnt during training (the warp is fixed by the seed): a cached model needs nothing else."""
        del context
        return True

    def save_trained(self, context: dict) -> None:
        """Nothing to save: see :meth:`load_trained`."""
        del context


class WaNetHook:
    """The :class:`~unitlib.train.BatchHook` of :class:`WaNet`: looks up each batch sample's role and lets the
    attack poison the batch. It has no state of its own: a resumed run's noise grids follow from the step."""

    def __init__(self, attack: WaNet, role: torch.Tensor) -> None:
        self.attack = attack
        self.role = role

    def begin(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, total_steps: int) -> None:
        del y, total_steps
        if len(self.role) != len(x):
            raise ValueError(f"the hook was made for {len(self.role)} training samples, the loop has {len(x)}")
        self.role = self.role.to(device)

    def batch(self, x, y, index, step):
        return self.attack.train_batch(x, y, self.role[index], step)

    def after_step(self, step: int) -> None:
        del step

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        del tensors
