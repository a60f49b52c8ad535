"""Backdoor defenses, one module each, one registry (``get``, ``DEFENSES``) and one signature.

UNIT and the seven baselines of the appendix (A.1): FT, FP, NAD, ANP, NC, I-BAU and SEAM."""

from . import anp, fp, ft, ibau, nad, nc, seam, unit  # noqa: F401  (registration)
from .anp import ANP
from .base import DEFENSES, REGISTRY, CleanSplit, Defense, NoDefense, get, parameters
from .fp import FP
from .ft import FT
from .ibau import IBAU
from .nad import NAD
from .nc import NC
from .seam import SEAM
from .unit import UNIT, BoundedModel

__all__ = ["ANP", "DEFENSES", "FP", "FT", "IBAU", "NAD", "NC", "REGISTRY", "SEAM", "UNIT", "BoundedModel",
           "CleanSplit", "Defense", "NoDefense", "get", "parameters"]
