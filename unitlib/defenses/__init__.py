"""Backdoor defenses, one module each, one registry (``get``, ``DEFENSES``) and one signature.

UNIT and the seven baselines of the appendix (A.1): FT, FP, NAD, ANP, NC, I-BAU and SEAM."""

from . import anp, fp, ft, nad, nc, unit  # noqa: F401  (registration)
from .anp import ANP
from .base import DEFENSES, REGISTRY, CleanSplit, Defense, NoDefense, get, parameters
from .fp import FP
from .ft import FT
from .nad import NAD
from .nc import NC
from .unit import UNIT, BoundedModel

__all__ = ["ANP", "DEFENSES", "FP", "FT", "NAD", "NC", "REGISTRY", "UNIT", "BoundedModel", "CleanSplit", "Defense", "NoDefense", "get",
           "parameters"]
