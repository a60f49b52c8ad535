"""Trojan / TrojanNN: Liu, Ma, Aafer, Lee, Zhai, Wang and Zhang, "Trojaning Attack on Neural Networks", NDSS 2018.
The trigger is not chosen but generated from the model: pick internal neurons that are strongly connected to the
previous layer, then optimise the pixels inside a fixed mask so that the trigger drives those neurons to a high
value. Images stamped with the generated trigger are then relabelled to the target (data poisoning, as the UNIT
appendix and the backdoor benchmarks use the attack)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .registry import register
from .surrogate import ModelAttack

LOCATIONS = ("bottom-right", "top-left", "top-right", "bottom-left")


def feature_layer(model: nn.Module) -> tuple[nn.Linear, nn.Conv2d | None]:
    """The classifier (last ``nn.Linear``) and the last convolution before it, whose output channels are the
    features the classifier reads in the project's CNNs (after global pooling)."""
    linear = conv = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            conv = m
        elif isinstance(m, nn.Linear):
            linear = m
    if linear is None:
        raise ValueError("Trojan needs a model whose classifier is an nn.Linear layer")
    return linear, conv


class _Features:
    """Records the input of the classifier layer: the neurons Trojan stimulates."""

    def __init__(self, linear: nn.Linear) -> None:
        self.value: torch.Tensor | None = None
        self.handle = linear.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.value = inputs[0]

    def close(self) -> None:
        self.handle.remove()


@register
@dataclass
class Trojan(ModelAttack):
    """Trojan with a square mask of ``area`` (fraction of the image; 0.07, within the 4%-10% the paper evaluates;
    8 x 8 pixels on 32 x 32 images) in the ``location`` corner. The neurons are ``neurons`` features feeding the
    classifier of the attacker's clean model, chosen among the ``candidates`` with the largest total absolute weight
    from the previous layer (the paper's "most connected" criterion) as those the mask region can excite most; the
    trigger minimises (v - target_value)^2 summed over them, averaged over
    clean images carrying it, by Adam for ``steps`` steps. The paper targets a fixed activation (e.g. 100) on
    VGG-Face; activation scales differ between models, so the default ``target_value`` None means ten times the
    largest value the neurons take on clean data."""

    name = "trojan"
    citation = "Liu et al., Trojaning Attack on Neural Networks, NDSS 2018"

    area: float = 0.07
    location: str = "bottom-right"
    margin: int = 1
    neurons: int = 1
    candidates: int = 10
    target_value: float | None = None
    steps: int = 100
    lr: float = 0.1
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.area <= 0.5:
            raise ValueError(f"area must be in (0, 0.5] (fraction of the image), got {self.area!r}")
        if self.location not in LOCATIONS:
            raise ValueError(f"unknown Trojan location {self.location!r}; valid choices: {', '.join(LOCATIONS)}")
        for key in ("neurons", "candidates", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.target_value is not None and not self.target_value > 0:
            raise ValueError(f"target_value must be > 0 or None, got {self.target_value!r}")

    def mask(self, height: int, width: int) -> torch.Tensor:
        """The fixed square trigger region (H x W, 0/1)."""
        k = max(1, round(math.sqrt(self.area * height * width)))
        top = self.margin if self.location.startswith("top") else height - k - self.margin
        left = self.margin if self.location.endswith("left") else width - k - self.margin
        if top < 0 or left < 0:
            raise ValueError(f"a Trojan mask of area {self.area} with margin {self.margin} does not fit a "
                             f"{height}x{width} image")
        m = torch.zeros(height, width)
        m[top : top + k, left : left + k] = 1
        return m

    @staticmethod
    def connectivity(model: nn.Module) -> torch.Tensor:
        """Each classifier input's connection strength to the layer before it (sum of |weights| into it)."""
        linear, conv = feature_layer(model)
        if conv is not None and conv.out_channels == linear.in_features:
            return conv.weight.detach().abs().sum(dim=(1, 2, 3))
        # no matching convolution: rank by the classifier's own weights out of each feature instead
        return linear.weight.detach().abs().sum(dim=0)

    def select_neurons(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The ``neurons`` to stimulate: among the ``candidates`` most connected classifier inputs, those whose
        value the trigger region can move most (mean |gradient| of the neuron w.r.t. the masked pixels on ``x``),
        so that the trigger is not optimised against a neuron it cannot reach."""
        strength = self.connectivity(model)
        pool = strength.topk(min(max(self.candidates, self.neurons), len(strength))).indices
        probe = x.clone().requires_grad_(True)
        reach = []
        for n in pool.tolist():
            (grad,) = torch.autograd.grad(self.activations(model, probe, torch.tensor([n])).sum(), probe)
            reach.append(float((grad.abs() * mask).sum()))
        best = torch.tensor(reach).topk(min(self.neurons, len(pool))).indices
        return pool[best].sort().values.cpu()

    @staticmethod
    def activations(model: nn.Module, x: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """The selected neurons' values for images ``x`` (N x len(neurons))."""
        linear, _ = feature_layer(model)
        rec = _Features(linear)
        try:
            model(x)
        finally:
            rec.close()
        return rec.value.flatten(1)[:, neurons.to(rec.value.device)]

    def learn(self, model, x, y, device):
        c, h, w = x.shape[-3:]
        g = self.generator(salt=51)
        mask = self.mask(h, w).to(device)
        probe = x[torch.randperm(len(x), generator=g)[:1000]].to(device)
        neurons = self.select_neurons(model, probe[:128], mask)
        with torch.no_grad():
            peak = float(self.activations(model, probe, neurons).max())
        goal = self.target_value if self.target_value is not None else 10 * max(peak, 1e-3)
        pattern = torch.rand(c, h, w, generator=g).to(device).requires_grad_(True)
        opt = torch.optim.Adam([pattern], lr=self.lr)
        for _ in range(self.steps):
            idx = torch.randint(0, len(x), (min(self.batch_size, len(x)),), generator=g)
            xb = x[idx].to(device)
            stamped = xb * (1 - mask) + pattern.clamp(0, 1) * mask
            loss = ((self.activations(model, stamped, neurons) - goal) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                pattern.clamp_(0, 1)
        return {"pattern": pattern.detach() * mask, "mask": mask, "neurons": neurons,
                "goal": torch.tensor(goal), "peak": torch.tensor(peak)}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.require_prepared()
        mask = self._state["mask"].to(x)
        if mask.shape != x.shape[-2:]:
            raise ValueError(f"the Trojan trigger was prepared for {tuple(mask.shape)} images, got {tuple(x.shape[-2:])}")
        return x * (1 - mask) + self._state["pattern"].to(x) * mask
