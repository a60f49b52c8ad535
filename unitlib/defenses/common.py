"""Pieces the baseline defenses share: the defender's clean tensors on a device, the fine-tuning loop on clean data
(random crop, rotation and horizontal flip; SGD with a step schedule), where in a model the features are (the last
activation before global pooling, BatchNorm layers), a persistent channel mask, and parameter checks."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..metrics import accuracy
from ..models.activations import ACTIVATION_TYPES
from ..train import augment as crop_flip
from ..train import autocast
from .base import CleanSplit

# ---------------------------------------------------------------------------------------------------- data


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Images as float in [0, 1] (uint8 is divided by 255; float is taken as already in [0, 1])."""
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def clean_tensors(clean: CleanSplit, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The defender's split as float images in [0, 1] and int64 labels, on ``device`` (channels_last, which
    convolutions run faster in on CPUs and GPUs alike)."""
    def images(x: torch.Tensor) -> torch.Tensor:
        return as_float(x).to(device).contiguous(memory_format=torch.channels_last)

    return images(clean.x_opt), clean.y_opt.long().to(device), images(clean.x_val), clean.y_val.long().to(device)


def num_classes(model: nn.Module, sample: torch.Tensor) -> int:
    """Number of logits the model produces."""
    with torch.no_grad():
        was = model.training
        model.eval()
        out = model(sample[:1])
        model.train(was)
    return int(out.shape[1])


def rotate(x: torch.Tensor, degrees: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each image by its own angle drawn uniformly from [-degrees, degrees] (zeros fill the corners, as
    torchvision's RandomRotation)."""
    if degrees <= 0:
        return x
    n = len(x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Augmentation:
    """Random crop after ``crop`` pixels of padding, rotation by up to ``rotation`` degrees, horizontal flip."""

    crop: int = 4
    rotation: float = 0.0
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = crop_flip(x, self.crop, self.flip, generator)
        return rotate(x, self.rotation, generator)


# ------------------------------------------------------------------------------------------------ training


def copy_model(model: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy on ``device`` (channels_last) with every parameter trainable: the caller's model is never
    changed."""
    model = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
        nesterov: bool = False) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0)


def step_lr(lr: float, epoch: int, every: int, gamma: float = 0.1) -> float:
    """``lr`` multiplied by ``gamma`` every ``every`` epochs (``every`` 0: constant)."""
    return lr * gamma ** (epoch // every) if every > 0 else lr


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float(), y)


def finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float | Callable[[int], float],
    batch_size: int,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    augmentation: Augmentation | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    loss_fn: LossFn = cross_entropy,
    transform: Transform | None = None,
    seed: int = 0,
    desc: str = "finetune",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` in place on the clean images ``x`` (float, on the model's device) for ``epochs`` epochs of
    SGD; ``lr`` is a number or a function of the epoch. Each batch is augmented, then passed through ``transform``
    (e.g. stamping a reversed trigger, relabelling) and ``loss_fn``. Returns one entry per epoch with the
    learning rate, mean loss and the accuracy on the validation split ``x_val``."""
    dev = x.device
    opt = sgd(model, lr(0) if callable(lr) else lr, momentum, weight_decay, nesterov)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    steps = math.ceil(n / batch_size)
    history: list[dict[str, float]] = []
    bar = tqdm(total=epochs * steps, desc=desc, unit="step", disable=not progress)
    for epoch in range(epochs):
        rate = lr(epoch) if callable(lr) else lr
        for g in opt.param_groups:
            g["lr"] = rate
        model.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        loss_sum = 0.0
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            if augmentation is not None:
                xb = augmentation(xb, gen)
            if transform is not None:
                xb, yb = transform(xb, yb, gen)
            xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(dev):
                loss = loss_fn(model, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            bar.update()
        model.eval()
        acc = accuracy(model, x_val, y_val, batch_size=500, device=dev)
        history.append({"epoch": epoch + 1, "lr": rate, "loss": round(loss_sum / n, 5), "val_acc": acc})
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / n:.3f}", val_acc=f"{acc:.3f}")
    bar.close()
    return history


# ------------------------------------------------------------------------------------------------ structure


def feature_sites(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Activation modules whose output is a feature map (N x C x H x W), in the order a forward pass calls them.
    The last one is the feature map the classifier pools (ResNet's layer4 output, the small CNN's last group)."""
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: order.append(name) if o.dim() == 4 else None)
        for name, module in model.named_modules() if isinstance(module, ACTIVATION_TYPES)
    ]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(sample[:2])
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    sites = list(dict.fromkeys(order))
    if not sites:
        raise ValueError("the model has no activation module (nn.ReLU, ...) with a feature-map output")
    return sites


def choose_sites(sites: list[str], layers: str) -> list[str]:
    """``last:k`` of ``sites`` or a comma-separated list of module names among them."""
    kind, _, k = layers.partition(":")
    if kind == "last" and k.isdigit() and int(k) >= 1:
        return sites[-int(k):]
    names = [s.strip() for s in layers.split(",") if s.strip()]
    unknown = [s for s in names if s not in sites]
    if not names or unknown:
        raise ValueError(f"layers must be 'last:k' (k >= 1) or module names among {', '.join(sites)}; "
                         f"got {layers!r}")
    return names


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The model's BatchNorm layers with a per-channel scale (ANP's neurons); an error names the problem if none."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats]
    if not layers:
        raise ValueError("the model has no affine BatchNorm layer with running statistics: ANP perturbs and masks "
                         "BatchNorm channels, so it needs a model that has them (e.g. resnet18, small-cnn)")
    return layers


class ChannelMask(nn.Module):
    """Multiplies a feature map by a fixed 0/1 mask per channel: pruned channels stay zero through fine-tuning and
    in the returned model (the mask is a buffer, so it is in the state dict)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype)[None, :, None, None]


def insert_after(model: nn.Module, name: str, module: nn.Module) -> str:
    """Replace submodule ``name`` by ``Sequential(original, module)``; returns the new module's name."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Sequential(getattr(parent, child), module))
    return f"{name}.1"


# ------------------------------------------------------------------------------------------------ parameters


def check_positive_ints(obj: Any, *names: str, minimum: int = 1) -> None:
    for key in names:
        value = getattr(obj, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key} must be an int >= {minimum}, got {value!r}")


def check_range(key: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """``low <= value <= high`` (``low_open``/``high_open``: strict); the error names the value and the range."""
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (ok_low and ok_high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{key} must be in {lo}{low}, {high}{hi}, got {value!r}")


def check_positive(obj: Any, *names: str) -> None:
    for key in names:
        value = getattr(obj, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{key} must be > 0, got {value!r}")


def check_augmentation(obj: Any) -> None:
    check_positive_ints(obj, "crop", minimum=0)
    check_range("rotation", obj.rotation, 0, 180)


def check_momentum_decay(obj: Any) -> None:
    check_range("momentum", obj.momentum, 0, 1, high_open=True)
    check_range("weight_decay", obj.weight_decay, 0, math.inf)
