"""Estimator registry: names → estimator classes, with argument checking that lists what is allowed."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .estimators.base import Estimator

__all__ = ["available_estimators", "build_estimator", "estimator_class", "register_estimator"]

_REGISTRY: dict[str, type[Estimator]] = {}
E = TypeVar("E", bound="type[Estimator]")


def register_estimator(name: str) -> Callable[[E], E]:
    """Class decorator: make an :class:`~lightning_fimoda.Estimator` buildable by ``name``."""

    def decorate(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"An estimator named {name!r} is already registered ({_REGISTRY[name]}).")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtin() -> None:
    importlib.import_module("lightning_fimoda.estimators")


def available_estimators() -> list[str]:
    """Sorted names of every registered estimator."""
    _load_builtin()
    return sorted(_REGISTRY)


def estimator_class(name: str) -> type[Estimator]:
    """The class registered under ``name``; unknown names raise ``KeyError`` listing the known ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"Unknown estimator {name!r}. Available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def estimator_arguments(cls: type) -> list[str]:
    """Keyword arguments accepted by an estimator class's constructor."""
    sig = inspect.signature(cls.__init__)
    return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD]


def build_estimator(name: str, **kwargs: Any) -> Estimator:
    """Construct the estimator registered as ``name``; bad keyword arguments list the allowed ones."""
    cls = estimator_class(name)
    allowed = estimator_arguments(cls)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"Estimator {name!r} got unexpected argument(s) {unknown}. Allowed: {', '.join(allowed)}."
        )
    return cls(**kwargs)
