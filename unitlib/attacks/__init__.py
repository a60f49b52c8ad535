"""Backdoor attacks, one module each, one registry (``get``, ``ATTACKS``)."""

from . import badnets, blend  # noqa: F401  (registration)
from .base import Attack, Poisoned
from .registry import ATTACKS, REGISTRY, attack_class, get, parameters

__all__ = ["ATTACKS", "REGISTRY", "Attack", "Poisoned", "attack_class", "get", "parameters"]
