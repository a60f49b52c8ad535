"""The attack interface: an attack turns a clean training set into a poisoned one and stamps its trigger on
test images. Images are float tensors in [0, 1] pixel space, N x C x H x W; triggers act before normalisation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch


class Poisoned(NamedTuple):
    """A poisoned training set: images, labels, and the indices whose image or label the attack changed.

    ``index`` holds every sample the attacker touched, so that no defender's "clean" split ever contains one.
    ``cover`` is the part of ``index`` that carries a trigger variant but keeps its true label on purpose (WaNet's
    noise-mode samples, Adap-Blend's regularisation samples); the payload is ``index`` without ``cover``. Attacks
    without such samples leave it empty."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    cover: torch.Tensor = torch.empty(0, dtype=torch.long)

    @property
    def payload(self) -> torch.Tensor:
        """The poisoned samples meant to carry the backdoor: ``index`` without ``cover``."""
        if not len(self.cover):
            return self.index
        return self.index[~torch.isin(self.index, self.cover)]


@dataclass
class Attack:
    """Base class. Subclasses are dataclasses whose fields are the attack's parameters (with the papers' defaults),
    implement :meth:`apply` (the trigger) and set ``name`` and ``clean_label``."""

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False
    citation: ClassVar[str] = ""
    # Attacks that learn their trigger from a clean or surrogate model (Trojan, CL, NARCISSUS) set this and
    # implement :meth:`prepare`; their ``apply``/``poison`` refuse to run before it.
    needs_prepare: ClassVar[bool] = False
    # Part of the model cache's key (``results.attack_identity``): raise it when the poisoned images an attack
    # makes change with parameters that do not, so that models trained the old way are not reused.
    cache_version: ClassVar[int] = 1
    # Parameters added after records were made, each with the value that reproduces how the attack ran before it
    # existed (normally its default). A record without such a parameter reads as made at that value
    # (``results.stale_reason``), and a model cache key leaves it out at that value (``results.attack_identity``), so
    # adding an option does not retire the records and models made without it.
    added_params: ClassVar[dict[str, object]] = {}

    target: int = 0
    poison_rate: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in [0, 1], got {self.poison_rate!r}")
        if self.target < 0:
            raise ValueError(f"target must be a class index >= 0, got {self.target!r}")

    # -- preparation ---------------------------------------------------------------------------------------------
    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, *, device: str | torch.device | None = None, progress: bool = False
    ) -> None:
        """Learn what the trigger needs from the attacker's view of the clean training set ``x`` (float in [0, 1])
        and ``y``: a clean or surrogate model, an optimised trigger, adversarial perturbations. Called by the
        experiment just before :meth:`poison`. A no-op for attacks whose trigger is fixed in advance."""
        del x, y, device, progress

    @property
    def prepared(self) -> bool:
        """Whether :meth:`apply` and :meth:`poison` can run (always, unless the attack ``needs_prepare``)."""
        return not self.needs_prepare or getattr(self, "_state", None) is not None

    def require_prepared(self) -> None:
        if not self.prepared:
            raise RuntimeError(
                f"attack {self.name!r} learns its trigger from a model: call .prepare(x_train, y_train) before "
                f".apply() or .poison()"
            )

    # -- the trigger ---------------------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the test-time trigger on images in [0, 1]; returns new images in [0, 1]."""
        raise NotImplementedError

    def asr_sets(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The test images whose rate of landing on the target, once triggered, is reported, by metric name:
        ``asr`` (every attack: the non-target-class images) and any attack-specific ones."""
        return {"asr": x[y != self.target]}

    def trigger_for(self, key: str):
        """The trigger stamped on the images of ``asr_sets()[key]`` (:meth:`apply` unless an attack says otherwise)."""
        del key
        return self.apply

    def apply_train(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger as stamped at poisoning time (the same as at test time unless an attack says otherwise)."""
        return self.apply(x)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A generator seeded by the attack's seed, so triggers and poisoned indices are reproducible."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    # -- poisoning -----------------------------------------------------------------------------------------------
    def select(self, y: torch.Tensor) -> torch.Tensor:
        """Indices to poison: ``poison_rate`` of the whole training set, drawn from non-target samples (dirty-label)
        or from target-class samples (clean-label)."""
        n = round(self.poison_rate * len(y))
        pool = torch.nonzero(y == self.target if self.clean_label else y != self.target).flatten()
        if n > len(pool):
            kind = "target-class" if self.clean_label else "non-target"
            raise ValueError(
                f"poison_rate {self.poison_rate} asks for {n} poisoned samples but only {len(pool)} {kind} samples exist"
            )
        perm = torch.randperm(len(pool), generator=self.generator(salt=1))
        return pool[perm[:n]].sort().values

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        """Poison a training set: the selected images get the trigger and (dirty-label) the target label."""
        self.require_prepared()
        index = self.select(y)
        x, y = x.clone(), y.clone()
        if len(index):
            x[index] = self.apply_train(x[index]).clamp(0, 1)
            if not self.clean_label:
                y[index] = self.target
        return Poisoned(x, y, index)

    def params(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
