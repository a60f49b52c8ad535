"""The experiment configuration: one frozen, validated ``Experiment`` (papermill parameters and CLI flags map onto
it) with a stable hash, and the named profiles ``smoke``, ``cpu`` and ``paper``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from . import attacks, defenses, models
from .data import DATASETS
from .train import SCHEDULES, Recipe

# Fields that decide the backdoored model (its cache key); the rest only concern the defense and the labels.
DEFENSE_FIELDS = ("defense", "defense_params", "clean_fraction", "profile")


@dataclass(frozen=True)
class Experiment:
    """One experiment: data, model, attack, training recipe, defense, seed. Fractions, not percent."""

    profile: str = "custom"  # a label only: which named profile this came from
    dataset: str = "cifar10"
    train_size: int | None = None  # class-balanced subset of the training set (None: all of it)
    model: str = "resnet18"
    width: int | None = None  # channel width (None: the architecture's default)
    activation: str = "relu"
    attack: str = "badnets"
    attack_params: dict[str, Any] = field(default_factory=dict)
    poison_rate: float = 0.1
    target: int = 0
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    schedule: str = "step"
    label_smoothing: float = 0.0
    defense: str = "unit"
    defense_params: dict[str, Any] = field(default_factory=dict)
    clean_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        # Copies, so a caller's dict cannot change a frozen experiment afterwards.
        object.__setattr__(self, "attack_params", dict(self.attack_params))
        object.__setattr__(self, "defense_params", dict(self.defense_params))
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, tuple(models.MODELS))
        _choice("activation", self.activation.lower(), tuple(models.ACTIVATIONS))
        _choice("schedule", self.schedule, SCHEDULES)
        attacks.REGISTRY.check(self.attack, self.attack_params)
        defenses.REGISTRY.check(self.defense, self.defense_params)
        if not 0.0 <= self.poison_rate < 1.0:
            raise ValueError(f"poison_rate must be in [0, 1), got {self.poison_rate!r}")
        if not 0.0 < self.clean_fraction < 1.0:
            raise ValueError(f"clean_fraction must be in (0, 1), got {self.clean_fraction!r}")
        if not 0 <= self.target < 10:
            raise ValueError(f"target must be a class index in 0..9, got {self.target!r}")
        if self.train_size is not None and self.train_size < 10:
            raise ValueError(f"train_size must be >= 10 or None, got {self.train_size!r}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        if self.width is not None and self.width < 2:
            raise ValueError(f"width must be >= 2 or None, got {self.width!r}")
        # Building the components checks every parameter value, not only the names.
        self.make_attack()
        self.make_defense()

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Experiment:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown experiment key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
        return cls(**values)

    def replace(self, **changes: Any) -> Experiment:
        merged = self.to_dict()
        for key in ("attack_params", "defense_params"):
            # switching the attack or defense drops the old one's parameters unless new ones are given
            name_key = key.removesuffix("_params")
            if name_key in changes and changes[name_key] != merged[name_key] and key not in changes:
                merged[key] = {}
        merged.update(changes)
        return Experiment.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- identity ----------------------------------------------------------------------------------------------------
    def key(self) -> str:
        """Stable hash of the whole experiment (sha256 of its canonical JSON, without the profile label)."""
        return _digest({k: v for k, v in self.to_dict().items() if k != "profile"})

    def model_key(self) -> str:
        """Hash of what decides the backdoored model: experiments differing only in the defense share it."""
        return _digest({k: v for k, v in self.to_dict().items() if k not in DEFENSE_FIELDS})

    def __hash__(self) -> int:
        return int(self.key()[:16], 16)

    # -- components ------------------------------------------------------------------------------------------------
    def make_attack(self) -> attacks.Attack:
        return attacks.get(
            self.attack, target=self.target, poison_rate=self.poison_rate, seed=self.seed, **self.attack_params
        )

    def make_defense(self) -> defenses.Defense:
        return defenses.get(self.defense, **self.defense_params)

    def recipe(self) -> Recipe:
        return Recipe(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            schedule=self.schedule, label_smoothing=self.label_smoothing,
        )


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {key} {value!r}; valid choices: {', '.join(valid)}")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


PROFILES: dict[str, dict[str, Any]] = {
    # Synthetic data and a tiny CNN: seconds on a CPU, for tests and notebook smoke runs.
    "smoke": dict(
        dataset="synthetic", model="small-cnn", width=8, epochs=6, batch_size=64, lr=0.05, schedule="onecycle",
        clean_fraction=0.2, defense_params={"steps": 20, "chunk": 256},
    ),
    # Real data (the offline JPEG copy) and a small residual stand-in for the paper's ResNet-18 (BatchNorm, basic
    # blocks, global average pooling), 8 epochs over the whole training set (so the defender's 5% is 2,500 images,
    # as in the paper): one backdoored model in about 6 minutes on two cores (benchmarks/bench.py).
    "cpu": dict(
        dataset="cifar10-jpeg", model="resnet-mini", width=32, epochs=8, batch_size=256, lr=0.2,
        schedule="onecycle", label_smoothing=0.1,
    ),
    # The appendix's setting: CIFAR-10, ResNet-18, 100 epochs, 10% poisoning, 5% clean data, target 0. For a GPU.
    "paper": dict(
        dataset="cifar10", model="resnet18", epochs=100, batch_size=128, lr=0.1, schedule="step",
        weight_decay=5e-4, poison_rate=0.1, clean_fraction=0.05, target=0,
    ),
}


def profile(name: str, **overrides: Any) -> Experiment:
    """The named profile's experiment, with ``overrides`` (any ``Experiment`` key) applied."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid choices: {', '.join(PROFILES)}")
    base = Experiment.from_dict({**PROFILES[name], "profile": name})
    return base.replace(**overrides) if overrides else base
