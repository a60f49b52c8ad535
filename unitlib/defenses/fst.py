"""FST: Feature Shift Tuning. Min, Qin, Shen and Cheng, "Towards Stable Backdoor Purification through Feature Shift
Tuning", NeurIPS 2023.

Plain fine-tuning leaves the features, and with them the backdoor, where they were: the classifier it starts from
already separates them. FST re-initialises the final linear layer and fine-tunes the whole model on the defender's
clean data with cross-entropy plus ``alpha * <W, W_orig>``, the inner product of the classifier's weights with the
original (backdoored) ones, which pushes the new classifier away from the old; after every step the new weight
matrix is rescaled to the original's Frobenius norm, so it cannot shrink the penalty by shrinking itself. The
feature extractor has to shift to serve a classifier unlike the one the backdoor was wired to.

Defaults are the official code's (github.com/AISafety-HKUST/stable_backdoor_purification, ``fine_tune/ft.py`` with
``--ft_mode fst``): alpha 0.2 (its default; the README's example command uses 0.1), SGD with momentum 0.9 and no
weight decay, batch 128, the lr annealed by a cosine over the epochs; 10 epochs at lr 0.01 (the README's example
command for CIFAR-10 and ResNet-18). The new weights and biases are drawn uniformly from +-1/sqrt(fan_in), as
there. Augmentation here: random crop and horizontal flip. The final linear layer is found by a forward pass (the
last ``nn.Linear`` called) or named by ``linear``. For two CPU cores nothing changes but the epochs, through
``epochs``; the smoke budget (``SMOKE_PARAMS``) runs 10 epochs at lr 0.05 in batches of 32 on its 320 images.
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
    num_classes,
)
from .tuning import tune


def last_linear(model: nn.Module, sample: torch.Tensor) -> str:
    """Name of the last ``nn.Linear`` a forward pass of ``sample`` calls (the classifier of a CNN)."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: order.append(name))
               for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(sample[:1])
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("FST re-initialises the final linear layer; this model calls no nn.Linear")
    return order[-1]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two weight matrices taken as vectors."""
    a, b = a.detach().float().flatten(), b.detach().float().flatten()
    return float(a @ b / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))


@register
@dataclass
class FST(Defense):
    """Feature shift tuning. Parameters:

    - ``alpha``: weight of the inner product <W, W_orig> of the new and original classifier weights in the loss.
    - ``epochs``, ``lr``, ``batch_size``, ``momentum``, ``weight_decay``: SGD, lr annealed by a cosine per epoch.
    - ``linear``: the classifier's module name; empty: the last nn.Linear a forward pass calls.
    - ``crop``, ``rotation``, ``flip``, ``seed``: augmentation, batch order and the classifier's new initial weights.
    """

    name = "fst"
    citation = "Min et al., Towards Stable Backdoor Purification through Feature Shift Tuning (FST), NeurIPS 2023"

    alpha: float = 0.2
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    linear: str = ""
    crop: int = 4
    rotation: float = 0.0
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("alpha", self.alpha, 0, float("inf"))
        check_positive_ints(self, "epochs", "batch_size")
        check_positive(self, "lr")
        check_momentum_decay(self)
        check_augmentation(self)
        if not isinstance(self.linear, str):
            raise ValueError(f"linear must be a module name or empty (the last nn.Linear), got {self.linear!r}")

    def lr_at_epoch(self, epoch: int) -> float:
        """Cosine annealing per epoch, as torch's CosineAnnealingLR stepped once an epoch over ``epochs``."""
        return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        x, y, x_val, y_val = clean_tensors(clean, dev)
        model = copy_model(model, dev)
        base = accuracy(model, x_val, y_val, batch_size=500, device=dev)
        names = dict(model.named_modules())
        name = self.linear or last_linear(model, x)
        if not isinstance(names.get(name), nn.Linear):
            linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"linear must name an nn.Linear of the model; got {name!r}, valid: {', '.join(linears)}")
        head: nn.Linear = names[name]
        if head.out_features != num_classes(model, x):
            raise ValueError(f"{name!r} has {head.out_features} outputs, not the model's number of classes")

        original = head.weight.detach().clone()
        norm = torch.linalg.vector_norm(original)
        gen = torch.Generator().manual_seed(self.seed)
        bound = 1 / math.sqrt(head.in_features)
        with torch.no_grad():
            head.weight.copy_((torch.rand(head.weight.shape, generator=gen) * 2 - 1) * bound)
            if head.bias is not None:
                head.bias.copy_((torch.rand(head.bias.shape, generator=gen) * 2 - 1) * bound)
        start_cosine = cosine(head.weight, original)

        def loss_fn(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(net(xb).float(), yb) + self.alpha * (head.weight.float() * original.float()).sum()

        def keep_norm() -> None:
            with torch.no_grad():
                head.weight.mul_(norm / torch.linalg.vector_norm(head.weight))

        steps = math.ceil(len(x) / self.batch_size)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        history = tune(model, x, y, epochs=self.epochs, batch_size=self.batch_size, optimizer=optimizer,
                       lr_at=lambda s: self.lr_at_epoch(s // steps), x_val=x_val, y_val=y_val,
                       augmentation=Augmentation(self.crop, self.rotation, self.flip), loss_fn=loss_fn,
                       after_step=keep_norm, seed=self.seed, desc="fst", progress=progress)
        self.report = {
            "base_val_acc": base,
            "linear": name,
            "weight_norm": round(float(norm), 6),
            # <W, W_orig> = cosine * ||W_orig||^2 once the norm constraint holds
            "cosine_start": round(start_cosine, 6),
            "cosine_end": round(cosine(head.weight, original), 6),
            "final_val_acc": history[-1]["val_acc"],
            "history": history,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return model.eval()
