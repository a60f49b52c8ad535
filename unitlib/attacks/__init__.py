"""Backdoor attacks, one module each, one registry (``get``, ``ATTACKS``)."""

from . import (  # noqa: F401
    adap_blend, adaptive, badnets, blend, cl, combat, dfst, dynamic, ia, instagram, issba, lira, narcissus, refool, sig,
    trojan, wanet,
)
from .base import Attack, Poisoned
from .registry import ATTACKS, REGISTRY, attack_class, get, parameters

# Budgets for the attacks that train a generator with the model where every run is live (the book's smoke profile:
# 6 epochs of a small CNN, about 190 steps). IA: a narrower generator, its mask pre-training on 1,000 images, and a
# fifth as many cross-trigger samples as payload ones (with as many, the small CNN does not learn the backdoor in 6
# epochs). Its mask pre-training keeps 10 epochs: after 2 (14 steps) the masks range from a few pixels to most of the
# image depending on the seed, and so does the backdoor. Dynamic: a 10x generator learning rate (at Adam's default
# the BaN barely moves in 190 steps). benchmarks/generator_smoke.py measures what they plant. LIRA, ISSBA, DFST and
# COMBAT: each module's own SMOKE_PARAMS, with the reasons beside them.
SMOKE_PARAMS: dict[str, dict[str, object]] = {
    "ia": {"generator_width": 4, "mask_epochs": 10, "mask_size": 1000, "cross_ratio": 0.2},
    "dynamic": {"generator_lr": 0.01},
    "lira": lira.SMOKE_PARAMS,
    "issba": issba.SMOKE_PARAMS,
    "dfst": dfst.SMOKE_PARAMS,
    "combat": combat.SMOKE_PARAMS,
}

__all__ = ["ATTACKS", "REGISTRY", "SMOKE_PARAMS", "Attack", "Poisoned", "attack_class", "get", "parameters"]
