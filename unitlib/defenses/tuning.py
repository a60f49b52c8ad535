"""A step-level tuning loop for the baselines of the appendix's A.2 that train on the defender's clean data with more
than :func:`common.finetune` offers: a learning rate set at every step (Super-FT's cycles, FT-SAM's cosine), a hook
after every step (FST's norm constraint), sharpness-aware steps (FT-SAM), gradient clipping and an early stop on the
validation split (RNP's unlearning). One pass over the optimise split per epoch, in a fresh random order."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..metrics import accuracy
from ..train import autocast
from .common import Augmentation, LossFn, cross_entropy


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics as usual but leave their running statistics unchanged (an
    update with momentum 0), e.g. for SAM's second forward pass at perturbed weights."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum


@dataclass(frozen=True)
class SAM:
    """Sharpness-aware minimisation (Foret et al., ICLR 2021): each step takes the gradient at the worst weights
    within a ball of radius ``rho`` around the current ones, then steps from the current weights. ``adaptive``: the
    scale-invariant variant (ASAM, Kwon et al., ICML 2021), whose ball is stretched by |w| element-wise, so each weight
    is perturbed in proportion to its own magnitude."""

    rho: float
    adaptive: bool = False
    eps: float = 1e-12

    def perturbation(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ascent step ``e`` from the gradients in ``p.grad``: rho g / ||g|| (SAM) or rho |w|^2 g / || |w| g ||
        (ASAM), the norm taken over all parameters together."""
        with torch.no_grad():
            scaled = [p.grad * p.abs() if self.adaptive else p.grad for p in params]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled]))
            scale = self.rho / (norm + self.eps)
            return [(p.grad * p * p if self.adaptive else p.grad) * scale.to(p.dtype) for p in params]

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, closure: Callable[[], torch.Tensor]
             ) -> torch.Tensor:
        """One SAM step: ``closure()`` (forward and backward) at w, move to w + e, ``closure()`` again, move back to
        w, and let ``optimizer`` step with the gradient taken at w + e. Returns the loss at w. The second pass leaves
        BatchNorm's running statistics alone, so they come from the unperturbed weights only."""
        optimizer.zero_grad(set_to_none=True)
        loss = closure()
        params = [p for p in model.parameters() if p.grad is not None]
        e = self.perturbation(params)
        with torch.no_grad():
            for p, d in zip(params, e, strict=True):
                p.add_(d)
        optimizer.zero_grad(set_to_none=True)
        with frozen_running_stats(model):
            closure()
        with torch.no_grad():
            for p, d in zip(params, e, strict=True):
                p.sub_(d)
        optimizer.step()
        return loss


def tune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    augmentation: Augmentation | None = None,
    loss_fn: LossFn = cross_entropy,
    sam: SAM | None = None,
    max_grad_norm: float | None = None,
    after_step: Callable[[], None] | None = None,
    stop: Callable[[dict[str, float]], bool] | None = None,
    check_every: int = 0,
    seed: int = 0,
    desc: str = "tune",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` in place on the clean images ``x`` (float, on the model's device). Before step ``s`` (0-based,
    counted over the whole run) every parameter group's lr is set to ``lr_at(s)``. Each batch is augmented and its
    loss is ``loss_fn``; the step is plain (``optimizer.step()``) or sharpness-aware (``sam``), with the gradient's
    global norm clipped to ``max_grad_norm`` when given; ``after_step()`` runs after each step. After each epoch, and
    with ``check_every`` > 0 also every ``check_every`` steps, the validation accuracy is measured and the run ends
    there when ``stop(entry)`` says so. Returns one entry per epoch (epoch, step count, last lr, mean loss, validation
    accuracy), the last one for the part of an epoch run before a stop. A loss that is not finite raises
    FloatingPointError."""
    dev = x.device
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    steps = math.ceil(n / batch_size)
    history: list[dict[str, float]] = []
    bar = tqdm(total=epochs * steps, desc=desc, unit="step", disable=not progress)
    step = 0
    rate = lr_at(0)
    stopped = False
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        loss_sum, seen, acc = 0.0, 0, None
        for i in range(steps):
            rate = lr_at(step)
            for g in optimizer.param_groups:
                g["lr"] = rate
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            if augmentation is not None:
                xb = augmentation(xb, gen)
            xb = xb.contiguous(memory_format=torch.channels_last)

            def closure() -> torch.Tensor:
                with autocast(dev):
                    loss = loss_fn(model, xb, yb)
                loss.backward()
                if max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                return loss

            if sam is not None:
                loss = sam.step(model, optimizer, closure)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss = closure()
                optimizer.step()
            if after_step is not None:
                after_step()
            value = loss.item()
            if not math.isfinite(value):
                bar.close()
                raise FloatingPointError(f"{desc}: the loss is not finite at step {step + 1} (lr {rate:g}); lower "
                                         "the learning rate")
            loss_sum += value * len(idx)
            seen += len(idx)
            step += 1
            bar.update()
            if stop is not None and check_every > 0 and step % check_every == 0 and i < steps - 1:
                model.eval()
                acc = accuracy(model, x_val, y_val, batch_size=500, device=dev)
                model.train()
                if stop({"step": step, "val_acc": acc}):
                    stopped = True
                    break
        model.eval()
        if not stopped:
            acc = accuracy(model, x_val, y_val, batch_size=500, device=dev)
        entry = {"epoch": epoch + 1, "step": step, "lr": rate, "loss": round(loss_sum / seen, 5), "val_acc": acc}
        history.append(entry)
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}", val_acc=f"{acc:.3f}")
        if stopped or (stop is not None and stop(entry)):
            break
    bar.close()
    return history
