"""Super-FT: super-fine-tuning. Sha, He, Berrang, Humbert and Zhang, "Fine-tuning Is All You Need to Mitigate
Backdoor Attacks", arXiv 2212.09067, 2022.

Fine-tuning on the defender's clean data with a cyclical learning rate in the manner of super-convergence (Smith and
Topin, 2017): the lr climbs linearly from ``lr_base`` to a large peak and falls back, cycle after cycle. The large
rates carry the weights out of the backdoored minimum (the backdoor is forgotten); the small ones at the end of each
cycle recover clean accuracy. Two phases: for the first ``phase1_epochs`` epochs the cycles peak at ``lr_max1``;
after them, at the smaller ``lr_max2``. Each cycle rises for ``up_steps`` steps and falls for ``down_steps``.

Defaults are those of the reimplementation in the backdoor-toolbox (github.com/vtu81/backdoor-toolbox,
``other_defenses_tool_box/super_finetuning.py``); they have not been checked against the paper's text: 100 epochs,
the first 40 peaking at lr 5.0 and the rest at 0.1, from a base lr of 0.03, cycles of 10 steps up and 10 down, batch
256, SGD without momentum or weight decay. Augmentation here: random crop and horizontal flip. Every one of these is
a parameter. The smoke budget (``SMOKE_PARAMS``) shortens the run and lowers the peaks, with momentum: the smoke
profile's tiny CNN does not survive a peak of 5.0. A loss that is not finite stops the run with an error.
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
    clean_tensors,
    copy_model,
    sgd,
)
from .tuning import tune


def cyclic_lr(step: int, *, low: float, high: float, up: int, down: int) -> float:
    """A triangular cycle: ``low`` at the start of each cycle, rising linearly to ``high`` after ``up`` steps, then
    falling linearly back towards ``low`` over ``down`` steps, and again."""
    t = step % (up + down)
    if t < up:
        return low + (high - low) * t / up
    return high - (high - low) * (t - up) / down


@register
@dataclass
class SuperFT(Defense):
    """Super-fine-tuning. Parameters:

    - ``lr_base``, ``lr_max1``, ``lr_max2``: the cycles' floor and their peaks in the first and second phase.
    - ``phase1_epochs``: epochs of the first phase (of ``epochs`` in all).
    - ``up_steps``, ``down_steps``: steps of each cycle's rise and fall.
    - ``batch_size``, ``momentum``, ``weight_decay``: SGD.
    - ``crop``, ``rotation``, ``flip``, ``seed``: augmentation and batch order.
    """

    name = "super-ft"
    citation = "Sha et al., Fine-tuning Is All You Need to Mitigate Backdoor Attacks (super-fine-tuning), arXiv 2022"

    epochs: int = 100
    phase1_epochs: int = 40
    lr_base: float = 0.03
    lr_max1: float = 5.0
    lr_max2: float = 0.1
    up_steps: int = 10
    down_steps: int = 10
    batch_size: int = 256
    momentum: float = 0.0
    weight_decay: float = 0.0
    crop: int = 4
    rotation: float = 0.0
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_ints(self, "epochs", "up_steps", "down_steps", "batch_size")
        check_positive_ints(self, "phase1_epochs", minimum=0)
        if self.phase1_epochs > self.epochs:
            raise ValueError(f"phase1_epochs must be <= epochs ({self.epochs}), got {self.phase1_epochs!r}")
        check_positive(self, "lr_base", "lr_max1", "lr_max2")
        check_momentum_decay(self)
        check_augmentation(self)

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """The learning rate of step ``step`` (0-based over the run) with ``steps_per_epoch`` steps an epoch."""
        peak = self.lr_max1 if step < self.phase1_epochs * steps_per_epoch else self.lr_max2
        return cyclic_lr(step, low=self.lr_base, high=peak, up=self.up_steps, down=self.down_steps)

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        x, y, x_val, y_val = clean_tensors(clean, dev)
        model = copy_model(model, dev)
        base = accuracy(model, x_val, y_val, batch_size=500, device=dev)
        steps = -(-len(x) // self.batch_size)
        history = tune(
            model, x, y, epochs=self.epochs, batch_size=self.batch_size,
            optimizer=sgd(model, self.lr_base, self.momentum, self.weight_decay),
            lr_at=lambda s: self.lr_at(s, steps), x_val=x_val, y_val=y_val,
            augmentation=Augmentation(self.crop, self.rotation, self.flip), seed=self.seed, desc="super-ft",
            progress=progress,
        )
        self.report = {
            "base_val_acc": base,
            "steps_per_epoch": steps,
            "final_val_acc": history[-1]["val_acc"],
            "history": history,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return model.eval()
