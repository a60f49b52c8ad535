"""Clean accuracy and attack success rate (ASR). ASR counts test images whose true label is not the target,
with the trigger applied in [0, 1] pixel space, that the model assigns to the target."""

from __future__ import annotations

import torch
from torch import nn

from .attacks import Attack
from .train import resolve_device


@torch.inference_mode()
def predict(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000, device: str | torch.device | None = None
) -> torch.Tensor:
    """Predicted labels for images ``x`` (uint8 or float in [0, 1]), in batches, eval mode."""
    dev = resolve_device(device)
    model.eval()
    preds = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(dev)
        if xb.dtype == torch.uint8:
            xb = xb.float().div_(255)
        preds.append(model(xb).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> float:
    """Fraction of ``x`` classified as ``y``."""
    if len(x) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (predict(model, x, **kw) == y.cpu()).sum().item() / len(y)


def attack_success_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, *, key: str = "asr",
                        **kw) -> float:
    """Share of the attack's ``key`` images (``asr``: the non-target-class ones) that, with the trigger, are
    classified as the target."""
    xs = attack.asr_sets(x, y)[key]
    if not len(xs):
        raise ValueError(f"no test image for {key} (target class {attack.target})")
    trigger = attack.trigger_for(key)
    triggered = []
    for i in range(0, len(xs), 1000):
        part = xs[i : i + 1000]
        part = part.float().div(255) if part.dtype == torch.uint8 else part
        triggered.append(trigger(part).clamp(0, 1))
    triggered_all = torch.cat(triggered)
    return (predict(model, triggered_all, **kw) == attack.target).sum().item() / len(triggered_all)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, **kw) -> dict[str, float]:
    """``clean_acc`` and ``asr`` of ``model`` on a test set, and any ASR the attack adds (e.g. the label-specific
    attack's ``asr_non_victim``)."""
    out = {"clean_acc": accuracy(model, x, y, **kw)}
    for key in attack.asr_sets(x[:0], y[:0]):
        out[key] = attack_success_rate(model, x, y, attack, key=key, **kw)
    return out
