"""The base of every settings dataclass (estimator and solver configs): JSON-safe ``to_dict`` and the
value checks their ``__post_init__`` use, raising :class:`~lightning_fimoda.exceptions.ConfigurationError`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .exceptions import ConfigurationError

__all__ = ["SettingsConfig", "json_safe"]


@dataclass(frozen=True)
class SettingsConfig:
    """Base of every settings dataclass: ``to_dict`` and the checks used in ``__post_init__``.

    Errors name the config class; the estimator's constructor adds the estimator's name.
    """

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """Field values, JSON-safe (tuples become lists, paths strings, nested configs dicts)."""
        return {f.name: json_safe(getattr(self, f.name)) for f in dataclasses.fields(self)}

    # -- checks used by subclasses' __post_init__ ---------------------------------------------------
    def _fail(self, message: str) -> None:
        raise ConfigurationError(f"{type(self).__name__}: {message}")

    def _choice(self, name: str, allowed: Sequence[Any]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            self._fail(f"{name} must be one of {list(allowed)}, got {value!r}.")

    def _number(self, name: str, *, minimum: float = 0.0, strict: bool = False, optional: bool = False) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > minimum if strict else value >= minimum)
        if not ok:
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            extra = "None or " if optional else ""
            self._fail(f"{name} must be {extra}a finite number {bound}, got {value!r}.")

    def _integer(self, name: str, *, minimum: int = 1, optional: bool = False) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            extra = "None or " if optional else ""
            self._fail(f"{name} must be {extra}an integer >= {minimum}, got {value!r}.")

    def _flag(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            self._fail(f"{name} must be True or False, got {getattr(self, name)!r}.")


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists, paths as strings, configs and mappings as dicts (recursively)."""
    if isinstance(value, SettingsConfig):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    return value

