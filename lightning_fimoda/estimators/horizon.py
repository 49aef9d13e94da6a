"""Horizon-matched influence: the linearised leave-one-out further training at every checkpoint.

``τ_t(j, x) = (1/n) g_xᵀ φ_t(H) g_j`` with ``φ_t(λ) = (1 − (1 − ηλ)^t)/λ`` (SGD, learning rate ``η``,
``t`` optimizer steps; heavy-ball momentum has its own exact filter), derived in
:mod:`lightning_fimoda.solvers.matrix_function` and ``docs/interpreting_scores.md``. ``t = 1`` is
Grad-Dot ``· η/n``; ``t → ∞`` the undamped influence function; in between the horizon acts as damping
``λ ≈ 1/(ηt)``. Scores are ``[n_checkpoints, n_test, n_train]``, checkpoint ``c`` taken after as many
optimizer steps as the gold standard (:class:`~lightning_fimoda.FurtherTrainingLoop`) has taken at its
checkpoint ``c`` with the same settings and training-set size ``n``.

Two evaluations of ``φ_t(H) v``, for all checkpoints at once:

- exact, low rank: the Gauss-Newton matrix ``H = Gᵀ G / n`` from its cached factor rows ``G``
  ``[R, P]`` (``R = n·O`` at most, see :class:`~lightning_fimoda.curvature.CurvatureOperator`) has the
  nonzero eigenpairs of the Gram matrix ``G Gᵀ / n``; every other direction has ``λ = 0``. Exact for
  any ``P``, chosen by ``exact="auto"`` when ``R ≤ 4000`` and ``R < P``;
- exact, dense: ``H = U Λ Uᵀ`` from the dense matrix (``P ≤ 3000`` with ``exact="auto"``; the test oracle);
- Krylov: one Lanczos run of ``krylov_steps`` per vector, vectorised over blocks of vectors, with the
  :class:`~lightning_fimoda.curvature.CurvatureOperator` products (cached Gauss-Newton factor where it
  fits). ``info["krylov_error"]`` is ``max ‖y_k − y_{k−δ}‖/‖y_k‖`` over vectors and checkpoints
  (``δ = k // 4``): the change of the result over the last ``δ`` iterations.

Solves run for the side with fewer vectors (usually the test gradients); ``φ_t(H)`` is symmetric.
``leave_out="drop"`` is scored like ``subtract``: averaged over sample orders it injects the same ``η/n``
per step to first order, up to ``j``-independent terms that the ``mean`` adjustment removes (checked
numerically on least squares with mini-batch SGD: ``docs/interpreting_scores.md``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._data import dataset_length
from ..curvature import CurvatureOperator, resolve_hessian
from ..exceptions import ConfigurationError
from ..functional import FunctionalTask
from ..further_training.config import FurtherTrainingConfig
from ..registry import register_estimator
from ..solvers.lissa import extreme_eigenvalues
from ..solvers.matrix_function import MatVec, horizon_filter, krylov_coefficients, lanczos, stability_limit
from ..task import AttributionTask
from .base import Estimator
from .config import EstimatorConfig

__all__ = ["HorizonConfig", "HorizonInfluence", "horizon_scores_exact", "horizon_scores_krylov", "low_rank_spectrum"]

EXACT_MAX_PARAMS = 3000  # exact="auto": dense eigendecomposition up to this many parameters
DENSE_MAX_PARAMS = 20000  # refuse the dense path beyond this (a [P, P] float64 matrix of 3.2 GB)
LOW_RANK_MAX_ROWS = 4000  # exact="auto": low-rank Gauss-Newton spectrum up to this many factor rows
EXACT_CHOICES = ("auto", True, False, "dense", "low_rank")
BLOCK_BYTES = 256 << 20  # Lanczos bases of one block of vectors
LAMBDA_MAX_STEPS = 20  # Lanczos steps of the λ_max estimate on the Krylov path
LOOP_FIELDS = ("lr", "epochs", "steps", "batch_size", "eval_every", "momentum", "leave_out")


@dataclass(frozen=True)
class HorizonConfig(EstimatorConfig):
    """Every setting of the ``horizon`` estimator (validated on construction).

    ``lr``, ``epochs`` / ``steps``, ``batch_size``, ``eval_every``, ``momentum``, ``leave_out``: the
    further training to match, as in :class:`~lightning_fimoda.further_training.FurtherTrainingConfig`
    (plain SGD; :meth:`further_training` builds that config, whose schedule gives the checkpoints).
    ``hessian``: ``"gauss_newton"`` or ``"exact"`` (aliases ``"true"``, ``True``; stored as ``"exact"``).
    ``krylov_steps``: most Lanczos iterations per vector; ``krylov_tol``: stop earlier once the result
    changes by less than this over 8 iterations (``0``: always ``krylov_steps``). ``exact``: ``"auto"``
    (low rank or dense where they apply, see the module docstring, else Krylov), ``True`` (low rank or
    dense), ``"low_rank"``, ``"dense"`` or ``False`` (Krylov). ``chunk_size``: training examples per
    forward pass in curvature products.
    """

    lr: float | None = None
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 128
    eval_every: str | int = "epoch"
    momentum: float = 0.0
    leave_out: str = "subtract"
    hessian: str = "gauss_newton"
    krylov_steps: int = 64
    krylov_tol: float = 1e-6
    exact: str | bool = "auto"
    chunk_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr is None:
            self._fail("horizon needs lr= (and epochs= or steps=), or gold=<FurtherTrainingLoop>.")
        self._number("lr", strict=True)
        try:
            object.__setattr__(self, "hessian", resolve_hessian(self.hessian))
            self.further_training()
        except ConfigurationError as err:
            self._fail(str(err))
        self._integer("krylov_steps", minimum=2)
        self._number("krylov_tol")
        if self.krylov_tol >= 1:
            self._fail(f"krylov_tol must be a number in [0, 1), got {self.krylov_tol!r}.")
        if not any(self.exact is c or (isinstance(c, str) and self.exact == c) for c in EXACT_CHOICES):
            self._fail(f"exact must be one of {list(EXACT_CHOICES)}, got {self.exact!r}.")
        if self.exact == "low_rank" and self.hessian != "gauss_newton":
            self._fail("exact='low_rank' needs hessian='gauss_newton' (the true Hessian has no Gauss-Newton factor).")
        self._integer("chunk_size")

    @classmethod
    def loop_settings(cls, loop: Any) -> dict[str, Any]:
        """``lr``, ``momentum``, ``epochs`` / ``steps``, ``batch_size``, ``eval_every``, ``leave_out`` of a
        :class:`~lightning_fimoda.FurtherTrainingLoop` (``loop.config``), which must run plain SGD without
        weight decay or clipping: the linearisation models nothing else."""
        ft = getattr(loop, "config", None)
        if not isinstance(ft, FurtherTrainingConfig):
            raise ConfigurationError(
                f"gold= must be a FurtherTrainingLoop, got {loop!r} (gold: true works in FiMODACallback's "
                "estimators, which copy the callback's gold standard)."
            )
        if ft.optimizer != "sgd" or ft.weight_decay or ft.grad_clip is not None:
            raise ConfigurationError(
                f"horizon models plain SGD further training (momentum allowed); the loop uses optimizer="
                f"{ft.optimizer!r}, weight_decay={ft.weight_decay}, grad_clip={ft.grad_clip}."
            )
        return {name: getattr(ft, name) for name in LOOP_FIELDS}

    @classmethod
    def from_loop(cls, loop: Any, **settings: Any) -> HorizonConfig:
        """The further-training settings of ``loop`` (see :meth:`loop_settings`) plus ``settings``."""
        return cls(**cls.loop_settings(loop), **settings)

    def further_training(self) -> FurtherTrainingConfig:
        """The gold standard's config with these settings (plain SGD, one seed)."""
        return FurtherTrainingConfig(
            optimizer="sgd", lr=self.lr, momentum=self.momentum, batch_size=self.batch_size, epochs=self.epochs,
            steps=self.steps, eval_every=self.eval_every, leave_out=self.leave_out,
        )

    def checkpoint_steps(self, n: int) -> list[int]:
        """Optimizer steps the gold standard's full run has taken at each checkpoint, for ``n`` examples."""
        return self.further_training().checkpoint_steps(n)


