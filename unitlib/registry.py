"""A registry of dataclass-configured components (attacks, defenses): lookup by name, parameter validation, and
errors that name the valid choices."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
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

    def check_types(self, name: str, params: dict[str, Any]) -> None:
        """Each value has its field's declared type: an int is a real int (not a bool, not a float), a float a finite
        number, a bool a bool, a str a str; tuples accept lists (JSON has no tuples). The components check ranges."""
        hints = _hints(self.cls(name))
        for key, value in params.items():
            hint = hints.get(key)
            if hint is not None and not _matches(value, hint):
                raise ValueError(f"{self.kind} {name!r}: {key} must be {_describe(hint)}, got {value!r}")

    def get(self, name: str, **params: Any) -> T:
        cls = self.cls(name)
        own = {k: v for k, v in params.items() if k not in self.reserved}
        self.check(name, own)
        self.check_types(name, params)
        return cls(**params)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved here: leave the values to the component's own checks
        return {}


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args)))
    return True  # any other annotation: the component checks it


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return {type(None): "None", bool: "true or false", int: "an int", float: "a finite number",
            str: "a string"}.get(hint, str(hint))
