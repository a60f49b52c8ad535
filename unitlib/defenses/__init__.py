"""Backdoor defenses, one module each, one registry (``get``, ``DEFENSES``) and one signature.

UNIT and the seven baselines of the appendix (A.1): FT, FP, NAD, ANP, NC, I-BAU and SEAM."""

from . import ft, unit  # noqa: F401  (registration)
from .base import DEFENSES, REGISTRY, CleanSplit, Defense, NoDefense, get, parameters
from .ft import FT
from .unit import UNIT, BoundedModel

__all__ = ["DEFENSES", "FT", "REGISTRY", "UNIT", "BoundedModel", "CleanSplit", "Defense", "NoDefense", "get",
           "parameters"]
