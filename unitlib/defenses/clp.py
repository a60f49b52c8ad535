"""CLP: Channel Lipschitzness-based Pruning. Zheng, Zhang, Wang, Zhao and Li, "Data-free Backdoor Removal based on
Channel Lipschitzness", ECCV 2022.

A backdoor channel reacts strongly to a small trigger: its Lipschitz constant, the most its output can grow per unit
of input change, stands out among its layer's channels. For a convolution followed by BatchNorm, channel k computes
``gamma_k / sigma_k * (W_k * x) + const`` (``sigma_k`` the running standard deviation), and the upper bound of its
channel Lipschitz constant (UCLC) is the spectral norm of its kernel ``W_k``, reshaped to (input channels) x (kernel
positions), times ``|gamma_k / sigma_k|``. Within each layer, channels whose UCLC exceeds ``mean + u * std`` of the
layer's UCLCs are pruned: their BatchNorm scale and shift set to zero, as in the official code, so the channel
outputs a constant zero. No data and no training: the decision reads the weights only.

Default ``u`` = 3, the paper's default (its sensitivity study sweeps u; BackdoorBench's CLP configuration uses 3
too). Each BatchNorm layer is paired with the last convolution called before it in a forward pass whose output
channels match (the official code takes the last convolution in module order); a pooling layer between them, as in
the small CNN's groups, is 1-Lipschitz and does not change the bound. ``sigma`` is sqrt(running variance + eps), what
BatchNorm divides by (the official code leaves out eps). A model without a convolution followed by BatchNorm raises
an error. Nothing here is scaled down for a CPU: one batched matrix-norm computation per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..metrics import accuracy
from ..train import resolve_device
from .base import CleanSplit, Defense, register
from .common import as_float, check_range, copy_model


def conv_batchnorm_pairs(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution name, BatchNorm name) for every BatchNorm2d whose input comes from a convolution: the last
    Conv2d called before it in a forward pass of ``sample`` with as many output channels as it has features."""
    modules = dict(model.named_modules())
    calls: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, inp, name=name: calls.append(name))
               for name, m in modules.items() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(sample)
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    pairs: list[tuple[str, str]] = []
    last_conv: str | None = None
    for name in calls:
        module = modules[name]
        if isinstance(module, nn.Conv2d):
            last_conv = name
        elif last_conv is not None and modules[last_conv].out_channels == module.num_features:
            if module.affine and module.track_running_stats and (last_conv, name) not in pairs:
                pairs.append((last_conv, name))
    return pairs


@torch.no_grad()
def channel_lipschitz_bound(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC of each output channel: the spectral norm of the channel's kernel (input channels x kernel positions)
    times |gamma / sigma| of its BatchNorm."""
    w = conv.weight.detach().float()
    kernels = w.reshape(w.shape[0], w.shape[1], -1)
    spectral = torch.linalg.matrix_norm(kernels, ord=2)
    scale = bn.weight.detach().float().abs() / torch.sqrt(bn.running_var.float() + bn.eps)
    return spectral * scale


@register
@dataclass
class CLP(Defense):
    """Channel Lipschitzness-based pruning (data-free). Parameters:

    - ``u``: a channel is pruned when its UCLC exceeds the mean plus ``u`` standard deviations of its layer's.

    The clean split is used only for the shape of a traced input and for the report's validation accuracies; the
    pruning decision reads no data.
    """

    name = "clp"
    citation = "Zheng et al., Data-free Backdoor Removal based on Channel Lipschitzness (CLP), ECCV 2022"

    u: float = 3.0

    def __post_init__(self) -> None:
        check_range("u", self.u, 0, float("inf"))

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        dev = resolve_device(device)
        started = time.perf_counter()
        model = copy_model(model, dev)
        sample = torch.zeros(1, *clean.x_opt.shape[1:], device=dev)
        pairs = conv_batchnorm_pairs(model, sample)
        if not pairs:
            raise ValueError("CLP bounds the Lipschitz constant of convolution channels followed by BatchNorm; this "
                             "model has no Conv2d followed by an affine BatchNorm2d with running statistics")
        x_val, y_val = as_float(clean.x_val).to(dev), clean.y_val.long().to(dev)
        base = accuracy(model, x_val, y_val, batch_size=500, device=dev) if len(x_val) else None
        modules = dict(model.named_modules())
        pruned: dict[str, list[int]] = {}
        thresholds: dict[str, float] = {}
        with torch.no_grad():
            for conv_name, bn_name in pairs:
                bn = modules[bn_name]
                bound = channel_lipschitz_bound(modules[conv_name], bn)
                threshold = bound.mean() + self.u * bound.std() if len(bound) > 1 else bound.max()
                idx = torch.nonzero(bound > threshold).flatten()
                thresholds[bn_name] = round(float(threshold), 6)
                if len(idx):
                    bn.weight[idx] = 0.0
                    bn.bias[idx] = 0.0
                    pruned[bn_name] = idx.tolist()
        self.report = {
            "base_val_acc": base,
            "layers": [list(p) for p in pairs],
            "channels": sum(modules[b].num_features for _, b in pairs),
            "thresholds": thresholds,
            "pruned": pruned,
            "n_pruned": sum(len(v) for v in pruned.values()),
            "final_val_acc": accuracy(model, x_val, y_val, batch_size=500, device=dev) if len(x_val) else None,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return model.eval()
