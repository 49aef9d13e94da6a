"""The one registration decorator behind estimators, solvers and curvature types."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["registering"]

T = TypeVar("T")


def registering(table: dict[str, Any], name: str, what: str) -> Callable[[T], T]:
    """Decorator storing its argument in ``table`` under ``name``; a class also gets ``cls.name = name``.
    Registering a different object under a taken name raises ``ValueError``."""

    def decorate(obj: T) -> T:
        if name in table and table[name] is not obj:
            raise ValueError(f"A {what} named {name!r} is already registered ({table[name]}).")
        if isinstance(obj, type):
            obj.name = name  # type: ignore[attr-defined]
        table[name] = obj
        return obj

    return decorate
