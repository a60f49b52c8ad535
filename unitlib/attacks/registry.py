"""The attack registry: ``get(name, **params)`` builds an attack, refusing unknown names and parameters."""

from __future__ import annotations

from ..registry import Registry

REGISTRY: Registry = Registry("attack", reserved=("target", "poison_rate", "seed"))
ATTACKS = REGISTRY.classes
register = REGISTRY.register
get = REGISTRY.get
parameters = REGISTRY.parameters
attack_class = REGISTRY.cls
