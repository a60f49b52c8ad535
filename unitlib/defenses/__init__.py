"""Backdoor defenses, one module each, one registry (``get``, ``DEFENSES``) and one signature."""

from . import unit  # noqa: F401  (registration)
from .base import DEFENSES, REGISTRY, CleanSplit, Defense, NoDefense, get, parameters
from .unit import UNIT, BoundedModel

__all__ = ["DEFENSES", "REGISTRY", "UNIT", "BoundedModel", "CleanSplit", "Defense", "NoDefense", "get", "parameters"]
