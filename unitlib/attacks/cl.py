"""CL, the label-consistent backdoor: Turner, Tsipras and Madry, "Label-Consistent Backdoor Attacks", arXiv 2019
(1912.02771). Clean-label: poisoned images are target-class images, kept at their (correct) label, first made hard
to classify with an L-inf-bounded PGD adversarial perturbation computed on a model the attacker trained, then
stamped with the trigger, so that the model must rely on the trigger to fit them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Poisoned
from .registry import register
from .surrogate import ModelAttack, cache_path, digest, load_cached, save_cached


@register
@dataclass
class CL(ModelAttack):
    """PGD with L-inf bound ``eps`` 16/255 (the paper studies 8/255 and 16/255; 16/255 makes the attack stronger),
    ``steps`` 10 of size 2.5 * eps / steps (untargeted: raise the loss of the true label), on the attacker's clean
    model (a few epochs of the small CNN; the paper uses an adversarially trained model, a stronger source of
    transferable perturbations). The trigger is the paper's 3 x 3 black-and-white pattern in all four corners (so
    that horizontal flips keep it), stamped at full ``amplitude`` 1; lower amplitudes blend it in (the paper's
    reduced-visibility variant). The test-time trigger is the four-corner pattern alone (no perturbation).

    The perturbations of the poisoned images are cached with the clean model's trigger key and the poisoned
    indices. ``apply_train`` on new images runs PGD on them (after :meth:`prepare`)."""

    name = "cl"
    clean_label = True
    citation = "Turner, Tsipras and Madry, Label-Consistent Backdoor Attacks, arXiv 2019"

    eps: float = 16 / 255
    steps: int = 10
    patch_size: int = 3
    amplitude: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"eps must be in [0, 1] (L-inf bound in pixel units), got {self.eps!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size!r}")
        if not 0.0 < self.amplitude <= 1.0:
            raise ValueError(f"amplitude must be in (0, 1], got {self.amplitude!r}")

    # -- the trigger -----------------------------------------------------------------------------------------------
    def corner_mask(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The four-corner trigger: its pattern and its mask (both H x W). Each corner carries the 3 x 3 pattern,
        mirrored so that a horizontal or vertical flip maps the trigger onto itself."""
        k = self.patch_size
        if 2 * k > min(height, width):
            raise ValueError(f"patch_size {k} does not fit four corners of a {height}x{width} image")
        i = torch.arange(k)
        base = ((i[:, None] + i[None, :]) % 2 == 0).float()  # white corners and centre, black edges
        pattern, mask = torch.zeros(height, width), torch.zeros(height, width)
        for flip_r in (False, True):
            for flip_c in (False, True):
                p = base.flip(0) if flip_r else base
                p = p.flip(1) if flip_c else p
                rows = slice(height - k, height) if flip_r else slice(0, k)
                cols = slice(width - k, width) if flip_c else slice(0, k)
                pattern[rows, cols], mask[rows, cols] = p, 1
        return pattern, mask

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.corner_mask(*x.shape[-2:])
        weight = self.amplitude * mask.to(x)
        return (x * (1 - weight) + pattern.to(x) * weight).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.stamp(x)

    # -- the adversarial perturbation ----------------------------------------------------------------------------
    def learn(self, model, x, y, device):
        # CL's trigger is fixed; what it learns are per-image perturbations, cached in poison() by index.
        return {"ready": torch.ones(1)}

    def prepare(self, x, y, *, device=None, progress=False) -> None:
        super().prepare(x, y, device=device, progress=progress)
        self._model = self.model(x, y, device=device, progress=progress)
        for p in self._model.parameters():
            p.requires_grad_(False)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD (L-inf ``eps``, ``steps`` steps, random start) raising the clean model's loss on labels ``y``.
        Returns the adversarial images, within ``eps`` of ``x`` and in [0, 1]."""
        self.require_prepared()
        model = self._model
        dev = next(model.parameters()).device
        g = self.generator(salt=61)
        step = 2.5 * self.eps / self.steps
        out = []
        for lo in range(0, len(x), 256):
            xb, yb = x[lo : lo + 256].to(dev), y[lo : lo + 256].to(dev)
            delta = ((torch.rand(xb.shape, generator=g) * 2 - 1) * self.eps).to(dev)
            delta = ((xb + delta).clamp(0, 1) - xb).requires_grad_(True)
            for _ in range(self.steps):
                loss = F.cross_entropy(model(xb + delta), yb)
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta += step * grad.sign()
                    delta.clamp_(-self.eps, self.eps)
                    delta.copy_((xb + delta).clamp(0, 1) - xb)
            out.append((xb + delta.detach()).cpu())
        return torch.cat(out) if out else x.clone()

    def apply_train(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The training-time trigger: PGD on images of the target class (``y``, default the target), then the
        four-corner pattern."""
        labels = torch.full((len(x),), self.target) if y is None else y
        return self.stamp(self.perturb(x, labels).to(x))

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        self.require_prepared()
        index = self.select(y)
        key = {**self.trigger_key(), "data": self._data_key, "index": digest(index.tolist())}
        path = cache_path("cl-perturbation", key)
        cached = load_cached(path)
        if cached is None or len(cached["delta"]) != len(index):
            # stored in half precision; the fresh run uses the stored values too, so both runs agree bit for bit
            cached = {"delta": (self.perturb(x[index], y[index]).to(x) - x[index]).half()}
            save_cached(path, cached)
        adv = (x[index] + cached["delta"].to(x).clamp(-self.eps, self.eps)).clamp(0, 1)
        x = x.clone()
        if len(index):
            x[index] = self.stamp(adv)
        return Poisoned(x, y.clone(), index)
