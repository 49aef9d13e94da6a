"""Matrix-free curvature of the empirical risk: ``(H + λI) V`` for many vectors at once.

``H`` is either the true Hessian ``∇²R(θ̂)`` of ``R(θ) = (1/n) Σ_i ℓ(z_i; θ)`` (forward-over-reverse:
``jvp`` of ``grad``) or the Gauss-Newton matrix ``(1/n) Σ_i J_iᵀ ∇²_o ℓ_i J_i`` (``jvp`` through the
model outputs, the output Hessian, ``vjp`` back), SPEC §3. When the output Jacobians of all ``n``
examples (at most ``n·O·P`` numbers) fit in ``jacobian_budget`` bytes, the Gauss-Newton operator computes
them once (``vmap(jacrev)``) as factor rows ``G_i = |Λ_i|^{1/2} U_iᵀ J_i`` of ``∇²_o ℓ_i = U_i Λ_i U_iᵀ`` (rows of
zero curvature dropped: softmax cross-entropy keeps ``O − 1`` per example), and each product becomes two
dense matrix products ``Gᵀ (sign(Λ) ⊙ (G V))``: the same numbers, several times faster for small-output
models with many right-hand sides (CG, LiSSA). The Hessian type is a switch of the
operator, orthogonal to the solver that uses it (as in pyDVL): solvers only call
:meth:`CurvatureOperator.apply`.

Vectors are rows: ``V`` has shape ``[P]`` or ``[k, P]`` (``k`` right-hand sides, vmapped together),
columns in the :class:`~lightning_fimoda.FunctionalTask` parameter order (the order of
:class:`~lightning_fimoda.PerSampleGradients`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from ._data import iter_batches, model_device_dtype, resolve_indices
from .functional import FunctionalTask, Params, eval_mode

__all__ = ["HESSIAN_TYPES", "CurvatureOperator"]

HessianType = Literal["gauss_newton", "true"]
HESSIAN_TYPES = ("gauss_newton", "true")
DEFAULT_JACOBIAN_BUDGET = 2 << 30  # bytes of cached output Jacobians (Gauss-Newton)


class CurvatureOperator:
    """``V ↦ (H + λI) V`` over ``dataset[indices]`` (an average over those examples), matrix-free.

    Args:
        fn: the model and task as functions of the selected parameters (``fn.params`` = ``θ̂``,
            where the curvature is taken).
        dataset: map-style training dataset; ``indices`` selects the ``n`` examples of ``R``
            (``None``: all).
        hessian: ``"gauss_newton"`` (default; positive semi-definite) or ``"true"``.
        damping: ``λ ≥ 0`` added to the diagonal.
        batch_size: examples per forward pass (the average is exact, whatever the batch size). The
            collated batches are loaded once, on the model's device, and kept for later products.
        jacobian_budget: bytes the cached Gauss-Newton factor rows may take (``0``: always
            matrix-free).

    Attributes:
        n: number of examples averaged over; ``num_params``: ``P``.
    """

    def __init__(
        self,
        fn: FunctionalTask,
        dataset: Any,
        indices: Sequence[int] | Tensor | None = None,
        *,
        hessian: HessianType = "gauss_newton",
        damping: float = 0.0,
        batch_size: int = 512,
        jacobian_budget: int = DEFAULT_JACOBIAN_BUDGET,
    ) -> None:
        if hessian not in HESSIAN_TYPES:
            raise ValueError(f"hessian must be one of {HESSIAN_TYPES}, got {hessian!r}.")
        damping = float(damping)
        if not damping >= 0.0 or damping == float("inf"):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.fn = fn
        self.dataset = dataset
        self.indices = resolve_indices(dataset, indices, "training")
        self.hessian = hessian
        self.damping = damping
        self.batch_size = int(batch_size)
        self.jacobian_budget = int(jacobian_budget)
        self.device, self.dtype = model_device_dtype(fn.model)
        self._batches: list[Any] | None = None
        # the Gauss-Newton factor once computed; False when over the budget (or not Gauss-Newton)
        self._jacobians: _GaussNewtonFactor | bool | None = None

    @property
    def n(self) -> int:
        return self.indices.numel()

    @property
    def num_params(self) -> int:
        return self.fn.num_params

    @property
    def products(self) -> str:
        """How products are computed: ``"cached jacobians"`` or ``"matrix-free"``."""
        return "cached jacobians" if self._cached_jacobians() is not None else "matrix-free"

    def with_damping(self, damping: float) -> CurvatureOperator:
        """The same curvature with another ``λ`` (shares the loaded batches and Jacobians)."""
        other = CurvatureOperator(
            self.fn, self.dataset, self.indices, hessian=self.hessian, damping=damping,
            batch_size=self.batch_size, jacobian_budget=self.jacobian_budget,
        )
        other._batches = self._batches
        other._jacobians = self._jacobians
        return other

    def subset(self, positions: Tensor) -> CurvatureOperator:
        """Operator averaging over ``indices[positions]`` only (a mini-batch, e.g. for LiSSA).

        With cached Jacobians the subset takes their rows (computed once, for every subset)."""
        other = CurvatureOperator(
            self.fn, self.dataset, self.indices[positions], hessian=self.hessian, damping=self.damping,
            batch_size=max(self.batch_size, positions.numel()), jacobian_budget=self.jacobian_budget,
        )
        cached = self._cached_jacobians()
        if cached is not None:
            other._jacobians = cached.subset(positions)
        elif self.hessian == "gauss_newton":
            other._jacobians = False
        return other

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
        cached = self._cached_jacobians()
        if cached is not None:
            total = cached.product(rows)
        else:
            tangents = self.fn.unflatten(rows)
            product = self._gnvp if self.hessian == "gauss_newton" else self._hvp
            total = torch.zeros_like(rows)
            with eval_mode(self.fn.model):
                for batch in self._all_batches():
                    total += product(batch, tangents)
        total /= self.n
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
            for batch in self._all_batches():
                g = grad(lambda p, b=batch: self.fn.loss(p, b).sum())(params)
                total += self.fn.flatten(g)
        return total / self.n

    # -- internals --------------------------------------------------------------------------------
    def _all_batches(self) -> list[Any]:
        if self._batches is None:
            self._batches = [
                batch for _, batch in iter_batches(
                    self.fn.task, self.dataset, self.indices, self.batch_size, self.device
                )
            ]
        return self._batches

    def _cached_jacobians(self) -> _GaussNewtonFactor | None:
        """The Gauss-Newton factor of all ``n`` examples when it fits the budget, else ``None``.

        A forward pass first counts the factor rows (output-Hessian eigenvalues that are not zero), so
        the factor is allocated once, at its exact size, and only when that size fits the budget.
        """
        if self.hessian != "gauss_newton" or self._jacobians is False:
            return None
        if self._jacobians is None:
            batches = self._all_batches()
            with eval_mode(self.fn.model):
                spectra = [self._output_spectrum(batch) for batch in batches]
                num_rows = sum(int(keep.sum()) for _, _, keep in spectra)
                if num_rows * self.num_params * self.dtype.itemsize > self.jacobian_budget:
                    self._jacobians = False
                    return None
                factor = _GaussNewtonFactor(
                    torch.empty(num_rows, self.num_params, dtype=self.dtype, device=self.device),
                    torch.empty(num_rows, dtype=self.dtype, device=self.device),
                    torch.empty(num_rows, dtype=torch.long, device=self.device),
                    self.n,
                )
                filled, start = 0, 0
                for batch, spectrum in zip(batches, spectra):
                    filled = self._fill_factor(factor, filled, batch, spectrum, start)
                    start += spectrum[2].shape[0]
            self._jacobians = factor
        return self._jacobians

    def _output_spectrum(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Eigenvalues ``[B, O]``, eigenvectors ``[B, O, O]`` of the output Hessians, and which to keep."""
        out = self.fn.outputs(self.fn.params, batch).detach()
        evals, evecs = torch.linalg.eigh(self._output_hessian(out, batch))
        scale = evals.abs().amax(dim=1, keepdim=True)
        keep = evals.abs() > out.shape[1] * torch.finfo(evals.dtype).eps * scale
        return evals, evecs, keep

    def _fill_factor(
        self, factor: _GaussNewtonFactor, filled: int, batch: Any, spectrum: tuple[Tensor, Tensor, Tensor],
        start: int,
    ) -> int:
        """Write the factor rows ``|Λ|^{1/2} Uᵀ J`` of one batch (examples ``start, start + 1, ...``)
        from row ``filled`` on; returns the next free row."""
        fn = self.fn
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

    def _hvp(self, batch: Any, tangents: Params) -> Tensor:
        """``Σ_{i∈batch} ∇²ℓ_i · t`` for each of the ``k`` stacked tangents: ``[k, P]``."""
        params = self.fn.params

        def batch_grad(p: Params) -> Params:
            return grad(lambda q: self.fn.loss(q, batch).sum())(p)

        def one(t: Params) -> Params:
            return jvp(batch_grad, (params,), (t,))[1]

        return self.fn.flatten(vmap(one)(tangents))

    def _gnvp(self, batch: Any, tangents: Params) -> Tensor:
        """``Σ_{i∈batch} J_iᵀ ∇²_o ℓ_i J_i t`` for each of the ``k`` stacked tangents: ``[k, P]``."""
        params = self.fn.params

        def outputs(p: Params) -> Tensor:
            return self.fn.outputs(p, batch)

        out, pullback = vjp(outputs, params)
        out = out.detach()
        jt = vmap(lambda t: jvp(outputs, (params,), (t,))[1])(tangents)  # [k, B, O]
        h_out = self._output_hessian(out, batch)  # [B, O, O]
        u = torch.einsum("bij,kbj->kbi", h_out, jt)
        return self.fn.flatten(vmap(pullback)(u)[0])

    def _output_hessian(self, out: Tensor, batch: Any) -> Tensor:
        """``∇²_o ℓ`` per example ``[B, O, O]``: the task's closed form, else ``torch.func.hessian``."""
        task = self.fn.task
        closed = getattr(task, "output_hessian", None)
        if callable(closed):
            h_out = closed(out, batch)
        else:
            def loss_one(o: Tensor, example: Any) -> Tensor:
                ex = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
                return task.loss_from_outputs(o.unsqueeze(0), ex)[0]

            in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch)
            h_out = vmap(hessian(loss_one), in_dims=(0, in_dims))(out, batch)
        b, o = out.shape
        if tuple(h_out.shape) != (b, o, o):
            raise ValueError(
                f"{task!r}: output Hessian has shape {tuple(h_out.shape)}, expected {(b, o, o)}."
            )
        return h_out.to(out.dtype)


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