def horizon_scores_exact(evals: Tensor, evecs: Tensor, g_test: Tensor, g_train: Tensor, steps: Sequence[int],
                         lr: float, momentum: float, n: int) -> Tensor:
    """``(1/n) g_x φ_t(H) g_j`` ``[C, n_test, n_train]`` (float64) from eigenpairs ``H U = U diag(evals)``,
    ``U`` ``[P, r]`` orthonormal; the orthogonal complement of ``U`` (when ``r < P``) has ``λ = 0``:
    ``φ_t(H) = φ_t(0) I + U (φ_t(Λ) − φ_t(0)) Uᵀ``."""
    phi = horizon_filter(evals, steps, lr, momentum)  # [C, r]
    phi0 = horizon_filter(evals.new_zeros(1), steps, lr, momentum)  # [C, 1]
    g_test, g_train = g_test.to(torch.float64), g_train.to(torch.float64)
    left, right = g_test @ evecs, g_train @ evecs  # [T, r], [N, r]
    ranged = torch.einsum("tr,cr,nr->ctn", left, phi - phi0, right)
    return (ranged + phi0.view(-1, 1, 1) * (g_test @ g_train.T)) / n


def low_rank_spectrum(rows: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Nonzero eigenpairs ``(evals [r], U [P, r])`` (float64) of ``H = Gᵀ G / n`` from ``G`` ``[R, P]``:
    ``G Gᵀ / n = W Λ Wᵀ`` and ``U = Gᵀ W (nΛ)^{-1/2}``; eigenvalues below ``R·eps·λ_max`` are dropped."""
    g = rows.to(torch.float64)
    evals, w = torch.linalg.eigh(g @ g.T / n)
    keep = evals > g.shape[0] * torch.finfo(torch.float64).eps * evals.abs().max().clamp_min(1e-300)
    evals, w = evals[keep], w[:, keep]
    return evals, g.T @ (w / (n * evals).sqrt())


def _krylov_change(lz: Any, filt: Any, delta: int) -> tuple[Tensor, Tensor]:
    """Coefficients ``[C, b, k]`` of ``f(H) v`` and their relative change ``[C, b]`` since ``k − δ`` steps."""
    coef = krylov_coefficients(lz, filt)
    coarse = krylov_coefficients(lz, filt, lz.steps - delta)
    diff = coef.clone()
    diff[..., : coarse.shape[2]] -= coarse
    return coef, diff.norm(dim=2) / coef.norm(dim=2).clamp_min(torch.finfo(torch.float64).tiny)


def horizon_scores_krylov(matvec: MatVec, g_solve: Tensor, g_other: Tensor, steps: Sequence[int], lr: float,
                          momentum: float, n: int, krylov_steps: int, krylov_tol: float = 0.0,
                          block_bytes: int = BLOCK_BYTES) -> tuple[Tensor, dict[str, Any]]:
    """``(1/n) (φ_t(H) g_solve) · g_other`` ``[C, n_solve, n_other]`` by Lanczos, blocks of ``g_solve`` rows.

    A block stops early (checked every 8 iterations, from 16 on) once ``φ_t(H) v`` changed by less than
    ``krylov_tol`` (relative, every vector and checkpoint) over the last 8 iterations.
    Returns the scores (float64) and diagnostics: ``krylov_error`` (max relative change of ``φ_t(H) v``
    over the last ``δ`` iterations: 8 when stopped early, else ``k // 4``), ``krylov_error_per_checkpoint``,
    ``ritz_max`` (largest Ritz value seen) and ``krylov_dimension`` (``[min, max]`` over vectors of the
    Krylov space's dimension: below ``k`` where a run found an invariant subspace, ``β_j ≤ 1e3·eps·‖T‖``;
    the error estimate is then 0 if that happened before ``k − δ``).
    """
    p = g_solve.shape[1]
    k = max(2, min(krylov_steps, p))
    block = max(1, block_bytes // (k * p * g_solve.element_size()))
    delta = max(1, k // 4)
    filt = lambda theta: horizon_filter(theta, steps, lr, momentum)  # noqa: E731
    out, errors, dims, ritz_max = [], [], [], -math.inf

    def converged(lz: Any) -> bool:
        return lz.steps >= 16 and float(_krylov_change(lz, filt, 8)[1].max()) < krylov_tol

    for start in range(0, g_solve.shape[0], block):
        lz = lanczos(matvec, g_solve[start : start + block], k, stop=converged if krylov_tol > 0 else None)
        coef, change = _krylov_change(lz, filt, 8 if lz.steps < k else delta)  # [C, b, k], [C, b]
        errors.append(change)
        ritz_max = max(ritz_max, float(torch.linalg.eigvalsh(lz.tridiagonal()).max()))
        dims.append(1 + (lz.beta != 0).sum(dim=1))
        projected = (lz.basis @ g_other.T).to(torch.float64)  # [b, k, N]
        out.append(torch.einsum("cbk,bkn->cbn", coef, projected) / n)
    err = torch.cat(errors, dim=1).amax(dim=1)  # [C]
    dims = torch.cat(dims)
    info = {"krylov_error": float(err.max()), "krylov_error_per_checkpoint": err.tolist(), "ritz_max": ritz_max,
            "krylov_dimension": [int(dims.min()), int(dims.max())]}
    return torch.cat(out, dim=1), info


@register_estimator("horizon")
class HorizonInfluence(Estimator):
    """``τ_t(j, x) = (1/n) g_xᵀ φ_t(H) g_j`` at every further-training checkpoint ``[C, n_test, n_train]``.

    Args:
        config, **kwargs: a :class:`HorizonConfig` and / or its fields (``lr``, ``epochs`` / ``steps``, ...).
        gold: a :class:`~lightning_fimoda.FurtherTrainingLoop` to copy the further-training settings
            from (:meth:`HorizonConfig.loop_settings`; plain SGD only), instead of giving them.

    Raises :class:`~lightning_fimoda.exceptions.ConfigurationError` in ``fit`` (before any solve) when
    ``ηλ_max ≥ 2(1 + β)``: the linearised further training diverges. ``info`` reports
    ``checkpoint_steps``, ``lambda_max``, ``eta_lambda_max``, ``path`` (``"low_rank"``, ``"dense"``,
    ``"krylov"``), ``curvature_products`` and, on the Krylov path, the error estimate.
    """

    config_class = HorizonConfig
    checkpoint_indexed: ClassVar[bool] = True

    def __init__(self, config: HorizonConfig | None = None, *, gold: Any = None, **kwargs: Any) -> None:
        if gold is not None:
            given = sorted(set(kwargs) & set(LOOP_FIELDS))
            if given:
                raise ConfigurationError(f"Estimator {self.name!r}: give gold= or {given}, not both.")
            kwargs = {**HorizonConfig.loop_settings(gold), **kwargs}
        super().__init__(config, **kwargs)

    def __repr__(self) -> str:
        shown = [f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config)
                 if getattr(self.config, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- fitting and scoring ------------------------------------------------------------------------
    def _check(self, model: nn.Module, task: AttributionTask, train_dataset: Any, names: list[str]) -> None:
        """The further-training schedule over the training set (e.g. ``n ≥ 2``)."""
        self.config.further_training().schedule(dataset_length(train_dataset, "training"))

    def _fit(self) -> None:
        cfg = self.config
        self._train_flat = self.train_gradients().flat
        fn = FunctionalTask(self.model_, self.task_, self.params)
        self.operator_ = CurvatureOperator(
            fn, self.train_dataset_, None, hessian=cfg.hessian, batch_size=cfg.chunk_size
        )
        op = self.operator_
        self.checkpoint_steps_ = cfg.checkpoint_steps(op.n)
        path = self._choose_path(op)
        self.info.update(checkpoint_steps=self.checkpoint_steps_, path=path, curvature_products=op.products)
        if path == "krylov":
            steps = min(op.num_params, LAMBDA_MAX_STEPS)
            lam_max = extreme_eigenvalues(op.curvature, op.num_params, steps, 0, op.dtype, op.device)[1]
        else:
            if path == "low_rank":
                self._evals, self._evecs = low_rank_spectrum(op.gauss_newton_factor().rows, op.n)
            else:
                self._evals, self._evecs = torch.linalg.eigh(op.dense().to(torch.float64))
            lam_max = float(self._evals.max()) if self._evals.numel() else 0.0
        self._check_stable(lam_max, "lambda_max")

    def _choose_path(self, op: CurvatureOperator) -> str:
        """``"low_rank"``, ``"dense"`` or ``"krylov"`` from ``config.exact`` and the problem's size."""
        want = self.config.exact
        factor = op.gauss_newton_factor() if want is not False and want != "dense" else None
        low_rank = factor is not None and bool((factor.sign > 0).all()) and factor.rows.shape[0] < op.num_params
        if want == "low_rank" and not low_rank:
            raise ConfigurationError(
                f"{self.label}: exact='low_rank' needs the cached Gauss-Newton factor (hessian='gauss_newton', "
                "within the Jacobian budget) with fewer rows than parameters and a convex output loss."
            )
        if low_rank and (want in (True, "low_rank") or factor.rows.shape[0] <= LOW_RANK_MAX_ROWS):
            return "low_rank"
        if want in (True, "dense") or (want == "auto" and op.num_params <= EXACT_MAX_PARAMS):
            if op.num_params > DENSE_MAX_PARAMS:
                raise ConfigurationError(
                    f"{self.label}: the dense exact path needs a [P, P] matrix with P = {op.num_params} > "
                    f"{DENSE_MAX_PARAMS}; use exact='auto' or False (Krylov)."
                )
            return "dense"
        return "krylov"

    def _check_stable(self, lam_max: float, key: str) -> None:
        cfg = self.config
        self.info[key] = lam_max
        self.info["eta_" + key] = cfg.lr * lam_max
        limit = stability_limit(cfg.lr, cfg.momentum)
        if lam_max >= limit:
            raise ConfigurationError(
                f"{self.label}: lr * lambda_max = {cfg.lr * lam_max:.4g} >= 2(1 + momentum) = "
                f"{2 * (1 + cfg.momentum):.4g}: the linearised further training diverges along the top "
                f"curvature direction (lambda_max = {lam_max:.4g}). Lower lr below {limit / lam_max * cfg.lr:.3g}."
            )

    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        cfg, n = self.config, self.operator_.n
        g_test = self.test_gradients(test_dataset, test_indices).flat
        g_train = self._train_flat
        if self.info["path"] != "krylov":
            scores = horizon_scores_exact(self._evals, self._evecs, g_test, g_train, self.checkpoint_steps_,
                                          cfg.lr, cfg.momentum, n)
            return scores.to(g_test.dtype)
        solve_test = g_test.shape[0] <= g_train.shape[0]
        self.info["solved_for"] = "test" if solve_test else "train"
        solve, other = (g_test, g_train) if solve_test else (g_train, g_test)
        scores, diagnostics = horizon_scores_krylov(
            self.operator_.curvature, solve, other, self.checkpoint_steps_, cfg.lr, cfg.momentum, n,
            cfg.krylov_steps, cfg.krylov_tol,
        )
        self.info.update(diagnostics)
        self._check_stable(max(self.info["lambda_max"], diagnostics["ritz_max"]), "lambda_max")
        return (scores if solve_test else scores.transpose(1, 2)).to(g_test.dtype)
