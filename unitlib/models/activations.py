"""Activation functions by name (the appendix's Table 7 swaps ReLU for each of these)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leakyrelu": lambda: nn.LeakyReLU(0.01),
    "selu": nn.SELU,
    "elu": nn.ELU,
    "tanhshrink": nn.Tanhshrink,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}

# Activation module types, so that UNIT can find every activation site by type.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.SELU, nn.ELU, nn.Tanhshrink, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.GELU,
)


def make_activation(name: str) -> nn.Module:
    """A fresh activation module (never shared between layers, so each site has its own hook)."""
    key = name.lower().replace("_", "").replace("-", "")
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid choices: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[key]()
