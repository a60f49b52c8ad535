"""RNP: Reconstructive Neuron Pruning. Li, Lyu, Ma, Koren, Lyu, Li and Jiang, "Reconstructive Neuron Pruning for
Backdoor Defense", ICML 2023.

Unlearn, recover, prune. (1) Unlearning: gradient ascent on the clean loss, over all weights, until the model has
lost its clean task (validation accuracy at or below ``unlearn_acc``); the paper observes that the unlearned model
then sends clean inputs to the backdoor's target class, the backdoor neurons being what unlearning leaves working.
(2) Recovery: a mask in [0, 1] on every BatchNorm channel (neuron) of the unlearned model, learned to minimise the
clean loss with the weights fixed; restoring the clean task means turning those neurons down, so their masks fall.
(3) Pruning: in the original backdoored model, neurons whose mask ended at or below ``pruning_threshold`` have their
BatchNorm scale set to zero (the official code's pruning).

Defaults are the official code's (github.com/bboylyg/RNP, ``main.py``): unlearning with SGD at lr 0.01 (momentum 0.9,
weight decay 5e-4, divided by 10 at epochs 10 and 20) for at most 20 epochs, gradient norm clipped to 20, stopping
at clean accuracy 0.2; recovery with SGD on the masks at lr 0.2 (momentum 0.9) for 20 epochs on the loss
``alpha * CE`` with alpha 0.2; batch 128; masks clipped to [0, 1]; BatchNorm normalising with batch statistics
while the masks are learned (the official code's training mode). Pruning threshold 0.2: the official code fixes none
(it sweeps 0 to 0.9 against test data, which a defender does not have); in its README's BadNets log 0.2 is the first
threshold of the sweep at which the ASR falls (to 6.6%). The appendix's Fig. 11 sweeps it, hence
``pruning_threshold``. The masks of the last run stay in ``masks``, so :func:`prune` can sweep thresholds without
running RNP again. Augmentation here: random crop and horizontal flip.

Departures: unlearning stops on the defender's validation accuracy (eval mode) rather than the running training
accuracy of the ascent epoch, as every stopping rule here uses the validation split, and checks it after every step
(``check_every``): the ascent accelerates, and a check once an epoch can overshoot far past the floor, to a model
the masks cannot bring back to its task; the gradient norm is clipped
after the backward pass (the official call comes before it, on zeroed gradients, where it does nothing); if the
floor is not reached within ``unlearn_epochs``, recovery starts from the last unlearned weights and the report says
so. For two CPU cores only the epochs change, through the parameters; the smoke budget (``SMOKE_PARAMS``) runs 5
epochs of each phase.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
    sgd,
    step_lr,
)
from .tuning import tune


def neuron_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers whose channels RNP masks and prunes (affine, with running statistics)."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats]
    if not layers:
        raise ValueError("RNP masks and prunes BatchNorm channels, so it needs a model that has them (e.g. "
                         "small-cnn, resnet18); this one has no affine BatchNorm layer with running statistics")
    return layers


class NeuronMask:
    """A mask in [0, 1] on one BatchNorm layer's channels, multiplying its scale, applied through a forward hook
    with batch statistics (the running ones left unchanged)."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm) -> None:
        self.mask = torch.ones(module.num_features, device=module.weight.device, requires_grad=True)
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module: nn.modules.batchnorm._BatchNorm, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(inputs[0], module.running_mean, module.running_var, module.weight * self.mask,
                            module.bias, training=True, momentum=0.0, eps=module.eps)


