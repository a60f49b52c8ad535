"""NC: Neural Cleanse. Wang, Yao, Shan, Li, Viswanath, Zheng and Zhao, "Neural Cleanse: Identifying and
Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019.

For every class, a trigger (a mask ``m`` over pixels and a pattern ``p``, stamped as ``(1 - m) x + m p`` in [0, 1]
pixel space) is reverse-engineered on the defender's clean images: the smallest mask (L1 norm) that sends them to
that class. A backdoor target needs a much smaller mask than the other classes: the masks' L1 norms are scored
with the median absolute deviation (anomaly index = |norm - median| / (1.4826 MAD)), and classes whose norm lies
below the median with an index above 2 are flagged. The model is then unlearned by fine-tuning on clean data where
20% of the images carry a flagged class's reversed trigger and keep their true labels. If no class is flagged the
model is returned unchanged and the report says so.

Optimisation as the official code: mask and pattern through tanh, Adam (lr 0.1, betas 0.5/0.9), batch 32, the
cost of the L1 term starting at 0, set to 1e-3 once the reversed trigger succeeds on 99% of a step's images for 5
steps, then multiplied by 2 (or divided by 2^1.5) after 5 consecutive steps above (below) 99%; early stop once the
best norm has not improved for 25 steps after the cost has moved both ways; the kept trigger is the one with the
smallest norm among steps that reached 99%. A step is ``batches_per_step`` mini-batches (the official example: about
1,000 images per step, 1,000 steps; ``steps`` bounds the budget). The paper unlearns for one epoch over 10% of the
training set; the defender here holds less, so ``unlearn_epochs`` is a parameter (default 2).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

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
)
from .schedule import AdaptiveCost

_EPS = 1e-7  # keeps tanh-space values finite at the [0, 1] ends (the official code's K.epsilon())


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's trigger: ``(1 - mask) * x + mask * pattern`` (mask H x W, pattern C x H x W, all in [0, 1])."""
    return (1 - mask) * x + mask * pattern


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """|norm - median| / (1.4826 * MAD) of each class's mask L1 norm (MAD: median absolute deviation)."""
    median = norms.median()
    mad = 1.4826 * (norms - median).abs().median()
    return (norms - median).abs() / mad.clamp(min=1e-12)


