"""NAD: Neural Attention Distillation. Li, Lyu, Koren, Lyu, Li and Ma, "Neural Attention Distillation: Erasing
Backdoor Triggers from Deep Neural Networks", ICLR 2021.

A teacher is made by fine-tuning a copy of the backdoored model on the defender's clean data; the backdoored model
(the student) is then trained on the same data with cross-entropy plus ``beta`` times the attention-distillation
loss: at each chosen feature map, the attention map is the sum over channels of ``|a|^p`` (p = 2), divided by its
L2 norm over spatial positions, and the loss is the mean squared difference between the student's and teacher's.

Defaults follow the official code: beta 5000 on the last group's output only (the code's default; the paper also
reports 500/1000/1000 on three groups, which ``layers`` and ``beta`` can express only with one beta for all),
20 epochs, batch 64, SGD (Nesterov momentum 0.9, weight decay 1e-4), the lr divided by 10 after 2 epochs. The
teacher is fine-tuned for 10 epochs with the same optimiser (``teacher_lr`` sets its own lr). Augmentation: random
crop and flip. The UNIT authors' settings (a FT model as teacher, 6 epochs, beta 5000 on layer4) are
``NAD(epochs=6)`` with this teacher.

Two deviations:

- lr 0.01 rather than the official 0.1 (0.01 is also the middle of the appendix's Fig. 9 sweep, 0.001-0.05): at
  0.1 the teacher's fine-tuning on 2,000 images alone costs the ``cpu`` profile's models much of their clean
  accuracy (the measurement is in the README's measured section).
- ``batch_stats`` (below): the teacher's attention is taken with batch statistics, as the training student's is.

At the ``cpu`` profile these defaults cost the models 15-51 points of accuracy (the paper's Table 9: 2.3-5.2): the
attention term outweighs the cross-entropy about tenfold at the start and runs away in the first epoch
(``benchmarks/nad_attention.py``; the README's measured section has the numbers).
"""

from __future__ import annotations

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
    choose_sites,
    clean_tensors,
    copy_model,
    feature_sites,
    finetune,
)


def attention_map(a: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """NAD's attention of a feature map (N x C x H x W): sum over channels of |a|^p, L2-normalised per sample."""
    am = a.float().abs().pow(p).sum(1, keepdim=True)
    return am / (am.norm(dim=(2, 3), keepdim=True) + eps)


@register
@dataclass
class NAD(Defense):
    """Neural attention distillation. Parameters:

    - ``beta``: weight of the attention loss (per chosen layer); ``p``: attention power.
    - ``layers``: ``last:k`` feature maps (activation outputs, forward order) or comma-separated module names.
    - ``epochs``, ``lr``, ``lr_drop``: student training; the lr is multiplied by 0.1 at epoch ``lr_drop``.
    - ``teacher_epochs``, ``teacher_lr``: fine-tuning of the teacher (same optimiser and schedule; ``teacher_lr``
      None: the student's ``lr``).
    - ``batch_stats``: the teacher's batch-norm layers normalise with the batch's statistics (their running
      statistics left unchanged), as the training student's do, so the two attention maps differ by what the
      networks learned, not by the normalisation mode. With ``False`` (the official code: teacher in eval mode), the
      mode mismatch alone gives the cpu profile's small CNN an attention loss of ~48 at beta 5000 (measured on 64
      clean images, student = teacher), as large as comparing an image with its mirror image, and the student's
      accuracy collapses.
    - ``batch_size``, ``momentum``, ``weight_decay``, ``crop``, ``rotation``, ``flip``, ``seed``.
    """

    name = "nad"
    citation = "Li et al., Neural Attention Distillation, ICLR 2021"

    beta: float = 5000.0
    p: float = 2.0
    layers: str = "last:1"
    epochs: int = 20
    lr: float = 0.01
    lr_drop: int = 2
    teacher_epochs: int = 10
    teacher_lr: float | None = None
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-4
    crop: int = 4
    rotation: float = 0.0
    flip: bool = True
    batch_stats: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("beta", self.beta, 0, float("inf"))
        check_positive(self, "p", "lr")
        if self.teacher_lr is not None:
            check_positive(self, "teacher_lr")
        check_positive_ints(self, "epochs", "batch_size")
        check_positive_ints(self, "teacher_epochs", "lr_drop", minimum=0)
        check_momentum_decay(self)
        check_augmentation(self)
        if not isinstance(self.batch_stats, bool):
            raise ValueError(f"batch_stats must be true or false, got {self.batch_stats!r}")
        if not isinstance(self.layers, str) or not self.layers.strip():
            raise ValueError(f"layers must be 'last:k' or comma-separated module names, got {self.layers!r}")
        kind, sep, k = self.layers.partition(":")
        if sep and (kind != "last" or not k.isdigit() or int(k) < 1):
            raise ValueError(f"layers must be 'last:k' (k >= 1) or comma-separated module names, got {self.layers!r}")

    def schedule(self, epoch: int, lr: float | None = None) -> float:
        return (lr or self.lr) * (0.1 if self.lr_drop and epoch >= self.lr_drop else 1.0)

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        x, y, x_val, y_val = clean_tensors(clean, dev)
        student = copy_model(model, dev)
        base = accuracy(student, x_val, y_val, batch_size=500, device=dev)
        sites = choose_sites(feature_sites(student, x), self.layers)
        common = {"batch_size": self.batch_size, "x_val": x_val, "y_val": y_val,
                  "augmentation": Augmentation(self.crop, self.rotation, self.flip), "momentum": self.momentum,
                  "weight_decay": self.weight_decay, "nesterov": True, "seed": self.seed, "progress": progress}

        teacher = copy_model(model, dev)
        teacher_history = []
        if self.teacher_epochs:
            teacher_history = finetune(teacher, x, y, epochs=self.teacher_epochs,
                                       lr=lambda e: self.schedule(e, self.teacher_lr),
                                       desc="nad teacher", **common)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self.batch_stats:
            for m in teacher.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    m.momentum = 0.0  # normalise by the batch, never update the running statistics

        feats: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        handles = []
        for role, net in (("student", student), ("teacher", teacher)):
            for s in sites:
                handles.append(net.get_submodule(s).register_forward_hook(
                    lambda m, i, o, role=role, s=s: feats[role].__setitem__(s, o)))

        def loss_fn(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher(xb)
            loss = F.cross_entropy(net(xb).float(), yb)
            for s in sites:
                at_s = attention_map(feats["student"][s], self.p)
                at_t = attention_map(feats["teacher"][s], self.p)
                loss = loss + self.beta * F.mse_loss(at_s, at_t)
            return loss

        try:
            history = finetune(student, x, y, epochs=self.epochs, lr=self.schedule, loss_fn=loss_fn, desc="nad",
                               **common)
        finally:
            for h in handles:
                h.remove()
        self.report = {
            "base_val_acc": base,
            "layers": sites,
            "teacher_val_acc": teacher_history[-1]["val_acc"] if teacher_history else base,
            "teacher_history": teacher_history,
            "final_val_acc": history[-1]["val_acc"],
            "history": history,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return student.eval()
