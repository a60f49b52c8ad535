"""Backdoor attacks, one module each, one registry (``get``, ``ATTACKS``)."""

from . import adap_blend, adaptive, badnets, blend, cl, instagram, narcissus, refool, sig, trojan, wanet  # noqa: F401
from .base import Attack, Poisoned
from .registry import ATTACKS, REGISTRY, attack_class, get, parameters

__all__ = ["ATTACKS", "REGISTRY", "Attack", "Poisoned", "attack_class", "get", "parameters"]
