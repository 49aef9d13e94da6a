"""The Gauss-Newton curvature ``(1/n) Σ_i J_iᵀ ∇²_o ℓ_i J_i`` (SPEC §3), positive semi-definite when
every output Hessian is.

Matrix-free, a product is a ``jvp`` through the model outputs, the output Hessian
(:meth:`~lightning_fimoda.AttributionTask.output_hessian`) and a ``vjp`` back. When the output Jacobians
of all ``n`` examples (at most ``n·O·P`` numbers) fit in the operator's ``jacobian_budget`` bytes, they
are computed once (``vmap(jacrev)``) as factor rows ``G_i = |Λ_i|^{1/2} U_iᵀ J_i`` of
``∇²_o ℓ_i = U_i Λ_i U_iᵀ`` (rows of zero curvature dropped: softmax cross-entropy keeps ``O − 1`` per
example), and each product becomes two dense matrix products ``Gᵀ (sign(Λ) ⊙ (G V))``: the same
numbers, several times faster for small-output models with many right-hand sides (CG, LiSSA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from ..distributed import sum_floats
from ..exceptions import ConfigurationError
from ..functional import Params, eval_mode
from ..task import AttributionTask
from .chunking import slice_batch
from .types import CurvatureType, register_curvature

if TYPE_CHECKING:
    from .operator import CurvatureOperator

__all__ = ["GaussNewton", "checked_output_hessian"]


def checked_output_hessian(task: AttributionTask, outputs: Tensor, batch: Any) -> Tensor:
    """``task.output_hessian(outputs, batch)`` ``[B, O, O]`` with its shape checked, in ``outputs``' dtype."""
    h_out = task.output_hessian(outputs, batch)
    b, o = outputs.shape
    if tuple(h_out.shape) != (b, o, o):
        raise ConfigurationError(f"{task!r}: output Hessian has shape {tuple(h_out.shape)}, expected {(b, o, o)}.")
    return h_out.to(outputs.dtype)


