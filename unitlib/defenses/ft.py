"""FT: standard fine-tuning of the backdoored model on the defender's clean data, the appendix's baseline setting
(Cheng et al., UNIT, ECCV 2024, Appendix A.1): 20 epochs, initial learning rate 1e-2 divided by 10 every 4 epochs,
random cropping, rotation and horizontal flipping. SGD with momentum 0.9 and weight decay 5e-4 (the usual CIFAR
recipe; the appendix does not name the optimiser). The rotation range is not given in the appendix: 15 degrees here.
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
    check_augmentation,
    check_momentum_decay,
    check_positive,
    check_positive_ints,
    check_range,
    clean_tensors,
    copy_model,
    finetune,
    step_lr,
)


@register
@dataclass
class FT(Defense):
    """Fine-tuning on clean data. Parameters:

    - ``epochs``, ``lr``, ``lr_step``, ``lr_gamma``: ``lr`` multiplied by ``lr_gamma`` every ``lr_step`` epochs.
    - ``batch_size``, ``momentum``, ``weight_decay``: SGD.
    - ``crop``, ``rotation``, ``flip``: augmentation (pixels of padding, degrees, horizontal flip).
    - ``seed``: batch order and augmentation.
    """

    name = "ft"
    citation = "Cheng et al., UNIT, ECCV 2024, Appendix A.1 (standard fine-tuning baseline)"

    epochs: int = 20
    lr: float = 1e-2
    lr_step: int = 4
    lr_gamma: float = 0.1
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop: int = 4
    rotation: float = 15.0
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_ints(self, "epochs", "batch_size")
        check_positive_ints(self, "lr_step", minimum=0)
        check_positive(self, "lr")
        check_range("lr_gamma", self.lr_gamma, 0, 1, low_open=True)
        check_momentum_decay(self)
        check_augmentation(self)

    def augmentation(self) -> Augmentation:
        return Augmentation(self.crop, self.rotation, self.flip)

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        x, y, x_val, y_val = clean_tensors(clean, dev)
        model = copy_model(model, dev)
        base = accuracy(model, x_val, y_val, batch_size=500, device=dev)
        history = finetune(
            model, x, y, epochs=self.epochs, lr=lambda e: step_lr(self.lr, e, self.lr_step, self.lr_gamma),
            batch_size=self.batch_size, x_val=x_val, y_val=y_val, augmentation=self.augmentation(),
            momentum=self.momentum, weight_decay=self.weight_decay, seed=self.seed, desc="ft", progress=progress,
        )
        self.report = {"base_val_acc": base, "final_val_acc": history[-1]["val_acc"], "history": history,
                       "seconds": round(time.perf_counter() - started, 3)}
        return model.eval()
