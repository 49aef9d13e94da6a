"""Matrix-free curvature of the empirical risk: ``(H + λI) V`` for many vectors at once.

``H`` is the curvature of ``R(θ) = (1/n) Σ_i ℓ(z_i; θ)`` of a registered type
(:mod:`~lightning_fimoda.curvature.types`: ``"gauss_newton"`` or ``"exact"``), SPEC §3; the type is
orthogonal to the solver that uses it (solvers only call :meth:`CurvatureOperator.apply`).

Vectors are rows: ``V`` has shape ``[P]`` or ``[k, P]`` (``k`` right-hand sides, vmapped together),
columns in the :class:`~lightning_fimoda.FunctionalTask` parameter order (the order of
:class:`~lightning_fimoda.PerSampleGradients`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from .._data import iter_batches, model_device_dtype, resolve_indices
from ..distributed import rank_and_world, shard_range, sum_over_ranks
from ..exceptions import ConfigurationError
from ..functional import FunctionalTask, eval_mode
from ..gradients.budget import resolve_memory_budget
from .chunking import activation_bytes, plan_chunks
from .types import CurvatureType, curvature_type

__all__ = ["DEFAULT_JACOBIAN_BUDGET", "CurvatureOperator"]

DEFAULT_JACOBIAN_BUDGET = 2 << 30  # bytes of cached output Jacobians (Gauss-Newton)


class CurvatureOperator:
    """``V ↦ (H + λI) V`` over ``dataset[indices]`` (an average over those examples), matrix-free.

    Args:
        fn: the model and task as functions of the selected parameters (``fn.params`` = ``θ̂``,
            where the curvature is taken).
        dataset: map-style training dataset; ``indices`` selects the ``n`` examples of ``R``
            (``None``: all).
        hessian: a registered curvature name: ``"gauss_newton"`` (default; positive semi-definite) or
            ``"exact"`` (aliases ``"true"``, ``True``).
        damping: ``λ ≥ 0`` added to the diagonal.
        batch_size: examples per forward pass (the average is exact, whatever the batch size). The
            collated batches are loaded once, on the model's device, and kept for later products.
        jacobian_budget: bytes the cached Gauss-Newton factor rows may take (``0``: always
            matrix-free).
        memory_budget: bytes one product's working set may take beyond the model (its ``[k, P]`` input
            and output rows, the tangents in flight and their activation intermediates, or the factor
            rows being computed): the ``k`` tangents and each batch are split to fit
            (:mod:`~lightning_fimoda.curvature.chunking`); ``None``: half of the default memory budget
            (:func:`~lightning_fimoda.gradients.resolve_memory_budget`), as a gradient chunk.
        split: in a ``torch.distributed`` process group, each rank sums over its contiguous shard of
            the examples (:attr:`shard`) and the products are added over the ranks (every rank gets
            the same result; every rank must then make the same products). The cached factor and
            :meth:`batches` then hold this rank's examples only.

    Attributes:
        n: number of examples averaged over; ``num_params``: ``P``; ``hessian``: the canonical name.
    """

    def __init__(
        self,
        fn: FunctionalTask,
        dataset: Any,
        indices: Sequence[int] | Tensor | None = None,
        *,
        hessian: Any = "gauss_newton",
        damping: float = 0.0,
        batch_size: int = 512,
        jacobian_budget: int = DEFAULT_JACOBIAN_BUDGET,
        memory_budget: int | None = None,
        kind: CurvatureType | None = None,
        split: bool = False,
    ) -> None:
        damping = float(damping)
        if not damping >= 0.0 or damping == float("inf"):
            raise ConfigurationError(f"damping must be a finite number >= 0, got {damping}.")
        if int(batch_size) < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}.")
        self.kind = kind if kind is not None else curvature_type(hessian)
        self.hessian = self.kind.name
        self.fn = fn
        self.dataset = dataset
        self.indices = resolve_indices(dataset, indices, "training")
        self.damping = damping
        self.batch_size = int(batch_size)
        self.jacobian_budget = int(jacobian_budget)
        self.device, self.dtype = model_device_dtype(fn.model)
        self.memory_budget = (
            resolve_memory_budget(None, self.device) // 2 if memory_budget is None
            else resolve_memory_budget(memory_budget)
        )
        self.split = bool(split) and rank_and_world()[1] > 1
        self._batches: list[Any] | None = None
        self._activation_bytes: int | None = None
        self.last_chunks: tuple[int, int] | None = None  # (tangents, examples) of the last product's plan

    @property
    def n(self) -> int:
        return self.indices.numel()

    @property
    def num_params(self) -> int:
        return self.fn.num_params

    @property
    def shard(self) -> tuple[int, int]:
        """Positions ``[lo, hi)`` of the examples this process sums over (all of them unless split)."""
        return shard_range(self.n) if self.split else (0, self.n)

    @property
    def positive_semidefinite(self) -> bool:
        """Whether ``H ⪰ 0`` by construction (then ``H + λI`` is definite for ``λ > 0``)."""
        return self.kind.positive_semidefinite

    @property
    def products(self) -> str:
        """How products are computed, e.g. ``"cached jacobians"`` or ``"matrix-free"``."""
        return self.kind.describe(self)

    def with_damping(self, damping: float) -> CurvatureOperator:
        """The same curvature with another ``λ`` (shares the loaded batches and cached work)."""
        other = self._like(self.indices, damping, self.batch_size, self.kind)
        other._batches = self._batches
        return other

    def subset(self, positions: Tensor) -> CurvatureOperator:
        """Operator averaging over ``indices[positions]`` only (a mini-batch, e.g. for LiSSA).

        With a cached Gauss-Newton factor the subset takes its rows (computed once, for every subset)."""
        kind = self.kind.subset(self, positions)
        return self._like(self.indices[positions], self.damping, max(self.batch_size, positions.numel()), kind)

    def _like(self, indices: Tensor, damping: float, batch_size: int, kind: CurvatureType) -> CurvatureOperator:
        other = CurvatureOperator(
            self.fn, self.dataset, indices, damping=damping, batch_size=batch_size,
            jacobian_budget=self.jacobian_budget, memory_budget=self.memory_budget, kind=kind, split=self.split,
        )
        other._activation_bytes = self._activation_bytes
        return other

    def chunks(self, k: int, batch_len: int) -> tuple[int, int]:
        """``(tangents per group, examples per slice)`` for a product with ``k`` rows over a batch of
        ``batch_len`` examples within :attr:`memory_budget` (the curvature type's factors)."""
        row = self.num_params * self.dtype.itemsize
        act = self.example_activation_bytes()
        plan = plan_chunks(k, batch_len, row, int(self.kind.example_factor * act), int(self.kind.pair_factor * act),
                           self.memory_budget)
        self.last_chunks = plan
        return plan

    def example_activation_bytes(self) -> int:
        """Bytes autograd saves per example in a forward pass (measured once, shared with subsets)."""
        if self._activation_bytes is None:
            lengths = self.batch_lengths()  # none on a rank with an empty shard: no products to plan
            self._activation_bytes = activation_bytes(self.fn, self.batches()[0], lengths[0]) if lengths else 1
        return self._activation_bytes

    def batch_lengths(self) -> list[int]:
        """Examples in each of :meth:`batches`."""
        lo, hi = self.shard
        return [min(self.batch_size, hi - start) for start in range(lo, hi, self.batch_size)]

    def gauss_newton_factor(self) -> Any:
        """The cached Gauss-Newton factor (``.rows`` ``G`` ``[R, P]``, ``.sign`` ``[R]``, ``.owner`` ``[R]``:
        ``H = Gᵀ diag(sign) G / n``), built on first use; ``None`` when the curvature is not Gauss-Newton
        or the rows do not fit ``jacobian_budget``."""
        factor = getattr(self.kind, "factor", None)
        return factor(self) if factor is not None else None

    # -- products ---------------------------------------------------------------------------------
    def apply(self, v: Tensor) -> Tensor:
        """``(H + λI) v`` for ``v`` of shape ``[P]`` or ``[k, P]``; same shape out."""
        return self.curvature(v) + self.damping * v

    def curvature(self, v: Tensor) -> Tensor:
        """``H v`` (no damping) for ``v`` of shape ``[P]`` or ``[k, P]``."""
        single = v.dim() == 1
        rows = v.unsqueeze(0) if single else v
        if rows.dim() != 2 or rows.shape[1] != self.num_params:
            raise ValueError(
                f"Vectors must have shape [P] or [k, P] with P = {self.num_params}, got {tuple(v.shape)}."
            )
        rows = rows.to(device=self.device, dtype=self.dtype)
        total = self._summed(self.kind.product(self, rows)) / self.n
        return total[0] if single else total

    def dense(self, chunk: int = 256) -> Tensor:
        """The matrix ``H + λI`` ``[P, P]`` (symmetrised), built from products with the identity."""
        p = self.num_params
        eye = torch.eye(p, dtype=self.dtype, device=self.device)
        cols = [self.apply(eye[s : s + chunk]) for s in range(0, p, chunk)]
        mat = torch.cat(cols, dim=0)
        return 0.5 * (mat + mat.T)

    def risk_gradient(self) -> Tensor:
        """``∇R(θ̂) = (1/n) Σ_i ∇ℓ(z_i; θ̂)``, shape ``[P]``."""
        params = self.fn.params
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with eval_mode(self.fn.model):
            for batch in self.batches():
                g = grad(lambda p, b=batch: self.fn.loss(p, b).sum())(params)
                total += self.fn.flatten(g)
        return self._summed(total) / self.n

    def _summed(self, partial: Tensor) -> Tensor:
        """A sum over this process's examples, added over the ranks when split."""
        return sum_over_ranks(partial) if self.split else partial

    def batches(self) -> list[Any]:
        """The collated batches of the operator's examples (this rank's shard when split), on the model's
        device (loaded once)."""
        if self._batches is None:
            lo, hi = self.shard
            self._batches = [
                batch for _, batch in iter_batches(
                    self.fn.task, self.dataset, self.indices[lo:hi], self.batch_size, self.device
                )
            ]
        return self._batches