@register_curvature("gauss_newton")
class GaussNewton(CurvatureType):
    """Gauss-Newton products, from the cached factor when it fits the budget, else matrix-free.

    Args:
        factor: the factor of the operator's examples when known; ``False``: known not to fit.
    """

    positive_semidefinite = True
    pair_factor = 5.0  # jvp tangents + vjp cotangents: measured at most 3.8 (chunking module doc)

    def __init__(self, factor: _GaussNewtonFactor | bool | None = None) -> None:
        self._factor = factor

    def product(self, op: CurvatureOperator, rows: Tensor) -> Tensor:
        factor = self.factor(op)
        return factor.product(rows) if factor is not None else super().product(op, rows)

    def describe(self, op: CurvatureOperator) -> str:
        return "cached jacobians" if self.factor(op) is not None else "matrix-free"

    def subset(self, op: CurvatureOperator, positions: Tensor) -> GaussNewton:
        factor = self.factor(op)
        return GaussNewton(factor.subset(positions) if factor is not None else False)

    def batch_product(self, op: CurvatureOperator, batch: Any, tangents: Params) -> Tensor:
        params = op.fn.params

        def outputs(p: Params) -> Tensor:
            return op.fn.outputs(p, batch)

        out, pullback = vjp(outputs, params)
        out = out.detach()
        jt = vmap(lambda t: jvp(outputs, (params,), (t,))[1])(tangents)  # [k, B, O]
        h_out = checked_output_hessian(op.fn.task, out, batch)  # [B, O, O]
        u = torch.einsum("bij,kbj->kbi", h_out, jt)
        return op.fn.flatten(vmap(pullback)(u)[0])

    def _slices(self, op: CurvatureOperator) -> list[tuple[Any, int]]:
        """The operator's batches cut into slices (with the position of their first example among all
        ``n``) whose ``O`` Jacobian rows are computed at once within the operator's memory budget: the
        forward pass, ``jacrev``'s ``O`` cotangents per example (``O`` pairs), and the rows held three
        times (``J``, the rotated rows, the kept copy)."""
        batches = op.batches()
        if not batches:  # a rank with an empty shard: nothing to factor, it still joins the collectives
            return []
        outputs = op.fn.outputs(op.fn.params, slice_batch(batches[0], 0, 1)).shape[1]
        act = op.example_activation_bytes()
        per_example = self.example_factor * act + outputs * (3 * op.num_params * op.dtype.itemsize + self.pair_factor * act)
        step = max(1, int(op.memory_budget // per_example))
        slices, start = [], op.shard[0]
        for batch, length in zip(batches, op.batch_lengths()):
            slices += [(batch if step >= length else slice_batch(batch, lo, lo + step), start + lo)
                       for lo in range(0, length, step)]
            start += length
        return slices

    def factor(self, op: CurvatureOperator) -> _GaussNewtonFactor | None:
        """The factor of all ``n`` examples when it fits the budget, else ``None``.

        A forward pass first counts the factor rows (output-Hessian eigenvalues that are not zero), so
        the factor is allocated once, at its exact size, and only when that size fits the budget. A split
        operator's factor holds the rows of this rank's examples (``owner``: positions among all ``n``).
        """
        if self._factor is False:
            return None
        if self._factor is None:
            with eval_mode(op.fn.model):
                slices = self._slices(op)
                spectra = [_output_spectrum(op, part) for part, _ in slices]
                num_rows = sum(int(keep.sum()) for _, _, keep in spectra)
                too_big = num_rows * op.num_params * op.dtype.itemsize > op.jacobian_budget
                if op.split:  # every rank takes the same path: the factor only if each rank's part fits
                    too_big = sum_floats([float(too_big)], op.device)[0] > 0
                if too_big:
                    self._factor = False
                    return None
                factor = _GaussNewtonFactor(
                    torch.empty(num_rows, op.num_params, dtype=op.dtype, device=op.device),
                    torch.empty(num_rows, dtype=op.dtype, device=op.device),
                    torch.empty(num_rows, dtype=torch.long, device=op.device),
                    op.n,
                )
                filled = 0
                for (part, start), spectrum in zip(slices, spectra):
                    filled = _fill_factor(op, factor, filled, part, spectrum, start)
            self._factor = factor
        return self._factor


def _output_spectrum(op: CurvatureOperator, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues ``[B, O]``, eigenvectors ``[B, O, O]`` of the output Hessians, and which to keep."""
    out = op.fn.outputs(op.fn.params, batch).detach()
    evals, evecs = torch.linalg.eigh(checked_output_hessian(op.fn.task, out, batch))
    scale = evals.abs().amax(dim=1, keepdim=True)
    keep = evals.abs() > out.shape[1] * torch.finfo(evals.dtype).eps * scale
    return evals, evecs, keep


def _fill_factor(
    op: CurvatureOperator, factor: _GaussNewtonFactor, filled: int, batch: Any,
    spectrum: tuple[Tensor, Tensor, Tensor], start: int,
) -> int:
    """Write the factor rows ``|Λ|^{1/2} Uᵀ J`` of one batch (examples ``start, start + 1, ...``) from
    row ``filled`` on; returns the next free row."""
    fn = op.fn
    evals, evecs, keep = spectrum

    def outputs_one(p: Params, example: Any) -> Tensor:
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
        return fn.outputs(p, one)[0]

    in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch)
    jac = vmap(jacrev(outputs_one), in_dims=(None, in_dims))(fn.params, batch)  # {name: [B, O, *shape]}
    b, o = evals.shape
    flat = torch.cat([jac[name].reshape(b, o, -1) for name in fn.names], dim=2)  # J [B, O, P]
    rows = evals.abs().sqrt().unsqueeze(2) * (evecs.transpose(1, 2) @ flat)  # [B, O, P]
    owner = torch.arange(start, start + b, device=flat.device).unsqueeze(1).expand(b, o)
    end = filled + int(keep.sum())
    factor.rows[filled:end] = rows[keep]
    factor.sign[filled:end] = evals.sign()[keep]
    factor.owner[filled:end] = owner[keep]
    return end


@dataclass
class _GaussNewtonFactor:
    """``Σ_i J_iᵀ ∇²_o ℓ_i J_i = Gᵀ diag(sign) G`` with ``G`` ``[R, P]`` stacked per-example factor rows.

    ``owner[r]`` is the example (position ``0..n−1`` in the operator) row ``r`` belongs to.
    """

    rows: Tensor
    sign: Tensor
    owner: Tensor
    num_examples: int

    def product(self, v: Tensor) -> Tensor:
        """``Σ_i J_iᵀ H_i J_i`` applied to each row of ``v`` ``[k, P]`` (a sum, not averaged)."""
        return ((v @ self.rows.T) * self.sign) @ self.rows

    def subset(self, positions: Tensor) -> _GaussNewtonFactor:
        """The factor of the examples at ``positions``, renumbered ``0..len(positions)−1``."""
        positions = positions.to(self.owner.device)
        renumber = torch.full((self.num_examples,), -1, dtype=torch.long, device=self.owner.device)
        renumber[positions] = torch.arange(positions.numel(), device=self.owner.device)
        new_owner = renumber[self.owner]
        keep = new_owner >= 0
        return _GaussNewtonFactor(self.rows[keep], self.sign[keep], new_owner[keep], positions.numel())
