"""Name -> builder registries with errors that list the valid choices."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class HilalError(ValueError):
    """A user-facing error: bad name, missing files, bad parameter. The message says what to do."""


class Registry(Generic[T]):
    """A small mapping from names to builders, used for models, datasets, presets and methods."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``."""

        def deco(obj: T) -> T:
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self._items[name] = obj

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise HilalError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)


def check_choice(kind: str, value: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a HilalError naming the valid ones."""
    if value not in choices:
        raise HilalError(f"unknown {kind} {value!r}; valid choices: {', '.join(choices)}")
    return value


def is_count(value: object) -> bool:
    """Whether ``value`` is a whole number >= 1 (an ``int``, not a ``bool``): a count of strata or threads."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
