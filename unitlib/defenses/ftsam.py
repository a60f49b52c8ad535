"""FT-SAM: fine-tuning with sharpness-aware minimisation. Zhu, Wei, Shen, Fan and Wu, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023.

With little clean data, plain fine-tuning stays in the backdoored model's minimum: the neurons that carry the
backdoor have large norms and barely move. FT-SAM fine-tunes on the defender's clean data with sharpness-aware steps,
each taken with the gradient at the worst weights within a ball around the current ones; in the adaptive form
(ASAM) the ball is stretched by each weight's magnitude, so the large-norm backdoor neurons are perturbed the most and
their norms shrink.

Defaults are the FT-SAM authors' own (their implementation in BackdoorBench, ``defense/ft-sam.py`` and
``config/defense/ft-sam/cifar10.yaml``): adaptive SAM (ASAM, the element-wise |w| scaling) with rho 2.0, label
smoothing 0.1, SGD with momentum 0.9 and weight decay 5e-4, lr 0.01 annealed by a cosine, batch 256, 100 epochs;
random crop and horizontal flip. ``adaptive=False`` gives plain SAM (Foret et al.), whose ball is not scaled by the
weights: rho 2.0 is then far too large (SAM's usual rho is 0.05). The cosine here runs over the whole run, step by
step; BatchNorm's running statistics are updated on the first (unperturbed) pass only. For two CPU cores only the
epochs change, through ``epochs``; the smoke budget (``SMOKE_PARAMS``) runs 10 epochs at lr 0.05.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import accuracy
from ..train import resolve_device
from .base import CleanSplit, Defense, register
from .common import (
    Augmentation,
    check_augmentation,
    check_momentum_decay,
    check_positive,
    check_positive_ints,
    check_range,
    clean_tensors,
    copy_model,
    sgd,
)
from .tuning import SAM, tune


@register
@dataclass
class FTSAM(Defense):
    """Fine-tuning with sharpness-aware minimisation. Parameters:

    - ``rho``: radius of the weight perturbation; ``adaptive``: ASAM (the ball scaled by |w|) or plain SAM.
    - ``label_smoothing``: of the cross-entropy.
    - ``epochs``, ``lr``, ``batch_size``, ``momentum``, ``weight_decay``: SGD, lr annealed by a cosine over the run.
    - ``crop``, ``rotation``, ``flip``, ``seed``: augmentation and batch order.
    """

    name = "ft-sam"
    citation = ("Zhu et al., Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization "
                "(FT-SAM), ICCV 2023")

    rho: float = 2.0
    adaptive: bool = True
    label_smoothing: float = 0.1
    epochs: int = 100
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop: int = 4
    rotation: float = 0.0
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "rho", "lr")
        check_range("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_positive_ints(self, "epochs", "batch_size")
        check_momentum_decay(self)
        check_augmentation(self)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be true (ASAM) or false (SAM), got {self.adaptive!r}")

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        x, y, x_val, y_val = clean_tensors(clean, dev)
        model = copy_model(model, dev)
        base = accuracy(model, x_val, y_val, batch_size=500, device=dev)
        total = self.epochs * math.ceil(len(x) / self.batch_size)
        history = tune(
            model, x, y, epochs=self.epochs, batch_size=self.batch_size,
            optimizer=sgd(model, self.lr, self.momentum, self.weight_decay),
            lr_at=lambda s: self.lr * 0.5 * (1 + math.cos(math.pi * s / total)), x_val=x_val, y_val=y_val,
            augmentation=Augmentation(self.crop, self.rotation, self.flip),
            loss_fn=lambda net, xb, yb: F.cross_entropy(net(xb).float(), yb, label_smoothing=self.label_smoothing),
            sam=SAM(self.rho, self.adaptive), seed=self.seed, desc="ft-sam", progress=progress,
        )
        self.report = {
            "base_val_acc": base,
            "final_val_acc": history[-1]["val_acc"],
            "history": history,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return model.eval()
