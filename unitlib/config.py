"""The experiment configuration: one frozen, validated ``Experiment`` (papermill parameters and CLI flags map onto
it) with a stable hash, and the named profiles ``smoke``, ``cpu`` and ``paper``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
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
        # Every field's type and range, before anything uses it: a bad value is one line naming the field, not a
        # traceback after the data have loaded (or, worse, a record of a run that could not have worked).
        for key in ("profile", "dataset", "model", "activation", "attack", "schedule", "defense"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string, got {getattr(self, key)!r}")
        for key in ("attack_params", "defense_params"):
            value = getattr(self, key)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{key} must be a dict of parameter names to values, got {value!r}")
            # A copy, so a caller's dict cannot change a frozen experiment afterwards.
            object.__setattr__(self, key, dict(value))
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, tuple(models.MODELS))
        _choice("activation", self.activation.lower(), tuple(models.ACTIVATIONS))
        _choice("schedule", self.schedule, SCHEDULES)
        _integer("train_size", self.train_size, minimum=10, optional=True)
        _integer("width", self.width, minimum=2, optional=True)
        _integer("target", self.target, minimum=0, below=10, what="a class index")
        _integer("epochs", self.epochs, minimum=1)
        _integer("batch_size", self.batch_size, minimum=1)
        _integer("seed", self.seed, minimum=0, below=2**32)
        _number("poison_rate", self.poison_rate, "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        _number("clean_fraction", self.clean_fraction, "in (0, 1)", lambda v: 0.0 < v < 1.0)
        _number("lr", self.lr, "> 0", lambda v: v > 0)
        _number("weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0)
        _number("label_smoothing", self.label_smoothing, "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        attacks.REGISTRY.check(self.attack, self.attack_params)
        defenses.REGISTRY.check(self.defense, self.defense_params)
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


def _integer(key: str, value: Any, *, minimum: int, below: int | None = None, optional: bool = False,
             what: str = "an int") -> None:
    """``value`` is a real int (not a bool, not a float) in ``minimum``..``below - 1`` (or None when ``optional``)."""
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not ok or (below is not None and value >= below):
        bounds = f"in {minimum}..{below - 1}" if below is not None else f">= {minimum}"
        raise ValueError(f"{key} must be {what} {bounds}{' or None' if optional else ''}, got {value!r}")


def _number(key: str, value: Any, valid: str, check: Callable[[float], bool]) -> None:
    """``value`` is a finite real number (an int or a float, not a bool) for which ``check`` holds."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number {valid}, got {value!r}")
    if not check(value):
        raise ValueError(f"{key} must be {valid}, got {value!r}")


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
    """The named profile's experiment, with ``overrides`` (any ``Experiment`` key) applied. At ``smoke`` every run is
    meant to take seconds: an attack or defense whose papers' budget takes minutes there runs its smoke budget
    (:func:`smoke_params`, merged under any parameters ``overrides`` give it), and a clean-label attack poisons at
    most :data:`SMOKE_CLEAN_LABEL_RATE` unless ``overrides`` set ``poison_rate``."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid choices: {', '.join(PROFILES)}")
    base = Experiment.from_dict({**PROFILES[name], "profile": name})
    exp = base.replace(**overrides) if overrides else base
    if name != "smoke":
        return exp
    changes: dict[str, Any] = {}
    for kind in ("attack", "defense"):
        smoke = smoke_params(name, kind, getattr(exp, kind))
        if smoke:
            changes[f"{kind}_params"] = {**smoke, **getattr(exp, f"{kind}_params")}
    if "poison_rate" not in overrides:
        rate = smoke_poison_rate(name, exp.attack, exp.poison_rate)
        if rate != exp.poison_rate:
            changes["poison_rate"] = rate
    return exp.replace(**changes) if changes else exp


# The synthetic set's target class is a tenth of it: a clean-label attack poisoning 10% of the whole set would take
# every target-class image and leave the defender none. At smoke it poisons half of them.
SMOKE_CLEAN_LABEL_RATE = 0.05


def smoke_params(profile_name: str, kind: str, name: str) -> dict[str, Any]:
    """The shorter budget that ``profile_name`` runs the attack or defense ``name`` with (``kind``: ``"attack"`` or
    ``"defense"``): ``attacks.SMOKE_PARAMS`` or ``defenses.SMOKE_PARAMS`` at ``smoke``, where every run is live and
    the papers' budgets take minutes to hours on the synthetic data; a copy, empty elsewhere."""
    if kind not in ("attack", "defense"):
        raise ValueError(f"unknown kind {kind!r}; valid choices: attack, defense")
    if profile_name != "smoke":
        return {}
    table = attacks.SMOKE_PARAMS if kind == "attack" else defenses.SMOKE_PARAMS
    return dict(table.get(name, {}))


def smoke_poison_rate(profile_name: str, attack: str, rate: float) -> float:
    """The poisoning rate ``profile_name`` gives ``attack`` in place of ``rate``: at most
    :data:`SMOKE_CLEAN_LABEL_RATE` for a clean-label attack at ``smoke``, else ``rate``."""
    if profile_name == "smoke" and attack in attacks.ATTACKS and attacks.attack_class(attack).clean_label:
        return min(rate, SMOKE_CLEAN_LABEL_RATE)
    return rate
