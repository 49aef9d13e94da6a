"""Estimator registry: names → estimator builders (classes, or factories such as ``cg`` =
``InfluenceFunction`` with the CG solver). Argument checking is the estimators' own: their config
dataclasses reject unknown names (listing the allowed ones) and bad values."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ._registry import registering

if TYPE_CHECKING:
    from .estimators.base import Estimator

__all__ = ["available_estimators", "build_estimator", "register_estimator"]

_REGISTRY: dict[str, Callable[..., Estimator]] = {}
E = TypeVar("E", bound="Callable[..., Estimator]")


def register_estimator(name: str) -> Callable[[E], E]:
    """Decorator: make an :class:`~lightning_fimoda.Estimator` class (or a factory returning one)
    buildable by ``name``. A class gets ``name`` as its ``name`` (the default label)."""

    return registering(_REGISTRY, name, "estimator")


def available_estimators() -> list[str]:
    """Sorted names of every registered estimator."""
    return sorted(_REGISTRY)


def build_estimator(name: str, **kwargs: Any) -> Estimator:
    """Construct the estimator registered as ``name``; unknown names raise ``KeyError`` listing the
    known ones, bad keyword arguments ``TypeError`` listing the allowed ones."""
    if name not in _REGISTRY:
        raise KeyError(f"Unknown estimator {name!r}. Available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name](**kwargs)
