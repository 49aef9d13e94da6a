"""Influence functions (SPEC §3): ``τ(j, x) = (1/n) g_jᵀ (H + λI)^{-1} g_x``, positive = helpful.

Four solvers for ``(H + λI)^{-1}`` share one base, :class:`InfluenceFunction`; each takes
``hessian="gauss_newton" | "true"`` (the curvature, :class:`~lightning_fimoda.curvature.CurvatureOperator`)
independently of the solver:

- ``explicit``: materialise ``H + λI`` and eigendecompose it (tiny models; the reference).
- ``cg``: conjugate gradient on the full-data operator, all right-hand sides at once.
- ``lissa``: the stochastic Neumann recursion over sampled mini-batches.
- ``arnoldi``: top-``rank`` eigenpairs of ``H`` by Lanczos (Arnoldi for a symmetric operator).

The curvature ``H`` and ``n`` are those of the whole training dataset given to ``fit``; the scores
cover ``train_indices``. Cost shape: one solve per test instance (or per scored training instance
when those are fewer; ``H + λI`` is symmetric), then one matrix product with the cached gradients.

Damping: ``damping=None`` means ``λ = damping_scale · λ_G`` with ``λ_G`` the mean squared entry of
the scored training examples' per-sample gradients (``damping_scale = 100`` by default, SPEC §3).

Generalized influence (``generalized=True``): ``g_j`` is replaced by ``∇ℓ(z_j; θ̂ + Δθ_D)`` with the
damped Newton step ``Δθ_D = −(H + λI)^{-1} ∇R(θ̂)``, solved with the same solver; ``H`` and ``g_x``
stay at ``θ̂``.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..curvature import HESSIAN_TYPES, CurvatureOperator, HessianType
from ..functional import FunctionalTask
from ..gradients import per_sample_gradients
from ..registry import register_estimator
from .base import Estimator

__all__ = [
    "ArnoldiInfluence",
    "CGInfluence",
    "ExplicitInfluence",
    "InfluenceFunction",
    "LissaInfluence",
    "SolverDivergenceError",
]


class SolverDivergenceError(RuntimeError):
    """An iterative solver diverged; its iterates are discarded, never returned as scores."""


class InfluenceFunction(Estimator):
    """Shared base of the influence-function solvers.

    Args:
        hessian: ``"gauss_newton"`` (default) or ``"true"`` (``∇²R(θ̂)``).
        damping: ``λ``; ``None`` uses ``damping_scale · λ_G``.
        damping_scale: ``c`` of the default damping rule.
        generalized: use training gradients after the damped Newton step (SPEC §3).
        chunk_size: training examples per forward pass in full-data curvature products.
        params, label: see :class:`~lightning_fimoda.Estimator`.

    ``info`` reports ``damping``, ``lambda_G``, ``curvature_products`` (``"cached jacobians"`` or
    ``"matrix-free"``, see :class:`~lightning_fimoda.curvature.CurvatureOperator`), the solver's
    diagnostics (``solver`` for the score solve, ``solver_newton_step`` for the generalized step) and,
    if generalized, the norms of ``∇R(θ̂)`` and ``Δθ_D``.
    """

    def __init__(
        self,
        *,
        hessian: HessianType = "gauss_newton",
        damping: float | None = None,
        damping_scale: float = 100.0,
        generalized: bool = False,
        chunk_size: int = 512,
        params: Sequence[str] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(params=params, label=label)
        self.hessian = hessian
        self.damping = damping
        self.damping_scale = damping_scale
        self.generalized = generalized
        self.chunk_size = chunk_size

    # -- fitting ----------------------------------------------------------------------------------
    def _fit(self) -> None:
        if self.hessian not in HESSIAN_TYPES:
            raise ValueError(f"{self.label}: hessian must be one of {HESSIAN_TYPES}, got {self.hessian!r}.")
        if not isinstance(self.generalized, bool):
            raise TypeError(f"{self.label}: generalized must be True or False, got {self.generalized!r}.")
        grads = self.train_gradients()
        lam = self._resolve_damping(grads.flat)
        fn = FunctionalTask(self.model_, self.task_, self.params)
        self.operator_ = CurvatureOperator(
            fn, self.train_dataset_, None, hessian=self.hessian, damping=lam, batch_size=self.chunk_size
        )
        self.info["curvature_products"] = self.operator_.products
        self._prepare()
        self._train_flat = grads.flat
        if self.generalized:
            risk_grad = self.operator_.risk_gradient()
            step = -self._solve(risk_grad.unsqueeze(0), "solver_newton_step")[0]
            shifted = fn.unflatten(fn.flatten(fn.params) + step)
            self._train_flat = per_sample_gradients(
                self.model_, self.task_, self.train_dataset_, self.train_indices_, kind="loss",
                params=self.params, at=shifted, memory_budget=self.cache_.memory_budget,
            ).flat
            self.info["risk_gradient_norm"] = risk_grad.norm().item()
            self.info["newton_step_norm"] = step.norm().item()

    def _resolve_damping(self, train_flat: Tensor) -> float:
        lambda_g = train_flat.pow(2).mean().item()
        self.info["lambda_G"] = lambda_g
        if self.damping is not None:
            lam = float(self.damping)
            if not (math.isfinite(lam) and lam >= 0.0):
                raise ValueError(f"{self.label}: damping must be a finite number >= 0, got {self.damping!r}.")
        else:
            c = float(self.damping_scale)
            if not (math.isfinite(c) and c > 0.0):
                raise ValueError(f"{self.label}: damping_scale must be > 0, got {self.damping_scale!r}.")
            if lambda_g <= 0.0:
                raise ValueError(
                    f"{self.label}: every training gradient is zero, so the default damping "
                    "damping_scale * lambda_G is 0; pass damping= explicitly."
                )
            lam = c * lambda_g
        self.info["damping"] = lam
        return lam

    # -- scoring ----------------------------------------------------------------------------------
    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        g_test = self.test_gradients(test_dataset, test_indices).flat
        g_train = self._train_flat
        n = self.operator_.n
        if g_test.shape[0] <= g_train.shape[0]:
            self.info["solved_for"] = "test"
            return self._solve(g_test, "solver") @ g_train.T / n
        self.info["solved_for"] = "train"
        return g_test @ self._solve(g_train, "solver").T / n

    def _solve(self, rhs: Tensor, report: str) -> Tensor:
        """``(H + λI)^{-1}`` applied to the rows of ``rhs`` ``[k, P]``; diagnostics to ``info[report]``."""
        out, diagnostics = self._solve_rows(rhs)
        self.info[report] = diagnostics
        return out

    # -- solver interface ---------------------------------------------------------------------------
    def _prepare(self) -> None:  # noqa: B027 - optional hook
        """Work done once per fit (factorisations, eigenpairs, scale selection)."""

    @abstractmethod
    def _solve_rows(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Return ``(H + λI)^{-1} rhs`` row by row ``[k, P]`` and a dict of diagnostics."""


