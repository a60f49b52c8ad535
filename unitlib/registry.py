"""A registry of dataclass-configured components (attacks, defenses): lookup by name, parameter validation, and
errors that name the valid choices."""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, reserved: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.reserved = reserved  # parameters the experiment sets itself, not the user's *_params
        self.classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__name__} has no registry name")
        self.classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self.classes)

    def cls(self, name: str) -> type[T]:
        if name not in self.classes:
            raise ValueError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}")
        return self.classes[name]

    def parameters(self, name: str) -> dict[str, Any]:
        """The component's own parameters and their defaults."""
        return {
            f.name: f.default
            for f in dataclasses.fields(self.cls(name))  # type: ignore[arg-type]
            if f.init and f.name not in self.reserved
        }

    def check(self, name: str, params: dict[str, Any]) -> None:
        valid = set(self.parameters(name))
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} for {self.kind} {name!r}; "
                f"valid parameters: {', '.join(sorted(valid)) or '(none)'}"
            )

    def get(self, name: str, **params: Any) -> T:
        cls = self.cls(name)
        own = {k: v for k, v in params.items() if k not in self.reserved}
        self.check(name, own)
        return cls(**params)
