"""The defense interface: one signature for every defense,
``defense(model, clean, device=..., progress=...) -> defended model``.

A defense sees only the model and the defender's clean split (``CleanSplit``): never test data, never the trigger.
Diagnostics of the last run (steps taken, thresholds) are left in ``defense.report``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..registry import Registry


class CleanSplit(NamedTuple):
    """The defender's clean data: an optimise part and a validate part (images uint8 or float in [0, 1])."""

    x_opt: torch.Tensor
    y_opt: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@dataclass
class Defense:
    name: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    report: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(
        self, model: nn.Module, clean: CleanSplit, *, device: str | torch.device | None = None, progress: bool = True
    ) -> nn.Module:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Every parameter's value, defaults included (what a record stores, so later default changes are visible)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


REGISTRY: Registry = Registry("defense")
DEFENSES = REGISTRY.classes
register = REGISTRY.register
get = REGISTRY.get
parameters = REGISTRY.parameters


@register
@dataclass
class NoDefense(Defense):
    """The identity: the backdoored model as it is (the tables' "No Defense" rows)."""

    name = "none"

    def __call__(self, model, clean, *, device=None, progress=True):  # type: ignore[override]
        return model
