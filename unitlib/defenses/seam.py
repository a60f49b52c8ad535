"""SEAM: Selective Amnesia. Zhu, Tang, Tang, Wang and Tang, "Selective Amnesia: On Efficient,
High-Fidelity and Blind Suppression of Backdoor Effects in Trojaned Machine Learning Models", IEEE S&P 2023.

Catastrophic forgetting, induced on purpose: the model is first trained on a few clean images with random labels
until it has forgotten its task, the backdoor included (forgetting); then it is trained on the defender's clean
data with the true labels, which restores the task but not the backdoor, whose data is absent (recovery).

Both stopping rules use only the defender's clean validation split: forgetting stops once validation accuracy falls
to ``forget_acc`` (near chance: 0.2 for ten classes, the UNIT authors' bound) or after ``forget_steps`` steps;
recovery runs up to ``recover_epochs`` epochs, stops early when validation accuracy has not improved for
``patience`` epochs, and keeps the epoch with the best validation accuracy. Defaults follow the settings the UNIT
authors used (SGD, momentum 0.9, weight decay 5e-4; forgetting at lr 1e-2 on 50 images, i.e. 0.1% of CIFAR-10's
training set, at most 100 steps; recovery for 10 epochs at lr 1e-2 divided by 10 every 2 epochs), with random crop
and flip; the random labels are drawn anew for every step.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..metrics import accuracy
from ..train import autocast, resolve_device
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
    num_classes,
    sgd,
    step_lr,
)


@register
@dataclass
class SEAM(Defense):
    """Selective amnesia. Parameters:

    - ``forget_size``: clean images trained on with random labels (drawn from the optimise split, per class).
    - ``forget_lr``, ``forget_steps``, ``forget_acc``: forgetting stops at validation accuracy <= ``forget_acc`` or
      after ``forget_steps`` steps (one step: one pass over the forget images).
    - ``recover_epochs``, ``recover_lr``, ``recover_lr_step``, ``patience``: recovery on the whole optimise split.
    - ``batch_size``, ``momentum``, ``weight_decay``, ``crop``, ``rotation``, ``flip``, ``seed``.
    """

    name = "seam"
    citation = "Zhu et al., Selective Amnesia (SEAM), IEEE S&P 2023"

    forget_size: int = 50
    forget_lr: float = 1e-2
    forget_steps: int = 100
    forget_acc: float = 0.2
    recover_epochs: int = 10
    recover_lr: float = 1e-2
    recover_lr_step: int = 2
    patience: int = 3
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop: int = 4
    rotation: float = 0.0
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_ints(self, "forget_size", "forget_steps", "batch_size", "patience")
        check_positive_ints(self, "recover_epochs", "recover_lr_step", minimum=0)
        check_positive(self, "forget_lr", "recover_lr")
        check_range("forget_acc", self.forget_acc, 0, 1)
        check_momentum_decay(self)
        check_augmentation(self)

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        x, y, x_val, y_val = clean_tensors(clean, dev)
        model = copy_model(model, dev)
        k = num_classes(model, x)
        base = accuracy(model, x_val, y_val, batch_size=500, device=dev)
        gen = torch.Generator().manual_seed(self.seed)
        augmentation = Augmentation(self.crop, self.rotation, self.flip)

        # A class-balanced forget set from the optimise split.
        order = torch.randperm(len(y), generator=gen).to(dev)
        per_class = max(1, self.forget_size // k)
        picked = torch.cat([order[y[order] == c][:per_class] for c in range(k)])[: self.forget_size]
        xf = x[picked]

        # Forgetting: random labels until validation accuracy is near chance.
        opt = sgd(model, self.forget_lr, self.momentum, self.weight_decay)
        forget_history = []
        acc = base
        bar = tqdm(range(self.forget_steps), desc="seam forget", unit="step", disable=not progress)
        for step in bar:
            model.train()
            perm = torch.randperm(len(xf), generator=gen).to(dev)
            for i in range(0, len(xf), self.batch_size):
                xb = augmentation(xf[perm[i : i + self.batch_size]], gen)
                labels = torch.randint(k, (len(xb),), generator=gen).to(dev)
                with autocast(dev):
                    loss = F.cross_entropy(model(xb).float(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
            acc = accuracy(model, x_val, y_val, batch_size=500, device=dev)
            forget_history.append({"step": step + 1, "val_acc": acc})
            bar.set_postfix(val_acc=f"{acc:.3f}")
            if acc <= self.forget_acc:
                break
        bar.close()
        forgotten = acc <= self.forget_acc

        # Recovery: true labels on the whole optimise split; keep the best validation epoch.
        best = {"val_acc": -1.0, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
        history: list[dict[str, float]] = []
        for epoch in range(self.recover_epochs):
            h = finetune(model, x, y, epochs=1, lr=step_lr(self.recover_lr, epoch, self.recover_lr_step),
                         batch_size=self.batch_size, x_val=x_val, y_val=y_val, augmentation=augmentation,
                         momentum=self.momentum, weight_decay=self.weight_decay, seed=self.seed + epoch + 1,
                         desc=f"seam recover {epoch + 1}/{self.recover_epochs}", progress=progress)[0]
            h["epoch"] = epoch + 1
            history.append(h)
            if h["val_acc"] > best["val_acc"]:
                best = {"val_acc": h["val_acc"], "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
            elif epoch + 1 - best["epoch"] >= self.patience:
                break
        if history:
            model.load_state_dict(best["state"])
        self.report = {
            "base_val_acc": base,
            "forget_size": len(picked),
            "forget_steps": len(forget_history),
            "forgotten": forgotten,
            "forget_history": forget_history,
            "best_epoch": best["epoch"],
            "final_val_acc": best["val_acc"] if history else acc,
            "history": history,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return model.eval()
