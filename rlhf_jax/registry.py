"""One decorator for the name -> object registries (tasks, rules, sweeps, sweep plots)."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

T = TypeVar("T")


def add_to(table: MutableMapping[str, Any], what: str, name: str) -> Callable[[T], T]:
    """Decorator: store the decorated object in ``table[name]`` and return it unchanged.

    Args:
      table: the registry.
      what: what the entries are, for the error (e.g. ``"sweep"``).

    Raises:
      ValueError: ``name`` is already in ``table`` (naming ``what`` and ``name``).
    """
    def decorate(obj: T) -> T:
        if name in table:
            raise ValueError(f"{what} {name!r} is already registered ({table[name]!r})")
        table[name] = obj
        return obj
    return decorate
