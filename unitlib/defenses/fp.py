"""FP: Fine-Pruning. Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks", RAID 2018.

Channels of the last convolutional feature map that stay dormant on clean inputs are the likely carriers of the
backdoor: the channels of that map are ranked by their mean activation over the defender's clean images and the
``ratio`` lowest are pruned (a fixed 0/1 channel mask inserted after the layer, kept in the returned model); the
pruned model is then fine-tuned on the clean data.

The layer is found generically: the last activation module whose output is a feature map, i.e. the map the
classifier pools (the small CNN's last group, ResNet's layer4 output). The paper prunes until validation accuracy
falls by a set amount; here, as in the settings the UNIT authors used (20% of the channels, then 10 epochs of
fine-tuning at lr 0.01) and in the appendix's sensitivity study (A.3 sweeps the ratio and lr), the ratio is a
parameter. The fine-tuning schedule of those settings is not documented; the default here is a constant lr.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..metrics import accuracy
from ..train import resolve_device
from .base import CleanSplit, Defense, register
from .common import (
    Augmentation,
    ChannelMask,
    check_augmentation,
    check_momentum_decay,
    check_positive,
    check_positive_ints,
    check_range,
    clean_tensors,
    copy_model,
    feature_sites,
    finetune,
    insert_after,
    step_lr,
)


@torch.no_grad()
def mean_channel_activation(model: nn.Module, site: str, x: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """Mean of each channel of module ``site``'s output over images ``x`` and spatial positions."""
    total: list[torch.Tensor] = []
    handle = model.get_submodule(site).register_forward_hook(
        lambda m, i, o: total.append(o.float().mean((2, 3)).sum(0)))
    try:
        model.eval()
        for i in range(0, len(x), chunk):
            model(x[i : i + chunk])
    finally:
        handle.remove()
    return torch.stack(total).sum(0) / len(x)


@register
@dataclass
class FP(Defense):
    """Fine-Pruning. Parameters:

    - ``ratio``: share of the last feature map's channels pruned (lowest mean clean activation first).
    - ``epochs``, ``lr``, ``lr_step``, ``lr_gamma``, ``batch_size``, ``momentum``, ``weight_decay``: fine-tuning
      (SGD; ``lr_step`` 0 keeps the lr constant).
    - ``crop``, ``rotation``, ``flip``: augmentation while fine-tuning.
    """

    name = "fp"
    citation = "Liu, Dolan-Gavitt and Garg, Fine-Pruning, RAID 2018"

    ratio: float = 0.2
    epochs: int = 10
    lr: float = 1e-2
    lr_step: int = 0
    lr_gamma: float = 0.1
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop: int = 4
    rotation: float = 0.0
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0, 1, high_open=True)
        check_positive_ints(self, "batch_size")
        check_positive_ints(self, "epochs", "lr_step", minimum=0)
        check_positive(self, "lr")
        check_range("lr_gamma", self.lr_gamma, 0, 1, low_open=True)
        check_momentum_decay(self)
        check_augmentation(self)

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        x, y, x_val, y_val = clean_tensors(clean, dev)
        model = copy_model(model, dev)
        base = accuracy(model, x_val, y_val, batch_size=500, device=dev)

        site = feature_sites(model, x)[-1]
        activation = mean_channel_activation(model, site, x)
        n_prune = round(self.ratio * len(activation))
        order = torch.argsort(activation)  # dormant first
        mask = torch.ones_like(activation)
        mask[order[:n_prune]] = 0
        insert_after(model, site, ChannelMask(mask))
        pruned_acc = accuracy(model, x_val, y_val, batch_size=500, device=dev)

        history = []
        if self.epochs:
            history = finetune(
                model, x, y, epochs=self.epochs, lr=lambda e: step_lr(self.lr, e, self.lr_step, self.lr_gamma),
                batch_size=self.batch_size, x_val=x_val, y_val=y_val,
                augmentation=Augmentation(self.crop, self.rotation, self.flip), momentum=self.momentum,
                weight_decay=self.weight_decay, seed=self.seed, desc="fp", progress=progress,
            )
        self.report = {
            "base_val_acc": base,
            "layer": site,
            "channels": len(activation),
            "pruned": sorted(order[:n_prune].tolist()),
            "pruned_val_acc": pruned_acc,
            "final_val_acc": history[-1]["val_acc"] if history else pruned_acc,
            "history": history,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return model.eval()
