"""EK-FAC, K-FAC and diagonal influence functions through kronfluence (SPEC §3).

Registered as ``ekfac``, ``kfac`` and ``diagonal``; :class:`KronfluenceIdentity` (kronfluence's
``identity`` strategy, no preconditioning) is available as a class for checks, not registered.

**What is computed.** ``τ(j, x) = (1/n) g_jᵀ (F̂ + λI)^{-1} g_x`` with ``n`` the size of the training
dataset given to ``fit`` (the curvature covers all of it; scores cover ``train_indices``), ``g`` the
gradients of our task's per-example loss / measurement, and ``F̂``
kronfluence's layer-block-diagonal approximation (EK-FAC, K-FAC or diagonal) of
``F = (1/n) Σ_i ĝ_i ĝ_iᵀ`` over the tracked layers. Sign as SPEC §1: positive = helpful.

**Conventions that make the scale ours.**

- kronfluence differentiates *summed* batch losses and averages its curvature over examples, so the
  adapter's ``compute_train_loss`` / ``compute_measurement`` return ``Σ_batch ℓ`` / ``Σ_batch f``
  (a batch mean would shrink every per-example gradient, and the scores, by the batch size).
- kronfluence's pairwise score is ``g_xᵀ (F̂ + λI)^{-1} g_j`` (its damping ``damping_factor`` is added
  to the example-averaged curvature, as our ``λ`` is); we divide by ``n``. Hence
  ``KronfluenceIdentity`` returns exactly ``grad_dot / n`` (the ``λ → ∞`` limit ``λ·τ``).
- ``fisher="sampled"`` (default; kronfluence's "true Fisher") replaces the label by a seeded sample
  from the model, so that ``E[ĝ ĝᵀ] = Jᵀ ∇²_o ℓ J``: ``F`` is the Gauss-Newton matrix of SPEC §3 in
  expectation. For softmax cross-entropy the label is drawn from ``softmax(o)``
  (``E[(p − e_y)(p − e_y)ᵀ] = diag(p) − ppᵀ``). For every other task the output-space gradient is
  drawn directly as ``v ~ N(0, ∇²_o ℓ)`` and the pseudo-loss is ``Σ_b o_b · v_b``; for our MSE
  (``ℓ = ‖o − y‖²``, ``∇²_o ℓ = 2I``) that is the same as sampling ``y ~ N(o, ½ I)``, because
  ``∇_o ℓ = 2(o − y) ~ N(0, 2I)``. ``fisher="empirical"`` uses the true labels.
- ``damping=None`` uses kronfluence's heuristic per layer, ``0.1 ×`` the mean eigenvalue of that
  layer's curvature block; the values used are reported in :attr:`info` (``"damping"``).

**Traps handled.** kronfluence changes the model in place (``prepare_model``): it gets a deep copy.
It writes under ``./influence_results`` and silently returns old results when a name is reused:
every fit works in a fresh directory (a private temporary one, removed with the estimator, or a new
subdirectory of the user's ``output_dir``), with ``overwrite_output_dir=True``. It tracks only
``nn.Linear`` and ``nn.Conv2d``: other selected parameters are ignored with a warning; nothing to
track is an error. Its ``release_memory`` (a full ``gc.collect()`` and ``torch.compiler.reset()``,
about ten times per fit) is replaced while it runs for us (see :mod:`._kronfluence_runtime`).
Float64 models are analysed in float64. Under ``torch.distributed`` kronfluence's own DDP support splits
factor fitting and scoring over the ranks when it applies (CUDA with ``LOCAL_RANK``; see
:mod:`._kronfluence_runtime`); otherwise every rank computes the same factors itself.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._data import model_device_dtype
from .._files import WorkDir
from .._quiet import library_output
from ..curvature import checked_output_hessian
from ..distributed import broadcast_from_zero, rank_and_world
from ..exceptions import ConfigurationError, NotFittedError
from ..functional import select_parameters
from ..registry import register_estimator
from ..task import AttributionTask, SupervisedTask
from ._kronfluence_runtime import kronfluence_distributed, light_memory_release, shared_workdir
from ._library import library_errors, library_module
from .base import Estimator
from .config import EstimatorConfig

__all__ = ["EKFAC", "KFAC", "DiagonalFisher", "KronfluenceIdentity", "kronfluence_tracked_modules"]

FISHERS = ("sampled", "empirical")
HEURISTIC_DAMPING_SCALE = 0.1  # kronfluence's constant for damping_factor=None


def kronfluence_tracked_modules(
    model: nn.Module, selection: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """Modules kronfluence can track for the selected parameters, and the parameters it cannot.

    Returns ``(modules, ignored)``: names of the ``nn.Linear`` / ``nn.Conv2d`` layers (exact types, as
    kronfluence wraps only those) owning selected trainable parameters, and the selected parameter
    names that belong to no such layer. Raises ``ConfigurationError`` when a tracked layer has a parameter
    that is not selected (kronfluence always treats a layer's weight and bias together) or when
    nothing can be tracked.
    """
    TrackedModule = library_module("kronfluence.module.tracked_module", "ekfac").TrackedModule
    supported = tuple(TrackedModule.SUPPORTED_MODULES)
    names = select_parameters(model, selection)
    owner: dict[str, str] = {}
    layer_params: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        if type(module) in supported:
            own = [f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters(recurse=False)]
            layer_params[module_name] = own
            owner.update({p: module_name for p in own})
    modules = list(dict.fromkeys(owner[n] for n in names if n in owner))
    ignored = [n for n in names if n not in owner]
    chosen = set(names)
    for module_name in modules:
        missing = [p for p in layer_params[module_name] if p not in chosen]
        if missing:
            raise ConfigurationError(
                f"kronfluence treats all parameters of layer {module_name!r} together, but {missing} "
                f"are not selected (or not trainable); select the whole layer ({module_name!r})."
            )
    if not modules:
        kinds = ", ".join(t.__name__ for t in supported)
        raise ConfigurationError(
            f"kronfluence can track none of the selected parameters {names}: it supports only layers of "
            f"type {kinds}. Select such layers with params=[...], or use a native estimator."
        )
    return modules, ignored


class _FisherSampler:
    """Pseudo-loss whose gradient has covariance ``Jᵀ ∇²_o ℓ J`` (the Gauss-Newton matrix) per example."""

    def __init__(self, task: AttributionTask, seed: int) -> None:
        self.task = task
        # one CPU generator: the same samples (and scores) on every device; the draws are [B, O] only
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, outputs: Tensor, batch: Any) -> Tensor:
        gen = self.generator
        detached = outputs.detach()
        if isinstance(self.task, SupervisedTask) and self.task.loss == "cross_entropy":
            probs = detached.softmax(dim=1).cpu()
            labels = torch.multinomial(probs, 1, generator=gen).reshape(-1).to(outputs.device)
            return F.cross_entropy(outputs, labels, reduction="sum")
        hess = checked_output_hessian(self.task, detached, batch)  # [B, O, O]
        evals, evecs = torch.linalg.eigh(hess)
        root = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # root rootᵀ = PSD part of the Hessian
        noise = torch.randn(detached.shape, generator=gen, dtype=detached.dtype).to(detached.device)
        v = torch.einsum("bij,bj->bi", root, noise)
        return (outputs * v).sum()


def _make_kronfluence_task(
    task: AttributionTask, modules: list[str], sampler: _FisherSampler
) -> Any:
    """Our task as a ``kronfluence.task.Task`` with summed losses over the tracked ``modules``."""
    Task = library_module("kronfluence.task", "ekfac").Task
    class _Adapter(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            if not sample:
                return task.per_example_loss(model, batch).sum()
            return sampler(task.outputs(model, batch), batch)

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            return task.measurement(model, batch).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return list(modules)

    return _Adapter()


@dataclass(frozen=True)
class KronfluenceConfig(EstimatorConfig):
    """Settings of the kronfluence estimators.

    Args:
        damping: ``λ`` added to the example-averaged curvature of every layer; ``None``: kronfluence's
            heuristic, ``0.1 ×`` the mean eigenvalue of each layer's block.
        fisher: ``"sampled"`` (labels drawn from the model, seeded by ``seed``: Gauss-Newton in
            expectation) or ``"empirical"`` (true labels).
        seed: seed of the sampled labels.
        batch_size: examples per batch for factors and scores.
        output_dir: keep kronfluence's files in a new subdirectory of this folder (``None``: a private
            temporary directory, removed when the estimator is refitted or garbage-collected).
        progress: show kronfluence's progress bars.
        params: parameter or module names to attribute over (only ``nn.Linear`` / ``nn.Conv2d`` layers).
    """

    damping: float | None = None
    fisher: Literal["sampled", "empirical"] = "sampled"
    seed: int = 0
    batch_size: int = 128
    output_dir: str | Path | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._number("damping", optional=True)
        self._choice("fisher", FISHERS)
        self._integer("seed", minimum=0)
        self._integer("batch_size")
        self._flag("progress")


class _Kronfluence(Estimator):
    """Influence through one kronfluence strategy (see the module docstring for the conventions);
    settings: :class:`KronfluenceConfig`."""

    strategy: ClassVar[str]
    config_class = KronfluenceConfig

    def __init__(self, config: KronfluenceConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._workdir = WorkDir()
        self._n_scores = 0

    # -- fitting ----------------------------------------------------------------------------------
    def _check(self, model: nn.Module, task: AttributionTask, train_dataset: Any, names: list[str]) -> None:
        kronfluence_tracked_modules(model, self.params)  # nothing trackable / a split layer: raise now

    def _fit(self) -> None:
        analyzer = library_module("kronfluence.analyzer", self.name)
        FactorArguments = library_module("kronfluence.arguments", self.name).FactorArguments  # noqa: N806

        self._workdir.release()
        modules, ignored = kronfluence_tracked_modules(self.model_, self.params)
        if ignored:
            warnings.warn(
                f"{self.label}: kronfluence tracks only nn.Linear and nn.Conv2d layers; these selected "
                f"parameters are ignored: {ignored}.",
                UserWarning,
                stacklevel=3,
            )
        device, dtype = model_device_dtype(self.model_)
        self._dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._cuda = device.type == "cuda"
        with library_errors(self.label, "kronfluence"):
            self._distributed = kronfluence_distributed(device, self.name)
        workdir = shared_workdir(self._workdir, self, self.name, self.config.output_dir, self._distributed)
        try:
            model_copy = copy.deepcopy(self.model_)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise ConfigurationError(f"{self.label}: the model cannot be deep-copied for kronfluence: {err}") from err
        kf_modules = modules
        if modules == [""]:  # the model is a single layer: kronfluence can only wrap submodules
            model_copy, kf_modules = nn.Sequential(model_copy), ["0"]
        sampler = _FisherSampler(self.task_, self.config.seed)
        kf_task = _make_kronfluence_task(self.task_, kf_modules, sampler)
        with library_errors(self.label, "kronfluence"), library_output("kronfluence"), \
                light_memory_release(device.type == "cuda"):
            prepared = analyzer.prepare_model(model_copy, kf_task)
            self._analyzer = analyzer.Analyzer(
                analysis_name="fimoda",
                model=prepared,
                task=kf_task,
                cpu=device.type == "cpu",
                disable_tqdm=not self.config.progress,
                output_dir=str(workdir),
                disable_model_save=True,
            )
            dt = self._dtype
            factor_args = FactorArguments(
                strategy=self.strategy,
                use_empirical_fisher=self.config.fisher == "empirical",
                covariance_max_examples=None,
                lambda_max_examples=None,
                activation_covariance_dtype=dt,
                gradient_covariance_dtype=dt,
                per_sample_gradient_dtype=dt,
                lambda_dtype=dt,
            )
            self._analyzer.fit_all_factors(
                factors_name="factors",
                dataset=self.train_dataset_,
                per_device_batch_size=self.config.batch_size,
                dataloader_kwargs=self._loader_kwargs(),
                factor_args=factor_args,
                overwrite_output_dir=True,
            )
        damping = self._damping_used()
        if isinstance(damping, dict) and kf_modules != modules:  # report the user's layer names
            damping = dict(zip(modules, damping.values()))
        sizes = dict(self.model_.named_parameters())
        self.info.update(tracked_modules=modules, ignored_parameters=ignored, damping=damping,
                         num_params=self.info["num_params"] - sum(sizes[n].numel() for n in ignored))

    def _loader_kwargs(self) -> Any:
        return library_module("kronfluence.utils.dataset", self.name).DataLoaderKwargs(collate_fn=self.task_.collate)

    def _damping_used(self) -> float | dict[str, float] | None:
        if self.strategy == "identity":
            return None
        if self.config.damping is not None:
            return float(self.config.damping)
        c = library_module("kronfluence.utils.constants", self.name)
        out: dict[str, float] = {}
        if self.strategy == "kfac":
            eig = self._analyzer.load_eigendecomposition("factors")
            for m, a in eig[c.ACTIVATION_EIGENVALUES_NAME].items():
                g = eig[c.GRADIENT_EIGENVALUES_NAME][m]
                out[m] = HEURISTIC_DAMPING_SCALE * float(a.double().mean() * g.double().mean())
        else:
            lam = self._analyzer.load_lambda_matrices("factors")
            for m, mat in lam[c.LAMBDA_MATRIX_NAME].items():
                count = lam[c.NUM_LAMBDA_PROCESSED][m].double()
                out[m] = HEURISTIC_DAMPING_SCALE * float((mat.double() / count).mean())
        return out

    # -- scoring ----------------------------------------------------------------------------------
    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        ScoreArguments = library_module("kronfluence.arguments", self.name).ScoreArguments  # noqa: N806
        if not self._workdir.exists():
            raise NotFittedError(f"{self.label}: kronfluence's factors are gone; fit the estimator again.")
        dt = self._dtype
        score_args = ScoreArguments(
            damping_factor=None if self.config.damping is None else float(self.config.damping),
            per_sample_gradient_dtype=dt,
            precondition_dtype=dt,
            score_dtype=dt,
            query_gradient_svd_dtype=dt,
        )
        self._n_scores += 1
        name = f"scores{self._n_scores}"
        with library_errors(self.label, "kronfluence"), library_output("kronfluence"), \
                light_memory_release(self._cuda):
            self._analyzer.compute_pairwise_scores(
                scores_name=name,
                factors_name="factors",
                query_dataset=test_dataset,
                train_dataset=self.train_dataset_,
                per_device_query_batch_size=self.config.batch_size,
                per_device_train_batch_size=self.config.batch_size,
                query_indices=test_indices.tolist(),
                train_indices=self.train_indices_.tolist(),
                dataloader_kwargs=self._loader_kwargs(),
                score_args=score_args,
                overwrite_output_dir=True,
            )
        raw = self._read_scores(name)
        if raw is None:
            raise RuntimeError(f"{self.label}: kronfluence produced no pairwise scores.")
        return raw / len(self.train_dataset_)

    def _read_scores(self, name: str) -> Tensor | None:
        """The pairwise scores kronfluence saved (read by rank 0 and sent to every rank when distributed)."""
        raw = None
        if not self._distributed or rank_and_world()[0] == 0:
            loaded = self._analyzer.load_pairwise_scores(name)
            raw = None if loaded is None else loaded["all_modules"].detach().to("cpu", copy=True)
            if self.config.output_dir is None:
                shutil.rmtree(self._analyzer.scores_output_dir(name), ignore_errors=True)
        return broadcast_from_zero(raw) if self._distributed else raw


@register_estimator("ekfac")
class EKFAC(_Kronfluence):
    """EK-FAC influence (kronfluence): K-FAC eigenbases with per-entry corrected eigenvalues."""

    strategy = "ekfac"


@register_estimator("kfac")
class KFAC(_Kronfluence):
    """K-FAC influence (kronfluence): per-layer Kronecker factors ``A ⊗ G``."""

    strategy = "kfac"


@register_estimator("diagonal")
class DiagonalFisher(_Kronfluence):
    """Diagonal influence (kronfluence): the diagonal of the per-layer curvature."""

    strategy = "diagonal"


class KronfluenceIdentity(_Kronfluence):
    """kronfluence's ``identity`` strategy (no curvature): ``grad_dot / n``. A check, not registered."""

    name = "kronfluence_identity"
    strategy = "identity"