def _relative_residuals(op: CurvatureOperator, x: Tensor, rhs: Tensor) -> Tensor:
    """``‖(H + λI) x − b‖ / ‖b‖`` per row (0 for zero rows solved exactly)."""
    res = (op.apply(x) - rhs).norm(dim=1)
    norms = rhs.norm(dim=1)
    return torch.where(norms > 0, res / norms.clamp_min(torch.finfo(rhs.dtype).tiny), res)


@register_estimator("explicit")
class ExplicitInfluence(InfluenceFunction):
    """Dense solve: materialise ``H + λI`` ``[P, P]`` and eigendecompose it once per fit.

    Args:
        max_params: refuse models with more selected parameters than this (memory ``P²``).

    ``H + λI`` may be indefinite (true Hessian, small ``λ``): the exact inverse is still used; a
    (numerically) singular matrix raises. ``info`` reports its extreme eigenvalues.
    """

    def __init__(
        self,
        *,
        hessian: HessianType = "gauss_newton",
        damping: float | None = None,
        damping_scale: float = 100.0,
        generalized: bool = False,
        chunk_size: int = 512,
        max_params: int = 5000,
        params: Sequence[str] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(
            hessian=hessian, damping=damping, damping_scale=damping_scale, generalized=generalized,
            chunk_size=chunk_size, params=params, label=label,
        )
        self.max_params = max_params

    def _prepare(self) -> None:
        p = self.operator_.num_params
        if p > self.max_params:
            raise ValueError(
                f"{self.label}: the model has P = {p} selected parameters, above max_params = "
                f"{self.max_params} (a dense [P, P] matrix). Use 'cg', 'lissa' or 'arnoldi', select "
                "fewer parameters with params=, or raise max_params."
            )
        evals, evecs = torch.linalg.eigh(self.operator_.dense())
        largest = evals.abs().max()
        if evals.abs().min() <= largest * p * torch.finfo(evals.dtype).eps:
            raise ValueError(f"{self.label}: H + λI is singular (eigenvalue ~0); increase damping.")
        self._evals, self._evecs = evals, evecs
        self.info["min_eigenvalue"] = evals.min().item()
        self.info["max_eigenvalue"] = evals.max().item()

    def _solve_rows(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        return ((rhs @ self._evecs) / self._evals) @ self._evecs.T, {"method": "eigh"}


@register_estimator("cg")
class CGInfluence(InfluenceFunction):
    """Conjugate gradient on the full-data operator, one right-hand side per row, run together.

    Args:
        tol: stop a row when ``‖(H + λI) x − b‖ ≤ tol · ‖b‖``.
        max_iter: iteration limit. Rows not converged by then are returned as they stand (truncated
            CG, itself a regularised solve) with a ``RuntimeWarning``; ``info["solver"]`` reports
            ``converged``, ``iterations`` and ``max_relative_residual``.

    CG needs ``H + λI`` positive definite; a non-positive curvature direction raises ``ValueError``
    (use ``hessian="gauss_newton"`` or more damping).
    """

    def __init__(
        self,
        *,
        hessian: HessianType = "gauss_newton",
        damping: float | None = None,
        damping_scale: float = 100.0,
        generalized: bool = False,
        chunk_size: int = 512,
        tol: float = 1e-6,
        max_iter: int = 500,
        params: Sequence[str] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(
            hessian=hessian, damping=damping, damping_scale=damping_scale, generalized=generalized,
            chunk_size=chunk_size, params=params, label=label,
        )
        self.tol = tol
        self.max_iter = max_iter

    def _prepare(self) -> None:
        if not (self.tol > 0 and int(self.max_iter) >= 1):
            raise ValueError(f"{self.label}: need tol > 0 and max_iter >= 1, got {self.tol}, {self.max_iter}.")

    def _solve_rows(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        op = self.operator_
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        p = r.clone()
        rs = (r * r).sum(dim=1)
        target = (self.tol * rhs.norm(dim=1)) ** 2
        active = rs > target
        iterations = 0
        while active.any() and iterations < int(self.max_iter):
            idx = active.nonzero().squeeze(1)
            p_a = p[idx]
            ap = op.apply(p_a)
            pap = (p_a * ap).sum(dim=1)
            if (pap <= 0).any():
                raise ValueError(
                    f"{self.label}: H + λI is not positive definite along a CG direction "
                    f"(pᵀ(H+λI)p = {pap.min().item():.3g}); use hessian='gauss_newton' or more damping."
                )
            alpha = rs[idx] / pap
            x[idx] += alpha.unsqueeze(1) * p_a
            r[idx] -= alpha.unsqueeze(1) * ap
            rs_new = (r[idx] * r[idx]).sum(dim=1)
            p[idx] = r[idx] + (rs_new / rs[idx]).unsqueeze(1) * p_a
            rs[idx] = rs_new
            active[idx] = rs_new > target[idx]
            iterations += 1
        relative = _relative_residuals(op, x, rhs)
        converged = not bool(active.any())
        if not converged:
            warnings.warn(
                f"{self.label}: CG did not converge in max_iter={self.max_iter} iterations for "
                f"{int(active.sum())} of {rhs.shape[0]} right-hand sides (max relative residual "
                f"{relative.max().item():.3g} > tol={self.tol}); raise max_iter or damping.",
                RuntimeWarning,
                stacklevel=2,
            )
        return x, {
            "converged": converged,
            "iterations": iterations,
            "max_relative_residual": relative.max().item(),
        }


MAX_RELATIVE_RESIDUAL = 1.0  # ‖(H + λI) x − v‖ / ‖v‖ above this is worse than x = 0: not a solve
DEFAULT_SCALE_LADDER = tuple(m * 10.0**e for e in range(-6, 10) for m in (1.0, 2.0, 5.0))


@register_estimator("lissa")
class LissaInfluence(InfluenceFunction):
    """LiSSA: ``h ← v + h − (H_B h + λh)/scale`` over ``depth`` sampled mini-batches, ``repeat`` times.

    The result is ``mean over repeats of h / scale`` (the recursion's fixed point is
    ``scale · (H + λI)^{-1} v``). It converges when the eigenvalues of ``(H_B + λI)/scale`` lie in
    ``(0, 2)``.

    Args:
        depth: recursion steps per repeat; repeat: independent repeats averaged.
        batch_size: examples per sampled mini-batch ``B`` (drawn without replacement, seeded).
        scale: a positive number, or ``"auto"``: the smallest value of ``scale_ladder`` (skipping
            values below ``λ/2``, which cannot converge for a positive semi-definite ``H``) for which
            the recursion converges, first on probe vectors at fit (two training gradients and one
            Gaussian, one repeat), then on the actual right-hand sides (a solve that fails moves on to
            the next value of the ladder). Converging means: no divergence, and a full-data relative
            residual of at most 1 (see below).
        seed: seed of the mini-batch sampling and the probes.

    Divergence: a row is diverging when its iterate is not finite or ``‖h_t‖ > 2 min(t + 1, scale/λ) ‖v‖``
    (when every step contracts, ``‖h_t‖ ≤ min(t + 1, scale/λ) ‖v‖``); it raises
    :class:`SolverDivergenceError`. Noise: near the edge of stability (mini-batch eigenvalues of
    ``(H_B + λI)/scale`` close to 2) the iterates stay bounded but oscillate, and mini-batch noise swamps
    the result; the full-data relative residual ``‖(H + λI) x − v‖ / ‖v‖`` then exceeds 1 (worse than
    ``x = 0``). ``"auto"`` rejects such scales; a fixed scale only warns. ``info`` reports
    ``lissa_scale``, the scales tried, and the residual.
    """

    def __init__(
        self,
        *,
        hessian: HessianType = "gauss_newton",
        damping: float | None = None,
        damping_scale: float = 100.0,
        generalized: bool = False,
        chunk_size: int = 512,
        depth: int = 1000,
        repeat: int = 1,
        batch_size: int = 128,
        scale: float | str = "auto",
        scale_ladder: Sequence[float] = DEFAULT_SCALE_LADDER,
        seed: int = 0,
        params: Sequence[str] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(
            hessian=hessian, damping=damping, damping_scale=damping_scale, generalized=generalized,
            chunk_size=chunk_size, params=params, label=label,
        )
        self.depth = depth
        self.repeat = repeat
        self.batch_size = batch_size
        self.scale = scale
        self.scale_ladder = tuple(scale_ladder)
        self.seed = seed

    def _prepare(self) -> None:
        if int(self.depth) < 1 or int(self.repeat) < 1 or int(self.batch_size) < 1:
            raise ValueError(
                f"{self.label}: depth, repeat and batch_size must be >= 1, got "
                f"{self.depth}, {self.repeat}, {self.batch_size}."
            )
        if self.scale == "auto":
            self.scale_ = self._auto_scale()
        elif isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0:
            self.scale_ = float(self.scale)
        else:
            raise ValueError(f"{self.label}: scale must be 'auto' or a positive number, got {self.scale!r}.")
        self.info["lissa_scale"] = self.scale_

    def _auto_scale(self) -> float:
        ladder = self._ladder()
        if not ladder:
            raise ValueError(f"{self.label}: scale_ladder has no value >= damping / 2.")
        gen = torch.Generator().manual_seed(self.seed)
        train = self.train_gradients().flat
        picks = torch.randperm(train.shape[0], generator=gen)[:2].to(train.device)
        gauss = torch.randn(1, train.shape[1], generator=gen, dtype=train.dtype).to(train.device)
        probes = torch.cat([train[picks], gauss * train.abs().mean()])
        probes = probes[probes.norm(dim=1) > 0]
        tried = []
        for s in ladder:
            tried.append(s)
            try:
                x = self._recursion(probes, s, self._generator(), repeat_index=0)
            except SolverDivergenceError:
                continue
            if _relative_residuals(self.operator_, x, probes).max().item() > MAX_RELATIVE_RESIDUAL:
                continue
            self.info["lissa_scales_tried"] = tried
            return s
        raise SolverDivergenceError(
            f"{self.label}: LiSSA did not converge for any scale in the ladder up to {ladder[-1]:.3g} "
            f"({len(tried)} tried); with hessian={self.hessian!r} H + λI may be indefinite: use more "
            "damping, hessian='gauss_newton', a larger batch_size or more depth."
        )

    def _ladder(self) -> list[float]:
        ladder = sorted(float(s) for s in self.scale_ladder if s > 0)
        return [s for s in ladder if s >= self.operator_.damping / 2]

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _recursion(self, v: Tensor, scale: float, gen: torch.Generator, repeat_index: int) -> Tensor:
        """One repeat of the recursion for the rows of ``v``; returns ``h / scale``."""
        op = self.operator_
        b = min(int(self.batch_size), op.n)
        full = op if b == op.n else None
        v_norm = v.norm(dim=1)
        ceiling = scale / op.damping if op.damping > 0 else math.inf
        h = v.clone()
        for t in range(int(self.depth)):
            batch_op = full if full is not None else op.subset(torch.randperm(op.n, generator=gen)[:b])
            h = v + h - batch_op.apply(h) / scale
            h_norm = h.norm(dim=1)
            bad = ~torch.isfinite(h_norm) | (h_norm > 2.0 * min(t + 2, ceiling) * v_norm)
            if bad.any():
                raise SolverDivergenceError(
                    f"{self.label}: LiSSA diverged at step {t + 1} of repeat {repeat_index + 1} with "
                    f"scale={scale:.3g} (‖h‖/‖v‖ = {(h_norm / v_norm.clamp_min(1e-300)).max().item():.3g}); "
                    "use a larger scale (or scale='auto'), more damping, or a larger batch_size."
                )
        return h / scale

    def _solve_rows(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        while True:  # auto: the probes passed, but these right-hand sides may still fail at this scale
            larger = [s for s in self._ladder() if s > self.scale_] if self.scale == "auto" else []
            try:
                x = self._repeats(rhs, self.scale_)
            except SolverDivergenceError:
                if not larger:
                    raise
            else:
                relative = _relative_residuals(self.operator_, x, rhs).max().item()
                if relative <= MAX_RELATIVE_RESIDUAL or not larger:
                    break
            self.scale_ = larger[0]
            self.info["lissa_scales_tried"].append(self.scale_)
            self.info["lissa_scale"] = self.scale_
        if relative > MAX_RELATIVE_RESIDUAL:
            warnings.warn(
                f"{self.label}: the LiSSA result is far from (H + λI)^{{-1}} v (max relative residual "
                f"{relative:.3g} > {MAX_RELATIVE_RESIDUAL:g}); increase scale, depth, repeat or batch_size.",
                RuntimeWarning,
                stacklevel=2,
            )
        return x, {"scale": self.scale_, "max_relative_residual": relative}

    def _repeats(self, rhs: Tensor, scale: float) -> Tensor:
        gen = self._generator()
        total = torch.zeros_like(rhs)
        for k in range(int(self.repeat)):
            total += self._recursion(rhs, scale, gen, k)
        return total / int(self.repeat)


@register_estimator("arnoldi")
class ArnoldiInfluence(InfluenceFunction):
    """Low-rank inverse from the top eigenpairs of ``H`` (Lanczos = Arnoldi for symmetric ``H``).

    ``iterations`` Lanczos steps (full re-orthogonalisation, seeded start vector) give Ritz pairs of
    the undamped ``H``; the ``rank`` of largest magnitude ``(e_i, u_i)`` are kept and

        ``(H + λI)^{-1} v ≈ Σ_i u_i (u_iᵀ v) / (e_i + λ) + (v − U Uᵀ v) / λ``,

    i.e. ``H`` is treated as 0 on the complement of the subspace (so large damping gives Grad-Dot's
    direction, and ``rank = P`` is exact). This needs ``λ > 0``.

    Args:
        rank: eigenpairs kept. iterations: Krylov dimension (default ``min(P, 2·rank + 20)``).
        seed: seed of the start vector.

    ``info["arnoldi"]`` reports the kept eigenvalues' range and the largest relative Ritz residual.
    """

    def __init__(
        self,
        *,
        hessian: HessianType = "gauss_newton",
        damping: float | None = None,
        damping_scale: float = 100.0,
        generalized: bool = False,
        chunk_size: int = 512,
        rank: int = 50,
        iterations: int | None = None,
        seed: int = 0,
        params: Sequence[str] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(
            hessian=hessian, damping=damping, damping_scale=damping_scale, generalized=generalized,
            chunk_size=chunk_size, params=params, label=label,
        )
        self.rank = rank
        self.iterations = iterations
        self.seed = seed

    def _prepare(self) -> None:
        op = self.operator_
        if op.damping <= 0:
            raise ValueError(f"{self.label}: arnoldi needs damping > 0 (the complement is scaled by 1/λ).")
        p = op.num_params
        rank = int(self.rank)
        if rank < 1:
            raise ValueError(f"{self.label}: rank must be >= 1, got {self.rank}.")
        steps = min(p, int(self.iterations) if self.iterations is not None else 2 * rank + 20)
        if steps < min(rank, p):
            raise ValueError(f"{self.label}: iterations ({steps}) must be >= rank ({rank}).")
        evals, vecs, residuals = _lanczos(op, steps, self.seed)
        keep = evals.abs().argsort(descending=True)[: min(rank, evals.numel())]
        self._evals, self._vecs = evals[keep], vecs[keep]
        shifted = self._evals + op.damping
        if (shifted.abs() <= op.damping * 1e-8).any():
            raise ValueError(f"{self.label}: H + λI is singular in the Krylov subspace; change damping.")
        self.info["arnoldi"] = {
            "rank": int(keep.numel()),
            "iterations": int(evals.numel()),
            "max_eigenvalue": self._evals.max().item(),
            "min_kept_eigenvalue": self._evals.min().item(),
            "max_relative_ritz_residual": (residuals[keep] / self._evals.abs().clamp_min(1e-300)).max().item(),
        }

    def _solve_rows(self, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        lam = self.operator_.damping
        coeff = rhs @ self._vecs.T  # [k, r]
        inside = (coeff / (self._evals + lam)) @ self._vecs
        return inside + (rhs - coeff @ self._vecs) / lam, {"rank": int(self._evals.numel())}


def _lanczos(op: CurvatureOperator, steps: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz pairs of the undamped ``H`` after ``steps`` Lanczos steps with full re-orthogonalisation.

    Returns eigenvalues ``[m]``, unit eigenvectors as rows ``[m, P]`` and residual norms ``[m]``
    (``m ≤ steps``: fewer when the Krylov space becomes invariant).
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(op.num_params, generator=gen, dtype=op.dtype).to(op.device)
    q = q / q.norm()
    basis: list[Tensor] = []
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    beta = q.new_zeros(())
    scale = q.new_zeros(())
    for _ in range(steps):
        basis.append(q)
        w = op.curvature(q)
        alpha = q @ w
        alphas.append(alpha)
        q_mat = torch.stack(basis)
        for _pass in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
            w = w - (q_mat @ w) @ q_mat
        beta = w.norm()
        scale = torch.maximum(scale, alpha.abs() + beta)
        if beta <= scale * 1e3 * torch.finfo(op.dtype).eps:
            break
        betas.append(beta)
        q = w / beta
    m = len(alphas)
    tri = torch.diag(torch.stack(alphas))
    if m > 1:
        off = torch.stack(betas[: m - 1])
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    evals, s = torch.linalg.eigh(tri)
    vecs = s.T @ torch.stack(basis)
    last_beta = betas[m - 1] if len(betas) >= m else beta.new_zeros(())
    residuals = (last_beta * s[-1]).abs()
    return evals, vecs, residuals
