"""Influence functions (SPEC §3): ``τ(j, x) = (1/n) g_jᵀ (H + λI)^{-1} g_x``, positive = helpful.

One estimator, :class:`InfluenceFunction`, combines a curvature type (``hessian=``, see
:mod:`lightning_fimoda.curvature`) with a solver for ``(H + λI)^{-1}`` (:mod:`lightning_fimoda.solvers`);
the two are orthogonal. Each registered solver name builds the estimator with that solver:

- ``explicit``: materialise ``H + λI`` and eigendecompose it (tiny models; the reference).
- ``cg``: conjugate gradient on the full-data operator, all right-hand sides at once.
- ``lissa``: the stochastic Neumann recursion over sampled mini-batches.
- ``arnoldi``: top-``rank`` eigenpairs of ``H`` by Lanczos (Arnoldi for a symmetric operator).

The curvature ``H`` and ``n`` are those of the whole training dataset given to ``fit``; the scores
cover ``train_indices``. Cost shape: one solve per test instance (or per scored training instance
when those are fewer and their gradients fit the cache's budget; ``H + λI`` is symmetric), then one
pass of the training gradients, streamed past the solved vectors in chunks (resident when they fit).
The cached Gauss-Newton factor takes at most the room left in the cache's resident half.

Damping: ``damping=None`` means ``λ = damping_scale · λ_G`` with ``λ_G`` the mean squared entry of
the scored training examples' per-sample gradients (``damping_scale = 100`` by default, SPEC §3).

Generalized influence (``generalized=True``): ``g_j`` is replaced by ``∇ℓ(z_j; θ̂ + Δθ_D)`` with the
damped Newton step ``Δθ_D = −(H + λI)^{-1} ∇R(θ̂)``, solved with the same solver; ``H`` and ``g_x``
stay at ``θ̂``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .._data import model_device_dtype
from ..curvature import CurvatureOperator, resolve_hessian
from ..curvature.operator import DEFAULT_JACOBIAN_BUDGET
from ..exceptions import ConfigurationError, SolverDivergenceError
from ..functional import FunctionalTask
from ..gradients import GradientStream, streamed_mean_square, streamed_products
from ..gradients.budget import itemsize
from ..registry import register_estimator
from ..solvers import SOLVERS, Solver
from ..task import AttributionTask
from .base import Estimator
from .config import EstimatorConfig, split_kwargs

__all__ = ["InfluenceConfig", "InfluenceFunction", "SolverDivergenceError"]


@dataclass(frozen=True)
class InfluenceConfig(EstimatorConfig):
    """Settings of :class:`InfluenceFunction` (the solver's are in its own config).

    Args:
        hessian: ``"gauss_newton"`` (default) or ``"exact"`` (``∇²R(θ̂)``; ``"true"`` and ``True`` are
            aliases), or any name registered with :func:`~lightning_fimoda.curvature.register_curvature`.
        damping: ``λ``; ``None`` uses ``damping_scale · λ_G``.
        damping_scale: ``c`` of the default damping rule.
        generalized: use training gradients after the damped Newton step (SPEC §3).
        chunk_size: training examples per forward pass in full-data curvature products.
    """

    hessian: Any = "gauss_newton"
    damping: float | None = None
    damping_scale: float = 100.0
    generalized: bool = False
    chunk_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            object.__setattr__(self, "hessian", resolve_hessian(self.hessian))
        except ConfigurationError as err:
            self._fail(str(err))
        self._number("damping", optional=True)
        self._number("damping_scale", strict=True)
        self._flag("generalized")
        self._integer("chunk_size")


class InfluenceFunction(Estimator):
    """``(1/n) g_jᵀ (H + λI)^{-1} g_x`` with a given solver.

    Args:
        solver: a registered solver name (``"explicit"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``) or a
            :class:`~lightning_fimoda.solvers.Solver` instance.
        config: an :class:`InfluenceConfig`; keyword arguments go to it or, for a solver name, to the
            solver's config (e.g. ``tol=`` for ``cg``).

    ``info`` reports ``damping``, ``lambda_G``, ``curvature_products`` (``"cached jacobians"`` or
    ``"matrix-free"``), the solver's fit information, its diagnostics (``solver`` for the score solve,
    ``solver_newton_step`` for the generalized step) and, if generalized, the norms of ``∇R(θ̂)`` and
    ``Δθ_D``.
    """

    config_class = InfluenceConfig

    def __init__(self, solver: str | Solver = "cg", config: InfluenceConfig | None = None, **kwargs: Any) -> None:
        if isinstance(solver, str):
            if solver not in SOLVERS:
                raise ConfigurationError(f"Unknown solver {solver!r}; choose one of {sorted(SOLVERS)}.")
            self.name = solver
            own, solver_kwargs = split_kwargs(solver, kwargs, [InfluenceConfig, SOLVERS[solver].config_class])
            solver = SOLVERS[solver](self._build_config(SOLVERS[solver].config_class, None, solver_kwargs))
        else:
            self.name = solver.name
            own = kwargs
        super().__init__(config, **own)
        self.solver = solver
        self.solver.label = self.label

    def settings(self) -> dict[str, Any]:
        return {"estimator": self.name, **self.config.to_dict(), **self.solver.config.to_dict(), **self.info}

    def __repr__(self) -> str:
        shown = [repr(self.name)]
        for config in (self.config, self.solver.config):
            defaults = type(config)()
            shown += [f"{k}={v!r}" for k, v in vars(config).items() if v != getattr(defaults, k)]
        return f"InfluenceFunction({', '.join(shown)})"

    def _check(self, model: nn.Module, task: AttributionTask, train_dataset: Any, names: list[str]) -> None:
        params = dict(model.named_parameters())
        self.solver.check(sum(params[n].numel() for n in names))
        if self.config.hessian == "gauss_newton" and type(task).outputs is AttributionTask.outputs:
            raise ConfigurationError(
                f"{self.label}: hessian='gauss_newton' needs the task's outputs() and loss_from_outputs(); "
                f"{type(task).__name__} does not define outputs(). Define them, or use hessian='exact'."
            )

    # -- fitting ----------------------------------------------------------------------------------
    def _fit(self) -> None:
        cfg = self.config
        self._train = self.train_stream()
        lam = self._resolve_damping(self._train)
        fn = FunctionalTask(self.model_, self.task_, self.params)
        self.operator_ = CurvatureOperator(
            fn, self.train_dataset_, None, hessian=cfg.hessian, damping=lam, batch_size=cfg.chunk_size,
            jacobian_budget=self._jacobian_budget(), split=True,  # split over the ranks of a process group
            memory_budget=self.cache_.chunk_budget(model_device_dtype(self.model_)[0]),
        )
        self.info["curvature_products"] = self.operator_.products
        self.solver.fit(self.operator_)
        self.info.update(self.solver.info)
        if cfg.generalized:
            risk_grad = self.operator_.risk_gradient()
            step = -self._solve(risk_grad.unsqueeze(0), "solver_newton_step")[0]
            shifted = fn.unflatten(fn.flatten(fn.params) + step)
            self._train = self._held_if_fits(self.train_stream(at=shifted, what="training (shifted)"))
            self.info["train_gradients"] = self._train.storage
            self.info["risk_gradient_norm"] = risk_grad.norm().item()
            self.info["newton_step_norm"] = step.norm().item()

    def _jacobian_budget(self) -> int:
        """Bytes for the cached Gauss-Newton factor: what the cache's resident half has left (at most the
        operator's default)."""
        device, _ = model_device_dtype(self.model_)
        room = self.cache_.resolve(device) - self.cache_.chunk_budget(device) - self.cache_.resident_bytes()
        return max(0, min(DEFAULT_JACOBIAN_BUDGET, room))

    def _held_if_fits(self, stream: GradientStream) -> GradientStream:
        """``stream`` held in memory when its ``[n, P']`` rows fit beside the cache's resident sets."""
        device, dtype = model_device_dtype(self.model_)
        if stream.storage == "resident" or not self.cache_.fits(stream.n, stream.width, itemsize(dtype), device):
            return stream
        return stream.held()

    def _resolve_damping(self, train: GradientStream) -> float:
        if self.config.damping is None or train.storage == "resident":  # λ_G costs a pass when recomputed
            lambda_g = streamed_mean_square(train)
            self.info["lambda_G"] = lambda_g
        if self.config.damping is not None:
            lam = float(self.config.damping)
        elif lambda_g <= 0.0:
            raise ConfigurationError(
                f"{self.label}: every training gradient is zero, so the default damping "
                "damping_scale * lambda_G is 0; pass damping= explicitly."
            )
        else:
            lam = self.config.damping_scale * lambda_g
        self.info["damping"] = lam
        return lam

    # -- scoring ----------------------------------------------------------------------------------
    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        g_test = self.test_matrix(test_dataset, test_indices)
        n = self.operator_.n
        if g_test.shape[0] > self._train.n and self._train.storage == "resident":
            self.info["solved_for"] = "train"
            return g_test @ self._solve(self._train.collect(), "solver").T / n
        self.info["solved_for"] = "test"
        return streamed_products(self._train, self._solve(g_test, "solver").T).T / n

    def _solve(self, rhs: Tensor, report: str) -> Tensor:
        """``(H + λI)^{-1}`` applied to the rows of ``rhs`` ``[k, P]``; diagnostics to ``info[report]``."""
        out, diagnostics = self.solver.solve(rhs)
        self.info[report] = diagnostics
        self.info.update(self.solver.info)
        return out


for _name in SOLVERS:
    register_estimator(_name)(functools.partial(InfluenceFunction, _name))
