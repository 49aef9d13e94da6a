"""Curvature types: how ``Σ_i H_i V`` over one batch is computed, selected by name from a registry.

A curvature type is orthogonal to the solver that uses it (as in pyDVL): solvers only see
:class:`~lightning_fimoda.curvature.CurvatureOperator`. A new type is a subclass of
:class:`CurvatureType` decorated with ``@register_curvature("name")``; no switch needs editing.

Built in: ``"exact"`` (the true Hessian ``∇²R(θ̂)``, reverse-over-reverse ``vjp`` of ``grad``; the
aliases ``"true"`` and the boolean ``True`` are accepted, as YAML turns ``"true"`` into ``True``) and
``"gauss_newton"`` (``(1/n) Σ_i J_iᵀ ∇²_o ℓ_i J_i``, see :mod:`~lightning_fimoda.curvature.gauss_newton`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from .._registry import registering
from ..exceptions import ConfigurationError
from ..functional import Params, eval_mode
from .chunking import slice_batch

if TYPE_CHECKING:
    from .operator import CurvatureOperator

__all__ = [
    "HESSIAN_ALIASES",
    "CurvatureType",
    "ExactHessian",
    "available_curvatures",
    "curvature_type",
    "register_curvature",
    "resolve_hessian",
]

_CURVATURES: dict[str, type[CurvatureType]] = {}
HESSIAN_ALIASES: dict[Any, str] = {"true": "exact", True: "exact"}
T = TypeVar("T", bound="type[CurvatureType]")


def register_curvature(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`CurvatureType` selectable as ``hessian=name``."""

    return registering(_CURVATURES, name, "curvature type")


def available_curvatures() -> list[str]:
    """Registered curvature names (canonical; see :data:`HESSIAN_ALIASES` for the aliases)."""
    return sorted(_CURVATURES)


def resolve_hessian(value: Any) -> str:
    """The canonical curvature name for ``value`` (``"true"`` / ``True`` → ``"exact"``)."""
    if isinstance(value, (str, bool)) and value in HESSIAN_ALIASES:
        value = HESSIAN_ALIASES[value]
    if not isinstance(value, str) or value not in _CURVATURES:
        raise ConfigurationError(
            f"hessian must be one of {available_curvatures()} (aliases: 'true' or True for 'exact'), "
            f"got {value!r}."
        )
    return value


def curvature_type(value: Any) -> CurvatureType:
    """A fresh instance of the curvature type named ``value`` (aliases allowed)."""
    return _CURVATURES[resolve_hessian(value)]()


class CurvatureType:
    """How ``H`` acts on vectors. One instance per operator; ``with_damping`` copies share it."""

    name: ClassVar[str] = "curvature"
    positive_semidefinite: ClassVar[bool] = False  # True: H ⪰ 0 whatever the model (Gauss-Newton)
    # bytes of one example's / one (tangent, example) pair's intermediates per byte autograd saves for the
    # example (see :mod:`~lightning_fimoda.curvature.chunking`): reverse-over-reverse products measured 5.1
    example_factor: ClassVar[float] = 8.0
    pair_factor: ClassVar[float] = 6.0

    def product(self, op: CurvatureOperator, rows: Tensor) -> Tensor:
        """``Σ_i H_i v`` (a sum over the operator's examples) for each row of ``rows`` ``[k, P]``, the rows
        and each batch split to fit the operator's memory budget (:meth:`CurvatureOperator.chunks`)."""
        total = torch.zeros_like(rows)
        k = rows.shape[0]
        with eval_mode(op.fn.model):
            for batch, length in zip(op.batches(), op.batch_lengths()):
                group, examples = op.chunks(k, length)
                for lo in range(0, k, group):
                    tangents = op.fn.unflatten(rows[lo : lo + group])
                    for start in range(0, length, examples):
                        part = batch if examples >= length else slice_batch(batch, start, start + examples)
                        total[lo : lo + group] += self.batch_product(op, part, tangents)
        return total

    def batch_product(self, op: CurvatureOperator, batch: Any, tangents: Params) -> Tensor:
        """``Σ_{i∈batch} H_i t`` for each of the ``k`` stacked tangents: ``[k, P]``."""
        raise NotImplementedError

    def describe(self, op: CurvatureOperator) -> str:
        """How products are computed (reported in estimator info)."""
        return "matrix-free"

    def subset(self, op: CurvatureOperator, positions: Tensor) -> CurvatureType:
        """The type for an operator over ``op``'s examples at ``positions`` (may share cached work)."""
        return type(self)()


@register_curvature("exact")
class ExactHessian(CurvatureType):
    """The true Hessian of the empirical risk, by reverse-over-reverse differentiation."""

    def batch_product(self, op: CurvatureOperator, batch: Any, tangents: Params) -> Tensor:
        params = op.fn.params

        def batch_grad(p: Params) -> Params:
            return grad(lambda q: op.fn.loss(q, batch).sum())(p)

        # reverse-over-reverse: the forward and first backward pass run once for all k tangents
        # (22% less time than vmapped forward-over-reverse jvp for 20 tangents on the Concrete MLP)
        _, pullback = vjp(batch_grad, params)
        return op.fn.flatten(vmap(lambda t: pullback(t)[0])(tangents))
