"""The adaptive cost of Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019), which UNIT's official code reuses for the weight of its bound regulariser: the
weight of a penalty grows while a constraint holds and shrinks while it fails, so the optimisation settles where the
constraint just binds."""

from __future__ import annotations

from dataclasses import dataclass, field

RESTARTS = ("at_zero", "below_start")


@dataclass
class AdaptiveCost:
    """A penalty weight adapted once per check.

    - After ``patience`` consecutive checks where the constraint holds, the weight is multiplied by ``up``; after
      ``patience`` consecutive checks where it fails, divided by ``down`` (Neural Cleanse: 2 and 2^1.5).
    - ``restart``: when the weight is (re)set to ``start``. ``at_zero`` (Neural Cleanse): the weight starts at 0
      and is set to ``start`` once the constraint has held ``patience`` checks in a row. ``below_start`` (UNIT's
      official code): the weight starts at ``start`` and is set back to it whenever it has fallen below it and the
      constraint has held ``patience`` checks in a row.
    - ``raised`` / ``lowered``: whether the weight has ever been multiplied / divided since the last restart
      (Neural Cleanse stops early only after both).
    """

    start: float
    patience: int = 5
    up: float = 2.0
    down: float = 2.0**1.5
    restart: str = "below_start"
    value: float = field(init=False)
    raised: bool = field(init=False, default=False)
    lowered: bool = field(init=False, default=False)
    _held: int = field(init=False, default=0)
    _failed: int = field(init=False, default=0)
    _restart_count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.restart not in RESTARTS:
            raise ValueError(f"unknown restart {self.restart!r}; valid choices: {', '.join(RESTARTS)}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {self.patience!r}")
        if not (self.start > 0 and self.up > 1 and self.down > 1):
            raise ValueError(f"start must be > 0 and up, down > 1, got start={self.start!r}, up={self.up!r}, "
                             f"down={self.down!r}")
        self.value = 0.0 if self.restart == "at_zero" else self.start

    def update(self, holds: bool) -> float:
        """Record one check of the constraint; returns the weight for the next step."""
        waiting = self.value == 0 if self.restart == "at_zero" else self.value < self.start
        if waiting and holds:
            self._restart_count += 1
            if self._restart_count >= self.patience:
                self.value, self._held, self._failed, self._restart_count = self.start, 0, 0, 0
                self.raised = self.lowered = False
        else:
            self._restart_count = 0
        if holds:
            self._held, self._failed = self._held + 1, 0
        else:
            self._held, self._failed = 0, self._failed + 1
        if self._held >= self.patience:
            self._held, self.raised = 0, True
            self.value *= self.up
        elif self._failed >= self.patience:
            self._failed, self.lowered = 0, True
            self.value /= self.down
        return self.value
