"""Solvers: inverse operators ``(H + λI)^{-1}`` over a :class:`~lightning_fimoda.curvature.CurvatureOperator`.

A solver is fitted to an operator once (factorisations, eigenpairs, scale selection) and then applied
to right-hand sides: ``Solver(config).fit(op).solve(rhs [k, P]) -> (x [k, P], diagnostics)``, rows
being vectors. Settings are a frozen, validated :class:`SolverConfig`; fit-time diagnostics go into
``solver.info``. New solvers register with ``@register_solver("name")`` (the name then also builds an
influence-function estimator, see :mod:`lightning_fimoda.estimators.influence`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from .._registry import registering
from .._settings import SettingsConfig
from ..curvature import CurvatureOperator
from ..exceptions import NotFittedError

__all__ = ["SOLVERS", "Solver", "SolverConfig", "register_solver", "relative_residuals"]

SOLVERS: dict[str, type[Solver]] = {}
S = TypeVar("S", bound="type[Solver]")


def register_solver(name: str) -> Callable[[S], S]:
    """Class decorator: make a :class:`Solver` available by ``name``."""

    return registering(SOLVERS, name, "solver")


@dataclass(frozen=True)
class SolverConfig(SettingsConfig):
    """Settings of a solver (none in the base)."""


class Solver(ABC):
    """``(H + λI)^{-1}`` applied to rows. ``label`` names the owner (an estimator) in messages."""

    name: ClassVar[str] = "solver"
    config_class: ClassVar[type[SolverConfig]] = SolverConfig

    def __init__(self, config: SolverConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            raise TypeError(f"{type(self).__name__}: give a config or keyword arguments, not both.")
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}.")
        self.config = config
        self.label = self.name
        self.info: dict[str, Any] = {}
        self.op_: CurvatureOperator | None = None

    def check(self, num_params: int) -> None:  # noqa: B027 - optional hook
        """Cheap validation against the number of selected parameters (before any work)."""

    def fit(self, op: CurvatureOperator) -> Solver:
        """Prepare to solve with ``op`` (``H + λI``); returns ``self``."""
        self.check(op.num_params)
        self.op_ = op
        self.info = {}
        self._prepare(op)
        return self

    def solve(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """``x ≈ (H + λI)^{-1} b`` for each row ``b`` of ``rhs`` ``[k, P]``, and diagnostics."""
        if self.op_ is None:
            raise NotFittedError(f"{type(self).__name__}.solve() called before fit().")
        return self._solve(self.op_, rhs)

    def _prepare(self, op: CurvatureOperator) -> None:  # noqa: B027 - optional hook
        """Work done once per fit."""

    @abstractmethod
    def _solve(self, op: CurvatureOperator, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Solve for the rows of ``rhs`` with the fitted operator."""


def relative_residuals(op: CurvatureOperator, x: Tensor, rhs: Tensor) -> Tensor:
    """``‖(H + λI) x − b‖ / ‖b‖`` per row (0 for zero rows solved exactly)."""
    res = (op.apply(x) - rhs).norm(dim=1)
    norms = rhs.norm(dim=1)
    return torch.where(norms > 0, res / norms.clamp_min(torch.finfo(rhs.dtype).tiny), res)
