"""ANP: Adversarial Neuron Pruning. Wu and Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models",
NeurIPS 2021.

Backdoor neurons are the ones whose small multiplicative perturbation collapses the model. Every BatchNorm channel
(a neuron) gets a mask ``m`` in [0, 1] and adversarial perturbations ``delta`` (of its scale) and ``xi`` (of its
shift), both within ``[-eps, eps]``: the layer computes ``BN(x) * gamma * (m + delta) + beta * (1 + xi)``. Each
iteration draws a clean batch, takes ``pgd_steps`` signed-gradient ascent steps on the perturbations from a random
start, then one SGD step on the masks for ``alpha * CE(masked) + (1 - alpha) * CE(masked and perturbed)``. Neurons
whose mask ends at or below ``threshold`` are pruned (their BatchNorm scale set to zero, as the official code).

Defaults are the official code's: eps 0.4, one perturbation step, alpha 0.2, mask lr 0.2 (SGD, momentum 0.9),
batch 128 drawn with replacement from the clean data with crop and flip, 2000 iterations, threshold 0.2. The UNIT
authors used alpha 0.5 (0.3 or 0.4 against WaNet). As in the official code the masks are optimised with batch
statistics in the BatchNorm layers; the running statistics are left unchanged. After each ascent step the
perturbations are clipped to [-eps, eps], the paper's constraint. Works through forward hooks on every
affine BatchNorm layer, so any architecture that has them; a model without raises an error.
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
    batchnorm_layers,
    check_augmentation,
    check_positive,
    check_positive_ints,
    check_range,
    clean_tensors,
    copy_model,
)


class NeuronPerturbation:
    """Masks and perturbations of one BatchNorm layer's channels, applied through a forward hook."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm) -> None:
        c, dev = module.num_features, module.weight.device
        self.module = module
        self.mask = torch.ones(c, device=dev, requires_grad=True)
        self.noise = torch.zeros(c, device=dev, requires_grad=True)
        self.noise_bias = torch.zeros(c, device=dev, requires_grad=True)
        self.perturbed = False
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module: nn.modules.batchnorm._BatchNorm, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        scale = self.mask + self.noise if self.perturbed else self.mask
        shift = 1 + self.noise_bias if self.perturbed else 1
        bias = module.bias * shift if module.bias is not None else None
        # batch statistics, as the official mask optimisation (model.train()); momentum 0 leaves the running ones
        return F.batch_norm(inputs[0], module.running_mean, module.running_var, module.weight * scale, bias,
                            training=True, momentum=0.0, eps=module.eps)

    def reset(self, eps: float, generator: torch.Generator) -> None:
        with torch.no_grad():
            for t in (self.noise, self.noise_bias):
                t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1).mul_(eps))


