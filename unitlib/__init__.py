"""unitlib: a reproducible companion to the appendix of "UNIT: Backdoor Mitigation via Automated Neural
Distribution Tightening" (Cheng et al., ECCV 2024)."""

__version__ = "0.1.0"
