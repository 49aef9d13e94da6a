"""LiSSA: the stochastic Neumann recursion ``h ← v + h − (H_B + λI) h / s`` over sampled mini-batches.

The fixed point is ``s · (H + λI)^{-1} v``; the result is the mean over repeats of ``h / s``. The step
contracts the error along an eigen-direction of ``(H_B + λI)`` with eigenvalue ``e`` by ``|1 − e/s|``:
it converges when every ``e/s`` lies in ``(0, 2)`` and oscillates (mini-batch noise dominating) close
to 2.

**Scale.** ``scale="auto"`` takes ``s = 1.1 · e_max`` with ``e_max`` the largest Ritz value (Lanczos,
``PROBE_STEPS`` single-vector products each) of ``H_B + λI`` over ``PROBE_BATCHES`` sampled mini-batches
(the full data once when ``batch_size ≥ n``): every ``e/s`` is then in ``(0, 1)``, so no direction
oscillates, the slowest contracts by ``1 − λ_min/s`` (the best a non-oscillating step can do), and the
10 % margin covers the estimate's shortfall (a Ritz value is a lower bound) and batches not probed.
The probes cost ``PROBE_BATCHES · PROBE_STEPS · B`` example-products, in proportion to the recursion's
``depth · k · B``, not to ``n``. No full-data estimate is needed: ``λ_max`` is convex on symmetric
matrices and ``H = E_B[H_B]`` (batches drawn uniformly without replacement), so by Jensen
``λ_max(H) ≤ E_B[λ_max(H_B)]`` (for a partition into equal batches, ``λ_max(H) ≤ mean_j λ_max(H_{B_j})``):
the probed batches bound the full-data top eigenvalue from above in expectation, and it is the batches'
eigenvalues, not ``H``'s, that the step must stay below. Should the recursion still diverge, the scale
moves up by the factors of ``scale_ladder``.

**Stopping.** Each row stops when its full-data relative residual ``‖(H + λI) x − v‖ / ‖v‖`` is at most
``tol`` (checked every ``max(10, 4n/B)`` steps, about a quarter of the cost of the steps themselves,
and at ``depth``); ``depth`` is the cap, and reaching it warns with the residual. ``tol=0`` runs exactly
``depth`` steps with no checks (as pyDVL's ``rtol=0``) and no warning. The residual of the result is
reported: the last check's (no further pass), or, with ``tol=0`` or ``repeat > 1``, one pass over
``residual_examples`` seeded random examples (all ``n`` by default; ``0``: none, not reported).

**Definiteness.** With a curvature that is not positive semi-definite by construction (``"exact"``)
and ``check_definite=True``, a ``LANCZOS_STEPS``-step Lanczos run on the full-data ``H + λI`` (the only
full-data eigenvalue work) gives its smallest Ritz value; a value ``≤ 0`` proves a non-positive
curvature direction and raises :class:`~lightning_fimoda.exceptions.ConfigurationError`, as CG does
(Lanczos finds such directions in far fewer products than CG's search directions need).
``check_definite=False`` skips the proof (an equal-work comparison with libraries that do not make it):
the recursion then may not converge, and diverges (:class:`~lightning_fimoda.exceptions.DivergenceError`
once the ladder is spent) along a negative direction.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..curvature import CurvatureOperator
from ..exceptions import ConfigurationError, DivergenceError
from .arnoldi import lanczos, ritz_pairs
from .base import Solver, SolverConfig, register_solver, relative_residuals

__all__ = ["LissaConfig", "LissaSolver", "extreme_eigenvalues"]

SCALE_MARGIN = 1.1
LANCZOS_STEPS = 30  # full-data operator: the definiteness proof only
PROBE_STEPS = 10  # each probed mini-batch
PROBE_BATCHES = 4
MAX_RELATIVE_RESIDUAL = 1.0  # above this the result is worse than x = 0: noise, not a solve


def extreme_eigenvalues(matvec: Any, num_params: int, steps: int, seed: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[float, float]:
    """Smallest and largest Ritz values after ``min(P, steps)`` Lanczos steps: ``λ_min ≤ lo`` and
    ``hi ≤ λ_max`` (each the Rayleigh quotient of a vector), both converging fast to the extremes."""
    alphas, betas, basis = lanczos(matvec, num_params, min(num_params, steps), seed, dtype, device)
    ritz = ritz_pairs(alphas, betas, basis)[0]
    return ritz.min().item(), ritz.max().item()


@dataclass(frozen=True)
class LissaConfig(SolverConfig):
    """Args:
    depth: cap on recursion steps per repeat. repeat: independent repeats averaged.
    batch_size: examples per sampled mini-batch ``B`` (drawn without replacement, seeded).
    scale: ``"auto"`` (see the module docstring) or a positive number.
    scale_ladder: factors (>= 1, increasing) applied to the auto scale in turn when the recursion
        diverges or its result is worse than ``x = 0``.
    seed: seed of the mini-batch sampling and the Lanczos start vectors. tol: relative residual to stop at
        (``0``: no residual checks, ``depth`` steps).
    check_definite: prove ``H + λI ≻ 0`` first for a curvature that is not PSD by construction (a
        full-data Lanczos run); ``False`` skips it (then the recursion may diverge, see the module doc).
    residual_examples: examples of the reported residual when no check ends the recursion (``tol=0`` or
        ``repeat > 1``): ``None`` all, ``0`` none (and no move up the ladder for a poor result).
    """

    depth: int = 1000
    repeat: int = 1
    batch_size: int = 128
    scale: float | str = "auto"
    scale_ladder: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    seed: int = 0
    tol: float = 1e-2
    check_definite: bool = True
    residual_examples: int | None = None

    def __post_init__(self) -> None:
        for name in ("depth", "repeat", "batch_size"):
            self._integer(name)
        self._integer("seed", minimum=0)
        self._number("tol")
        self._flag("check_definite")
        if self.residual_examples is not None:
            self._integer("residual_examples", minimum=0)
        if self.scale != "auto":
            self._number("scale", strict=True)
        ladder = tuple(float(s) for s in self.scale_ladder)
        if not ladder or ladder[0] < 1.0 or list(ladder) != sorted(ladder):
            self._fail(f"scale_ladder must be increasing factors >= 1, got {self.scale_ladder!r}.")
        object.__setattr__(self, "scale_ladder", ladder)


@register_solver("lissa")
class LissaSolver(Solver):
    """LiSSA with an eigenvalue-estimate scale and a residual stopping rule (see the module docstring).

    Divergence: a row is diverging when its iterate is not finite or ``‖h_t‖ > 2 min(t + 1, s/λ) ‖v‖``
    (when every step contracts, ``‖h_t‖ ≤ min(t + 1, s/λ) ‖v‖``); it raises
    :class:`~lightning_fimoda.exceptions.DivergenceError` once no larger scale is left.
    ``info`` reports ``lissa_lambda_max`` (the largest estimate, full data or probed mini-batch),
    ``lissa_lambda_min`` (full data), ``lissa_scale`` and ``lissa_scales_tried``; the diagnostics
    of a solve ``scale``, ``steps``, ``converged`` and ``max_relative_residual``.
    """

    config_class = LissaConfig

    def _prepare(self, op: CurvatureOperator) -> None:
        cfg = self.config
        self.info = {}
        lam_max = 0.0
        if cfg.check_definite and not op.positive_semidefinite:
            lam_min, lam_max = extreme_eigenvalues(op.apply, op.num_params, LANCZOS_STEPS, cfg.seed, op.dtype, op.device)
            self.info["lissa_lambda_min"] = lam_min
            if lam_min <= 0:
                raise ConfigurationError(
                    f"{self.label}: H + λI is not positive definite (a direction with vᵀ(H+λI)v = {lam_min:.3g} "
                    "was found), so LiSSA's recursion cannot converge to (H + λI)^{-1} v; use "
                    "hessian='gauss_newton' or more damping."
                )
        if cfg.scale == "auto":
            lam_max = max(lam_max, self._probed_lambda_max(op))
            self._scales = [SCALE_MARGIN * lam_max * f for f in cfg.scale_ladder]
            self.info["lissa_lambda_max"] = lam_max
        else:
            self._scales = [float(cfg.scale)]
        self.info.update(lissa_scale=self._scales[0], lissa_scales_tried=[])

    def _probed_lambda_max(self, op: CurvatureOperator) -> float:
        """The largest Ritz value of ``H_B + λI`` over ``PROBE_BATCHES`` sampled mini-batches (the full
        data once when the batch holds every example); see the module doc for why it bounds ``λ_max``."""
        cfg = self.config
        b = min(cfg.batch_size, op.n)
        gen = torch.Generator().manual_seed(cfg.seed)
        top = 0.0
        for k in range(PROBE_BATCHES if b < op.n else 1):
            batch_op = op if b == op.n else op.subset(torch.randperm(op.n, generator=gen)[:b])
            top = max(top, extreme_eigenvalues(batch_op.apply, op.num_params, PROBE_STEPS, cfg.seed + k, op.dtype,
                                               op.device)[1])
        return top

    def _solve(self, op: CurvatureOperator, rhs: Tensor) -> tuple[Tensor, dict[str, Any]]:
        tried = self.info["lissa_scales_tried"]
        candidates = [s for s in self._scales if not tried or s >= tried[-1]]
        for k, scale in enumerate(candidates):
            last = k == len(candidates) - 1
            if not tried or tried[-1] != scale:
                tried.append(scale)
            self.info["lissa_scale"] = scale
            try:
                x, steps, converged, residuals = self._repeats(op, rhs, scale)
            except DivergenceError:
                if last:
                    raise
                continue
            relative = residuals.max().item() if residuals is not None else None
            if relative is None or relative <= MAX_RELATIVE_RESIDUAL or last:
                break
        if not converged and self.config.tol > 0:
            far = " far from (H + λI)^{-1} v (worse than x = 0)" if (relative or 0.0) > MAX_RELATIVE_RESIDUAL else ""
            shown = f"{relative:.3g}" if relative is not None else "not computed (residual_examples=0)"
            warnings.warn(
                f"{self.label}: LiSSA reached depth={self.config.depth} before the relative residual "
                f"tol={self.config.tol:g}; the result is{far or ' approximate'}: max relative residual "
                f"{shown}. Increase depth, batch_size or repeat, or use 'cg'.",
                RuntimeWarning,
                stacklevel=3,
            )
        return x, {"scale": scale, "steps": steps, "converged": converged, "max_relative_residual": relative,
                   "residual_examples": self._residual_examples(op) if self._needs_final_residual() else op.n}

    def _needs_final_residual(self) -> bool:
        """Whether no residual check ends the recursion (then the result's residual costs one pass)."""
        return self.config.tol == 0 or self.config.repeat > 1

    def _residual_examples(self, op: CurvatureOperator) -> int:
        wanted = self.config.residual_examples
        return op.n if wanted is None else min(op.n, wanted)

    def _final_residuals(self, op: CurvatureOperator, x: Tensor, rhs: Tensor) -> Tensor | None:
        """Relative residuals of ``x`` over ``residual_examples`` seeded random examples (``None``: none)."""
        m = self._residual_examples(op)
        if m == 0:
            return None
        if m < op.n:
            op = op.subset(torch.randperm(op.n, generator=torch.Generator().manual_seed(self.config.seed))[:m])
        return relative_residuals(op, x, rhs)

    def _repeats(self, op: CurvatureOperator, rhs: Tensor, scale: float) -> tuple[Tensor, int, bool, Tensor | None]:
        """The mean over repeats, steps, whether every row reached ``tol``, and the relative residuals."""
        gen = torch.Generator().manual_seed(self.config.seed)
        total = torch.zeros_like(rhs)
        steps, converged = 0, True
        for k in range(self.config.repeat):
            x, used, ok, residuals = self._recursion(op, rhs, scale, gen, k)
            total += x
            steps, converged = max(steps, used), converged and ok
        x = total / self.config.repeat
        if self._needs_final_residual():
            residuals = self._final_residuals(op, x, rhs)
        return x, steps, converged, residuals

    def _recursion(
        self, op: CurvatureOperator, v: Tensor, scale: float, gen: torch.Generator, repeat_index: int
    ) -> tuple[Tensor, int, bool, Tensor]:
        """One repeat for the rows of ``v``: ``(x, steps used, every row reached tol, residuals)``, the
        residuals those of each row's last check (zeros with ``tol=0``: no checks).

        With sampled mini-batches ``x`` is the mean of ``h / s`` over the steps since the last residual
        check (the recursion is SGD on ``½xᵀ(H + λI)x − vᵀx`` with step ``1/s``: averaging its iterates
        removes most of the mini-batch noise); on the full data it is the last ``h / s``.
        """
        b = min(self.config.batch_size, op.n)
        check_every = max(10, math.ceil(4 * op.n / b))
        ceiling = scale / op.damping if op.damping > 0 else math.inf
        v_norm = v.norm(dim=1)
        h = v.clone()
        window = torch.zeros_like(v)
        x = v / scale
        active = v_norm > 0
        residuals = torch.zeros_like(v_norm)
        t = 0
        while active.any() and t < self.config.depth:
            idx = active.nonzero().squeeze(1)
            rows = slice(None) if idx.numel() == v.shape[0] else idx  # no gather/scatter copies when all run
            batch_op = op if b == op.n else op.subset(torch.randperm(op.n, generator=gen)[:b])
            h_rows = h[rows]
            h_rows = v[rows] + h_rows - batch_op.apply(h_rows) / scale
            h[rows] = h_rows
            window[rows] += h_rows
            t += 1
            h_norm = h_rows.norm(dim=1)
            bad = ~torch.isfinite(h_norm) | (h_norm > 2.0 * min(t + 1, ceiling) * v_norm[rows])
            if bad.any():
                raise DivergenceError(
                    f"{self.label}: LiSSA diverged at step {t} of repeat {repeat_index + 1} with scale={scale:.3g} "
                    f"(‖h‖/‖v‖ = {(h_norm / v_norm[rows].clamp_min(1e-300)).max().item():.3g}); use a larger "
                    "scale (or scale='auto'), more damping, or a larger batch_size."
                )
            since = (t - 1) % check_every + 1
            if since == check_every or t == self.config.depth:
                x[rows] = (h[rows] if b == op.n else window[rows] / since) / scale
                window[rows] = 0.0
                if self.config.tol > 0:
                    residuals[rows] = relative_residuals(op, x[rows], v[rows])
                    active[rows] = residuals[rows] > self.config.tol
        return x, t, self.config.tol > 0 and not bool(active.any()), residuals