@register
@dataclass
class NC(Defense):
    """Neural Cleanse. Parameters:

    - ``steps``, ``batches_per_step``, ``batch_size``, ``lr``: reverse engineering per class (``batches_per_step``
      0: one pass over the optimise split per step).
    - ``classes_per_pass``: how many classes' triggers are reversed at once on shared mini-batches (0: all; 1: one
      class after another, as the official code). Each class's optimisation is the same either way; on a CPU one
      batch of ``classes x batch_size`` stamped images runs several times faster per image than ``batch_size``
      (``benchmarks/nc_seconds.py``).
    - ``init_cost``, ``patience``, ``cost_multiplier``, ``attack_threshold``, ``early_stop_patience``: the cost
      schedule and early stop.
    - ``anomaly_threshold``: flag classes with an anomaly index above this (on the small side).
    - ``unlearn_fraction``, ``unlearn_epochs``, ``unlearn_lr``, ``unlearn_batch_size``, ``momentum``,
      ``weight_decay``, ``crop``, ``rotation``, ``flip``: the unlearning fine-tune.
    """

    name = "nc"
    citation = "Wang et al., Neural Cleanse, IEEE S&P 2019"
    # Records made before ``classes_per_pass`` existed reversed one class after another.
    added_params: ClassVar[dict[str, Any]] = {"classes_per_pass": 1}

    steps: int = 1000
    batches_per_step: int = 0
    classes_per_pass: int = 0
    batch_size: int = 32
    lr: float = 0.1
    init_cost: float = 1e-3
    patience: int = 5
    cost_multiplier: float = 2.0
    attack_threshold: float = 0.99
    early_stop_patience: int = 25
    anomaly_threshold: float = 2.0
    unlearn_fraction: float = 0.2
    unlearn_epochs: int = 2
    unlearn_lr: float = 1e-2
    unlearn_batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop: int = 4
    rotation: float = 0.0
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_ints(self, "steps", "batch_size", "patience", "early_stop_patience", "unlearn_batch_size")
        check_positive_ints(self, "batches_per_step", "classes_per_pass", "unlearn_epochs", minimum=0)
        check_positive(self, "lr", "init_cost", "anomaly_threshold", "unlearn_lr")
        check_range("cost_multiplier", self.cost_multiplier, 1, math.inf, low_open=True)
        check_range("attack_threshold", self.attack_threshold, 0, 1, low_open=True)
        check_range("unlearn_fraction", self.unlearn_fraction, 0, 1, low_open=True)
        check_momentum_decay(self)
        check_augmentation(self)

    # -- reverse engineering ---------------------------------------------------------------------------------------
    def reverse(self, model: nn.Module, x: torch.Tensor, target: int, gen: torch.Generator,
                bar: tqdm) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The smallest-norm trigger sending ``x`` to ``target``: (mask H x W, pattern C x H x W, log)."""
        return self.reverse_classes(model, x, [target], gen, bar)[0]

    def reverse_classes(self, model: nn.Module, x: torch.Tensor, targets: list[int], gen: torch.Generator,
                        bar: tqdm) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        """:meth:`reverse` for several classes at once, on shared mini-batches: every step stamps the same images with
        each class's trigger and runs them through the model as one batch. Each class keeps its own mask, pattern,
        cost schedule and early stop, and its loss reaches only its own trigger (the Adam update is elementwise), so a
        class's optimisation is the one-class optimisation on the same images; a class that has stopped leaves the
        batch. One class at a time draws random numbers in the order the one-class loop always has."""
        dev = x.device
        _, c, h, w = x.shape
        g_count = len(targets)
        # random start, as the official example; tanh space so that mask and pattern stay in [0, 1]
        starts = [(torch.rand(h, w, generator=gen), torch.rand(c, h, w, generator=gen)) for _ in targets]
        mask_t = torch.stack([torch.atanh((m - 0.5) * (2 - _EPS)) for m, _ in starts]).to(dev).requires_grad_(True)
        pattern_t = torch.stack([torch.atanh((p - 0.5) * (2 - _EPS)) for _, p in starts]).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([mask_t, pattern_t], lr=self.lr, betas=(0.5, 0.9))
        n = len(x)
        per_step = self.batches_per_step or math.ceil(n / self.batch_size)
        target_t = torch.tensor(targets, device=dev)

        def current() -> tuple[torch.Tensor, torch.Tensor]:
            return torch.tanh(mask_t) / (2 - _EPS) + 0.5, torch.tanh(pattern_t) / (2 - _EPS) + 0.5

        costs = [AdaptiveCost(self.init_cost, self.patience, self.cost_multiplier, self.cost_multiplier**1.5,
                              restart="at_zero") for _ in targets]
        best_norm, best = [math.inf] * g_count, [None] * g_count
        stop_count, stop_best = [0] * g_count, [math.inf] * g_count
        steps_run = [0] * g_count
        active = list(range(g_count))
        perm, cursor = torch.randperm(n, generator=gen).to(dev), 0
        for _ in range(self.steps):
            if not active:
                break
            act = torch.tensor(active, device=dev)
            cost_t = torch.tensor([costs[i].value for i in active], device=dev)
            hits = torch.zeros(len(active), dtype=torch.float64, device=dev)
            norm_sum = torch.zeros(len(active), dtype=torch.float64, device=dev)
            seen = 0
            for _ in range(per_step):
                if cursor >= n:
                    perm, cursor = torch.randperm(n, generator=gen).to(dev), 0
                idx = perm[cursor : cursor + self.batch_size]
                cursor += self.batch_size
                mask, pattern = current()
                mask, pattern = mask[act], pattern[act]
                xb = x[idx]
                stamped = stamp(xb[None], mask[:, None, None], pattern[:, None])  # classes x batch x C x H x W
                with autocast(dev):
                    logits = model(stamped.flatten(0, 1)).float().view(len(active), len(idx), -1)
                labels = target_t[act][:, None].expand(-1, len(idx))
                ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(len(active), -1)
                norm = mask.flatten(1).sum(1)
                loss = (ce.mean(1) + cost_t * norm).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    hits += (logits.argmax(2) == labels).sum(1)
                    norm_sum += norm.detach().double() * len(idx)
                seen += len(idx)
            bar.update(len(active))
            accs, norms = (hits / seen).tolist(), (norm_sum / seen).tolist()
            m_all, p_all = current()
            for j, i in enumerate(list(active)):
                steps_run[i] += 1
                acc, norm_avg = accs[j], norms[j]
                if acc >= self.attack_threshold and norm_avg < best_norm[i]:
                    best_norm[i] = norm_avg
                    best[i] = (m_all[i].detach().clone(), p_all[i].detach().clone())
                if best_norm[i] < math.inf:
                    stop_count[i] = stop_count[i] + 1 if best_norm[i] >= stop_best[i] else 0
                stop_best[i] = min(stop_best[i], best_norm[i])
                if costs[i].raised and costs[i].lowered and stop_count[i] >= self.early_stop_patience:
                    active.remove(i)
                    continue
                costs[i].update(acc >= self.attack_threshold)
            if g_count == 1:
                bar.set_postfix(target=targets[0], acc=f"{accs[0]:.2f}", norm=f"{norms[0]:.1f}",
                                cost=f"{costs[0].value:.1e}")
            else:
                bar.set_postfix(classes=len(active), best_norms=",".join(f"{v:.0f}" for v in best_norm))
        out = []
        m_all, p_all = current()
        for i, target in enumerate(targets):
            found = best[i] is not None
            m, p = best[i] if found else (m_all[i].detach().clone(), p_all[i].detach().clone())
            out.append((m, p, {"target": target, "norm": float(m.sum()), "reached_threshold": found,
                               "steps": steps_run[i]}))
        return out

    # -- the defense -----------------------------------------------------------------------------------------------
    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        x, y, x_val, y_val = clean_tensors(clean, dev)
        frozen = copy_model(model, dev).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        k = num_classes(frozen, x)
        gen = torch.Generator().manual_seed(self.seed)
        triggers, logs = [], []
        bar = tqdm(total=k * self.steps, desc="nc reverse", unit="class-step", disable=not progress)
        group = self.classes_per_pass or k
        for first in range(0, k, group):
            targets = list(range(first, min(first + group, k)))
            for mask, pattern, log in self.reverse_classes(frozen, x, targets, gen, bar):
                triggers.append((mask, pattern))
                logs.append(log)
        bar.close()
        norms = torch.tensor([log["norm"] for log in logs])
        index = anomaly_index(norms)
        median = norms.median()
        flagged = [t for t in range(k) if norms[t] < median and index[t] > self.anomaly_threshold]
        reverse_seconds = time.perf_counter() - started

        base = accuracy(frozen, x_val, y_val, batch_size=500, device=dev)
        self.report = {
            "base_val_acc": base,
            "norms": [round(float(v), 3) for v in norms],
            "anomaly_index": [round(float(v), 3) for v in index],
            "flagged": flagged,
            "reverse": logs,
            "seconds_reverse": round(reverse_seconds, 3),
        }
        if not flagged:
            self.report.update(unlearned=False, note="no class flagged: the model is returned unchanged",
                               final_val_acc=base, history=[], seconds=round(time.perf_counter() - started, 3))
            return copy_model(model, dev).eval()

        masks = torch.stack([triggers[t][0] for t in flagged])
        patterns = torch.stack([triggers[t][1] for t in flagged])

        def with_trigger(xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            n = len(xb)
            chosen = torch.randperm(n, generator=g)[: round(self.unlearn_fraction * n)].to(xb.device)
            which = torch.randint(len(flagged), (len(chosen),), generator=g).to(xb.device)
            xb = xb.clone()
            xb[chosen] = stamp(xb[chosen], masks[which][:, None], patterns[which])
            return xb, yb  # true labels: the model unlearns the trigger

        defended = copy_model(model, dev)
        history = finetune(
            defended, x, y, epochs=self.unlearn_epochs, lr=self.unlearn_lr, batch_size=self.unlearn_batch_size,
            x_val=x_val, y_val=y_val, augmentation=Augmentation(self.crop, self.rotation, self.flip),
            momentum=self.momentum, weight_decay=self.weight_decay, transform=with_trigger, seed=self.seed,
            desc="nc unlearn", progress=progress,
        ) if self.unlearn_epochs else []
        self.report.update(unlearned=True, final_val_acc=history[-1]["val_acc"] if history else base,
                           history=history, seconds=round(time.perf_counter() - started, 3))
        return defended.eval()