@register
@dataclass
class ANP(Defense):
    """Adversarial neuron pruning. Parameters:

    - ``eps``: bound of the multiplicative neuron perturbations; ``pgd_steps``: ascent steps per iteration.
    - ``alpha``: weight of the natural loss (1 - alpha on the perturbed loss).
    - ``mask_lr``, ``iterations``, ``batch_size``: mask optimisation (SGD with momentum 0.9).
    - ``threshold``: prune neurons whose mask is <= this.
    - ``crop``, ``rotation``, ``flip``, ``seed``: augmentation of the sampled batches.
    """

    name = "anp"
    citation = "Wu and Wang, Adversarial Neuron Pruning Purifies Backdoored Deep Models (ANP), NeurIPS 2021"

    eps: float = 0.4
    pgd_steps: int = 1
    alpha: float = 0.2
    mask_lr: float = 0.2
    iterations: int = 2000
    batch_size: int = 128
    threshold: float = 0.2
    crop: int = 4
    rotation: float = 0.0
    flip: bool = True
    seed: int = 0
    masks: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    """After a call: the final mask of every BatchNorm layer's neurons, keyed by layer name."""

    def __post_init__(self) -> None:
        check_range("eps", self.eps, 0, 1)
        check_range("alpha", self.alpha, 0, 1)
        check_range("threshold", self.threshold, 0, 1)
        check_positive(self, "mask_lr")
        check_positive_ints(self, "pgd_steps", "iterations", "batch_size")
        check_augmentation(self)

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        x, y, x_val, y_val = clean_tensors(clean, dev)
        work = copy_model(model, dev).eval()
        layers = batchnorm_layers(work)
        for p in work.parameters():
            p.requires_grad_(False)
        base = accuracy(work, x_val, y_val, batch_size=500, device=dev)

        perts = [NeuronPerturbation(m) for _, m in layers]
        masks = [p.mask for p in perts]
        noises = [t for p in perts for t in (p.noise, p.noise_bias)]
        mask_opt = torch.optim.SGD(masks, lr=self.mask_lr, momentum=0.9)
        noise_opt = torch.optim.SGD(noises, lr=self.eps / self.pgd_steps)
        gen = torch.Generator().manual_seed(self.seed)
        augmentation = Augmentation(self.crop, self.rotation, self.flip)

        def set_perturbed(on: bool) -> None:
            for p in perts:
                p.perturbed = on

        history = []
        bar = tqdm(range(self.iterations), desc="anp", unit="it", disable=not progress)
        loss_sum = acc_sum = 0.0
        try:
            for it in bar:
                idx = torch.randint(len(x), (self.batch_size,), generator=gen).to(dev)
                xb, yb = augmentation(x[idx], gen), y[idx]
                if self.eps > 0:
                    for p in perts:
                        p.reset(self.eps, gen)
                    set_perturbed(True)
                    for _ in range(self.pgd_steps):
                        noise_opt.zero_grad(set_to_none=True)
                        with autocast(dev):
                            loss_noise = -F.cross_entropy(work(xb).float(), yb)
                        loss_noise.backward()
                        for t in noises:
                            t.grad = t.grad.sign()
                        noise_opt.step()
                        with torch.no_grad():
                            for t in noises:
                                t.clamp_(-self.eps, self.eps)
                mask_opt.zero_grad(set_to_none=True)
                loss_rob = torch.zeros((), device=dev)
                if self.eps > 0:
                    set_perturbed(True)
                    with autocast(dev):
                        loss_rob = F.cross_entropy(work(xb).float(), yb)
                set_perturbed(False)
                with autocast(dev):
                    out = work(xb).float()
                loss_nat = F.cross_entropy(out, yb)
                loss = self.alpha * loss_nat + (1 - self.alpha) * loss_rob
                loss.backward()
                mask_opt.step()
                with torch.no_grad():
                    for m in masks:
                        m.clamp_(0, 1)
                loss_sum += loss.item()
                acc_sum += (out.argmax(1) == yb).float().mean().item()
                if (it + 1) % 100 == 0 or it + 1 == self.iterations:
                    count = (it % 100) + 1
                    history.append({"iteration": it + 1, "loss": round(loss_sum / count, 5),
                                    "train_acc": round(acc_sum / count, 4)})
                    bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{acc_sum / count:.3f}")
                    loss_sum = acc_sum = 0.0
        finally:
            for p in perts:
                p.handle.remove()
        bar.close()

        defended = copy_model(model, dev)
        modules = dict(defended.named_modules())
        pruned: dict[str, list[int]] = {}
        self.masks = {name: p.mask.detach().float().cpu() for (name, _), p in zip(layers, perts, strict=True)}
        with torch.no_grad():
            for (name, _), p in zip(layers, perts, strict=True):
                idx = torch.nonzero(p.mask.detach() <= self.threshold).flatten()
                if len(idx):
                    modules[name].weight[idx] = 0.0
                    pruned[name] = idx.tolist()
        n_neurons = sum(len(p.mask) for p in perts)
        self.report = {
            "base_val_acc": base,
            "neurons": n_neurons,
            "pruned": pruned,
            "n_pruned": sum(len(v) for v in pruned.values()),
            "mask_quantiles": [round(float(q), 4) for q in torch.quantile(
                torch.cat([m.detach().float().cpu() for m in masks]), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))],
            "final_val_acc": accuracy(defended, x_val, y_val, batch_size=500, device=dev),
            "history": history,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return defended.eval()