def recover_masks(
    model: nn.Module, layers: list[str], x: torch.Tensor, y: torch.Tensor, *, lr: float, epochs: int, alpha: float,
    batch_size: int, augmentation: Augmentation | None = None, seed: int = 0, progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """RNP's recovery: a mask in [0, 1] on the channels of each BatchNorm layer in ``layers``, learned by SGD
    (momentum 0.9) to minimise ``alpha * CE`` on ``x``, ``y`` with the model's weights fixed. ``model`` is left as it
    was (hooks removed, running statistics unchanged) apart from its parameters no longer requiring gradients.
    Returns the masks (on the CPU) and one history entry per epoch."""
    dev = x.device
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = {name: NeuronMask(modules[name]) for name in layers}
    masks = [h.mask for h in hooks.values()]
    opt = torch.optim.SGD(masks, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    steps = -(-len(x) // batch_size)
    history = []
    bar = tqdm(total=epochs * steps, desc="rnp recover", unit="step", disable=not progress)
    was = model.training
    try:
        # eval mode: the layers' own forward leaves the running statistics alone; the masks' hooks normalise with
        # the batch's statistics, as the official code's training mode does
        model.eval()
        for epoch in range(epochs):
            perm = torch.randperm(len(x), generator=gen).to(dev)
            loss_sum = correct = 0.0
            for i in range(steps):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                xb = x[idx] if augmentation is None else augmentation(x[idx], gen)
                with autocast(dev):
                    out = model(xb.contiguous(memory_format=torch.channels_last)).float()
                loss = alpha * F.cross_entropy(out, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for m in masks:
                        m.clamp_(0, 1)
                loss_sum += loss.item() * len(idx)
                correct += (out.argmax(1) == y[idx]).sum().item()
                bar.update()
            history.append({"epoch": epoch + 1, "loss": round(loss_sum / len(x), 5),
                            "train_acc": round(correct / len(x), 4)})
            bar.set_postfix(loss=f"{loss_sum / len(x):.3f}", acc=f"{correct / len(x):.3f}")
    finally:
        for h in hooks.values():
            h.handle.remove()
        model.train(was)
        bar.close()
    return {name: h.mask.detach().float().cpu() for name, h in hooks.items()}, history


@torch.no_grad()
def prune(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float) -> dict[str, list[int]]:
    """Set to zero, in place, the BatchNorm scale of every neuron of ``model`` whose mask is <= ``threshold``;
    returns the pruned channel indices per layer."""
    modules = dict(model.named_modules())
    pruned: dict[str, list[int]] = {}
    for name, mask in masks.items():
        idx = torch.nonzero(mask <= threshold).flatten()
        if len(idx):
            modules[name].weight[idx.to(modules[name].weight.device)] = 0.0
            pruned[name] = idx.tolist()
    return pruned


@register
@dataclass
class RNP(Defense):
    """Reconstructive neuron pruning. Parameters:

    - ``unlearn_lr``, ``unlearn_epochs``, ``unlearn_lr_step``: gradient ascent on the clean loss (the lr divided by 10
      every ``unlearn_lr_step`` epochs; 0 keeps it constant); ``unlearn_acc``: stop once validation accuracy is at or
      below it, checked every ``check_every`` steps (0: after each epoch only); ``max_grad_norm``: clip of the
      gradient's norm.
    - ``mask_lr``, ``mask_epochs``, ``alpha``: recovery, SGD (momentum 0.9) on the neuron masks for the loss
      ``alpha * CE``.
    - ``pruning_threshold``: prune neurons whose mask ends at or below it.
    - ``batch_size``, ``momentum``, ``weight_decay`` (unlearning's SGD), ``crop``, ``rotation``, ``flip``, ``seed``.
    """

    name = "rnp"
    citation = "Li et al., Reconstructive Neuron Pruning for Backdoor Defense (RNP), ICML 2023"

    unlearn_lr: float = 0.01
    unlearn_epochs: int = 20
    unlearn_lr_step: int = 10
    unlearn_acc: float = 0.2
    check_every: int = 1
    max_grad_norm: float = 20.0
    mask_lr: float = 0.2
    mask_epochs: int = 20
    alpha: float = 0.2
    pruning_threshold: float = 0.2
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop: int = 4
    rotation: float = 0.0
    flip: bool = True
    seed: int = 0
    masks: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_positive_ints(self, "unlearn_epochs", "mask_epochs", "batch_size")
        check_positive_ints(self, "unlearn_lr_step", "check_every", minimum=0)
        check_positive(self, "unlearn_lr", "max_grad_norm", "mask_lr", "alpha")
        check_range("unlearn_acc", self.unlearn_acc, 0, 1)
        check_range("pruning_threshold", self.pruning_threshold, 0, 1)
        check_momentum_decay(self)
        check_augmentation(self)

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        x, y, x_val, y_val = clean_tensors(clean, dev)
        work = copy_model(model, dev)
        layers = neuron_layers(work)
        base = accuracy(work, x_val, y_val, batch_size=500, device=dev)
        augmentation = Augmentation(self.crop, self.rotation, self.flip)

        # (1) Unlearning: ascend the clean loss until the clean task is gone.
        opt = sgd(work, self.unlearn_lr, self.momentum, self.weight_decay)
        steps = -(-len(x) // self.batch_size)
        unlearn = tune(
            work, x, y, epochs=self.unlearn_epochs, batch_size=self.batch_size, optimizer=opt,
            lr_at=lambda s: step_lr(self.unlearn_lr, s // steps, self.unlearn_lr_step),
            x_val=x_val, y_val=y_val, augmentation=augmentation,
            loss_fn=lambda net, xb, yb: -F.cross_entropy(net(xb).float(), yb), max_grad_norm=self.max_grad_norm,
            stop=lambda h: h["val_acc"] <= self.unlearn_acc, check_every=self.check_every, seed=self.seed,
            desc="rnp unlearn", progress=progress,
        )
        for h in unlearn:
            h["loss"] = -h["loss"]  # the clean cross-entropy, which unlearning raises
        unlearned = unlearn[-1]["val_acc"] <= self.unlearn_acc

        # (2) Recovery: learn neuron masks on the unlearned model, weights fixed.
        self.masks, recover = recover_masks(
            work, [name for name, _ in layers], x, y, lr=self.mask_lr, epochs=self.mask_epochs, alpha=self.alpha,
            batch_size=self.batch_size, augmentation=augmentation, seed=self.seed + 1, progress=progress)

        # (3) Pruning: the original model's neurons the recovery turned down.
        defended = copy_model(model, dev)
        pruned = prune(defended, self.masks, self.pruning_threshold)
        all_masks = torch.cat(list(self.masks.values()))
        self.report = {
            "base_val_acc": base,
            "unlearned": unlearned,
            "unlearn_history": unlearn,
            "recover_history": recover,
            "neurons": len(all_masks),
            "pruned": pruned,
            "n_pruned": sum(len(v) for v in pruned.values()),
            "mask_quantiles": [round(float(q), 4) for q in torch.quantile(
                all_masks, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))],
            "final_val_acc": accuracy(defended, x_val, y_val, batch_size=500, device=dev),
            "seconds": round(time.perf_counter() - started, 3),
        }
        return defended.eval()
