"""Typed, frozen, validated settings of estimators and solvers (kronfluence-style argument classes).

Every estimator has one config dataclass; :meth:`EstimatorConfig.to_dict` (JSON-safe) is what
:meth:`~lightning_fimoda.Estimator.settings` reports. Values are checked in ``__post_init__``, so a bad
setting fails when the estimator is built (``build_estimator("lissa", depth=0)`` raises), long before
any training or gradient computation. Errors name the estimator and list what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._settings import SettingsConfig

__all__ = ["EstimatorConfig", "ProjectionConfig", "SettingsConfig", "split_kwargs"]


@dataclass(frozen=True)
class EstimatorConfig(SettingsConfig):
    """Settings every estimator has.

    Args:
        params: parameter or module names to attribute over (``None``: all trainable parameters).
        label: name under which results are reported (default: the registry name).
    """

    params: tuple[str, ...] | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.params, str):
            object.__setattr__(self, "params", (self.params,))
        elif self.params is not None:
            object.__setattr__(self, "params", tuple(self.params))
        if self.params is not None and not all(isinstance(p, str) for p in self.params):
            self._fail(f"params must be parameter or module names (strings), got {self.params!r}.")
        if self.label is not None and not isinstance(self.label, str):
            self._fail(f"label must be a string, got {self.label!r}.")


@dataclass(frozen=True)
class ProjectionConfig(EstimatorConfig):
    """Settings of estimators that may attribute over randomly projected gradients (Grad-Dot, Grad-Cos).

    Args:
        projection_dim: ``d`` of a seeded random projection ``Π`` applied to training and test
            gradients alike (:class:`~lightning_fimoda.projection.Projector`); ``None``: exact.
        projection: ``"rademacher"`` (±1 entries) or ``"gaussian"``.
        projection_seed: seed of ``Π``.
    """

    projection_dim: int | None = None
    projection: str = "rademacher"
    projection_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._integer("projection_dim", optional=True)
        self._choice("projection", ("rademacher", "gaussian"))
        self._integer("projection_seed", minimum=0)


def split_kwargs(
    owner: str, kwargs: Mapping[str, Any], configs: Iterable[type[SettingsConfig]]
) -> list[dict[str, Any]]:
    """Distribute ``kwargs`` over the fields of ``configs``; unknown names raise ``TypeError``
    (``Estimator 'cg' got unexpected argument(s) [...]. Allowed: ...``)."""
    configs = list(configs)
    allowed: list[str] = []
    for cls in configs:
        allowed += [n for n in cls.field_names() if n not in allowed]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"Estimator {owner!r} got unexpected argument(s) {unknown}. Allowed: {', '.join(allowed)}."
        )
    parts = []
    for cls in configs:
        names = set(cls.field_names())
        parts.append({k: v for k, v in kwargs.items() if k in names})
    return parts
