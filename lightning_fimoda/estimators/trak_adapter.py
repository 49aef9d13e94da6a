"""TRAK with a single checkpoint (M = 1) through traker (SPEC §3), registered as ``trak``.

**What is computed.** With ``F`` the *model output function* of the training examples, ``φ_i = Pᵀ∇F_i
/ √p`` their projected gradients (``P``: ``p × k`` random projection; none when ``proj_dim=None``),
``Q_i = ∂ℓ_i/∂F_i`` the out-to-loss derivative and ``φ_x = Pᵀ∇f(x) / √p`` the projected gradient of
our measurement ``f`` (the test loss by default),

    τ(j, x) = (1/h) · Q_j φ_jᵀ (ΦᵀΦ + λ_reg I)^{-1} φ_x,

with positive = helpful (SPEC §1; checked by leave-one-out tests). ``Φ`` holds the features of the
whole training dataset given to ``fit`` (``n`` examples); scores cover ``train_indices``. Model output
functions:

- ``"prediction"`` (regression; scalar outputs): ``F = o``, ``Q = ∂ℓ/∂o`` (``2(o − y)`` for our MSE),
  so ``Q_j ∇F_j = g_j``; ``h`` = the mean ``∂²ℓ/∂o²`` over the training set (``2`` for MSE).
- ``"margin"`` (softmax cross-entropy): ``F = m = o_y − logsumexp_{c≠y} o_c``, and since
  ``ℓ = log(1 + e^{−m})``, ``Q = −(1 − p_y)`` (again ``Q_j ∇F_j = g_j``); ``h = 1``.

**Relation to the Gauss-Newton influence function.** Without projection this equals
``(1/n) g_jᵀ (H_T + λI)^{-1} g_x`` with ``H_T = (h/n) Σ_i ∇F_i ∇F_iᵀ`` and
``λ_reg = n λ / (h p)``. For MSE regression ``H_T`` *is* the Gauss-Newton matrix of SPEC §3, so TRAK
without projection reproduces the explicit GN influence function, scale included. traker's projector
is unnormalised (``E[P Pᵀ] = k I`` for Gaussian or Rademacher entries), which divides the effective
damping by ``k``: we set ``λ_reg = k n λ / (h p)``. With a projection the result approximates the
above (Johnson-Lindenstrauss), and for classification ``H_T`` is TRAK's own curvature (the margin
Hessian ``p(1 − p)`` replaced by 1); in those cases read the overall scale as arbitrary, as TRAK's
always is, and compare directions.

``damping=None`` uses ``λ = 0.1 ×`` the mean eigenvalue of ``H_T`` (estimated from the projected
features: ``E‖Pᵀv‖² = k‖v‖²``). Alternatively give traker's ``lambda_reg`` directly. The values used
are reported in :attr:`info`. traker computes in float32 (``use_half_precision=False``; float16 only on
request and never on CPU), whatever the model's dtype.

**Traps handled.** The device is passed as a string (``"cpu"``; a ``torch.device`` sends traker to its
CUDA kernel); the CPU projector is built by us with at least two blocks (traker's default frees a
single-block projection matrix in ``finalize_features`` and then fails to score); traker's centring of
``(ΦᵀΦ)^{-1}`` by its mean absolute entry (meant for float16) is left out so that the scale above
holds; every fit works in a fresh directory (traker silently reuses features found in ``save_dir``);
the scores memory map is copied before the directory is removed; the model is deep-copied
(``load_checkpoint`` changes its mode); traker's progress bars follow ``progress`` and its
``logging.basicConfig()`` is undone.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._data import iter_batches, load_batch, model_device_dtype
from .._files import WorkDir
from .._quiet import library_output
from ..exceptions import ConfigurationError, NotFittedError
from ..functional import FunctionalTask, eval_mode
from ..registry import register_estimator
from ..task import AttributionTask, SupervisedTask
from ._library import library_errors, library_module
from .base import Estimator
from .config import EstimatorConfig

__all__ = ["TRAK", "TRAKConfig"]

MODEL_OUTPUTS = ("auto", "prediction", "margin")
PROJECTORS = ("auto", "basic", "cuda")
DEFAULT_DAMPING_SCALE = 0.1  # λ = 0.1 × mean eigenvalue of TRAK's curvature when damping=None
BASIC_BLOCK_SIZE = 100  # traker's BasicProjector default block size


class _ModelOutput:
    """traker model output (duck-typed ``AbstractModelOutput``, so that traker is imported only when
    fitting) built from our task: ``F`` on training examples, ``f`` on targets.

    traker calls :meth:`get_output` per example inside ``vmap`` with the batch's tensor leaves
    unbatched; the batch structure (and non-tensor leaves) are set by :meth:`use_batch` first.
    """

    def __init__(self, fn: FunctionalTask, kind: str) -> None:
        self.fn = fn
        self.kind = kind
        self.mode = "train"  # "train": F (prediction / margin); "target": our measurement f
        self._spec: Any = None
        self._static: list[Any] = []
        self._is_tensor: list[bool] = []
        self.curvature_sum = 0.0  # Σ_j ∂²ℓ_j/∂F_j² over featurized examples ("prediction")

    def use_batch(self, batch: Any) -> tuple[Tensor, ...]:
        leaves, self._spec = tree_flatten(batch)
        self._is_tensor = [isinstance(leaf, Tensor) for leaf in leaves]
        self._static = [None if t else leaf for leaf, t in zip(leaves, self._is_tensor)]
        return tuple(leaf for leaf, t in zip(leaves, self._is_tensor) if t)

    def _rebuild(self, tensors: Sequence[Tensor], unsqueeze: bool) -> Any:
        it = iter(tensors)
        leaves = [
            (next(it).unsqueeze(0) if unsqueeze else next(it)) if t else s
            for t, s in zip(self._is_tensor, self._static)
        ]
        return tree_unflatten(leaves, self._spec)

    def _params(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: weights[n] for n in self.fn.names}

    def get_output(self, model: Any, weights: dict[str, Tensor], buffers: Any, *tensors: Tensor) -> Tensor:
        batch = self._rebuild(tensors, unsqueeze=True)
        params = self._params(weights)
        if self.mode == "target":
            return self.fn.measurement(params, batch).sum()
        if self.kind == "prediction":
            return self.fn.outputs(params, batch).sum()
        return self.fn.call("model_output", params, batch).sum()

    def get_out_to_loss_grad(self, model: Any, weights: dict[str, Tensor], buffers: Any, batch: Any) -> Tensor:
        real = self._rebuild(batch, unsqueeze=False)
        params = self._params(weights)
        detached = {n: p.detach() for n, p in params.items()}
        with torch.no_grad():
            if self.kind == "margin":  # ℓ = log(1 + e^(-m)): ∂ℓ/∂m = −σ(−m)
                return -torch.sigmoid(-self.fn.call("model_output", detached, real)).unsqueeze(1)
            outputs = self.fn.outputs(detached, real)
        with torch.enable_grad():
            out = outputs.clone().requires_grad_(True)
            q = torch.autograd.grad(self.fn.task.loss_from_outputs(out, real).sum(), out, create_graph=True)[0]
            h = torch.autograd.grad(q.sum(), out)[0]
        self.curvature_sum += float(h.sum())
        return q.detach()


def _score_computer_class() -> type:
    BasicScoreComputer = library_module("trak.score_computers", "trak").BasicScoreComputer  # noqa: N806

    class _UncenteredScoreComputer(BasicScoreComputer):
        """traker's score computer without the rescaling of ``(ΦᵀΦ + λ_reg I)^{-1}``; solve in float64."""

        def get_x_xtx_inv(self, grads: Tensor, xtx: Tensor) -> Tensor:
            reg = xtx.double() + self.lambda_reg * torch.eye(xtx.shape[0], dtype=torch.float64, device=xtx.device)
            inv = torch.linalg.inv(reg)
            out = torch.empty(grads.shape[0], xtx.shape[1], dtype=self.dtype, device=self.device)
            for start in range(0, grads.shape[0], self.CUDA_MAX_DIM_SIZE):
                block = grads[start : start + self.CUDA_MAX_DIM_SIZE].to(self.device, torch.float64)
                out[start : start + block.shape[0]] = (block @ inv).to(self.dtype)
            return out

    return _UncenteredScoreComputer


@contextlib.contextmanager
def _traker_progress(progress: bool) -> Iterator[None]:
    """traker's module-level ``tqdm`` bars follow our ``progress`` switch."""
    module = library_module("trak.traker", "trak")

    original = module.tqdm
    module.tqdm = functools.partial(original, disable=not progress)
    try:
        yield
    finally:
        module.tqdm = original


@dataclass(frozen=True)
class TRAKConfig(EstimatorConfig):
    """Settings of :class:`TRAK`.

    Args:
        proj_dim: projection dimension ``k`` (``None``: no projection, exact gradients).
        projector: ``"auto"`` (traker's CUDA projector when the model is on a GPU and ``fast_jl`` is
            installed, else the block-wise basic projector), ``"basic"`` or ``"cuda"``.
        projector_seed: seed of the random projection.
        damping: ``λ`` in the units of the influence function (converted to traker's ``lambda_reg``);
            ``None``: ``0.1 ×`` the mean eigenvalue of TRAK's curvature.
        lambda_reg: traker's ridge term on ``ΦᵀΦ``, instead of ``damping``.
        model_output: ``"prediction"`` (scalar regression outputs), ``"margin"`` (the task's
            :meth:`~lightning_fimoda.AttributionTask.model_output`, a softmax margin, with
            ``ℓ = log(1 + e^(−m))``) or ``"auto"`` (:class:`~lightning_fimoda.SupervisedTask`: margin for
            cross-entropy, else prediction; other tasks: margin when they give several outputs).
        batch_size: examples per featurize / score call.
        half_precision: traker's float16 storage (GPU only).
        output_dir: keep traker's files in a new subdirectory of this folder (``None``: a private
            temporary directory, removed when the estimator is refitted or garbage-collected).
        progress: show traker's progress bars.
    """

    proj_dim: int | None = 2048
    projector: Literal["auto", "basic", "cuda"] = "auto"
    projector_seed: int = 0
    damping: float | None = None
    lambda_reg: float | None = None
    model_output: Literal["auto", "prediction", "margin"] = "auto"
    batch_size: int = 128
    half_precision: bool = False
    output_dir: str | Path | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._integer("proj_dim", minimum=2, optional=True)
        self._choice("projector", PROJECTORS)
        self._integer("projector_seed", minimum=0)
        if self.damping is not None and self.lambda_reg is not None:
            self._fail("give damping or lambda_reg, not both.")
        self._number("damping", optional=True)
        self._number("lambda_reg", optional=True)
        self._choice("model_output", MODEL_OUTPUTS)
        self._integer("batch_size")
        self._flag("half_precision")
        self._flag("progress")


@register_estimator("trak")
class TRAK(Estimator):
    """TRAK (M = 1) through traker; see the module docstring for formulas, scale and damping.
    Settings: :class:`TRAKConfig`."""

    config_class = TRAKConfig

    def __init__(self, config: TRAKConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._workdir = WorkDir()
        self._n_scores = 0

    def _check(self, model: nn.Module, task: AttributionTask, train_dataset: Any, names: list[str]) -> None:
        """Resolve the model output for the task on two training examples (a forward pass, no gradients)."""
        device, _ = model_device_dtype(model)
        if self.config.half_precision and device.type == "cpu":
            raise ConfigurationError("half_precision=True needs a GPU: traker cannot project float16 on CPU.")
        batch = load_batch(task, train_dataset, torch.arange(min(2, len(train_dataset))), device)
        with torch.no_grad(), eval_mode(model):
            outputs = task.outputs(model, batch)
            self._kind = self._resolve_model_output(task, outputs.shape[1])
            if self._kind == "margin" and not isinstance(task, SupervisedTask):
                try:
                    margins = task.model_output(model, batch)
                except NotImplementedError as err:
                    raise ConfigurationError(f"{self.label}: {err}") from None
                if tuple(margins.shape) != (outputs.shape[0],):
                    raise ConfigurationError(
                        f"{self.label}: {type(task).__name__}.model_output() returned shape "
                        f"{tuple(margins.shape)} for {outputs.shape[0]} examples; expected [B]."
                    )
        if self._kind == "prediction" and outputs.shape[1] != 1:
            raise ConfigurationError(
                f"{self.label}: model_output='prediction' needs one output per example, the model gives "
                f"{outputs.shape[1]}. For classification use SupervisedTask('cross_entropy') (margin)."
            )

    def _resolve_model_output(self, task: AttributionTask, num_outputs: int) -> str:
        supervised = isinstance(task, SupervisedTask)
        is_ce = supervised and task.loss == "cross_entropy"
        kind = self.config.model_output
        if kind == "auto":
            kind = "margin" if is_ce or (not supervised and num_outputs > 1) else "prediction"
        if kind == "margin" and supervised and not is_ce:
            raise ConfigurationError(
                f"{self.label}: model_output='margin' needs SupervisedTask('cross_entropy') (it reads the "
                f"labels and relies on ℓ = log(1 + e^(-margin))) or a task whose model_output() is a margin; "
                f"got {task!r}."
            )
        return kind

    # -- fitting ----------------------------------------------------------------------------------
    def _fit(self) -> None:
        TRAKer = library_module("trak", self.name).TRAKer  # noqa: N806
        self._workdir.release()
        device, _ = model_device_dtype(self.model_)
        self._device = device
        self._device_str = "cpu" if device.type == "cpu" else str(device)
        kind = self._kind
        try:
            model = copy.deepcopy(self.model_)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise ConfigurationError(f"{self.label}: the model cannot be deep-copied for traker: {err}") from err
        model.eval()
        fn = FunctionalTask(model, self.task_, self.params)
        self._out = _ModelOutput(fn, kind)
        n, p = len(self.train_dataset_), fn.num_params
        proj, scale = self._make_projector(model, p)
        workdir = self._workdir.new(self, "trak", self.config.output_dir)
        with library_errors(self.label, "traker"), library_output("trak"), _traker_progress(self.config.progress):
            self._traker = TRAKer(
                model=model,
                task=self._out,
                train_set_size=n,
                save_dir=str(workdir),
                load_from_save_dir=True,  # the directory is new and empty: nothing to reuse
                device=self._device_str,
                projector=proj,
                score_computer=_score_computer_class(),
                proj_dim=proj.proj_dim if proj.proj_dim else p,
                logging_level=logging.WARNING,
                use_half_precision=self.config.half_precision,
                projector_seed=self.config.projector_seed,
                grad_wrt=list(fn.names),
                lambda_reg=0.0,
            )
            self._traker.load_checkpoint(model.state_dict(), model_id=0)
            for chunk, batch in iter_batches(self.task_, self.train_dataset_, torch.arange(n),
                                             self.config.batch_size, device):
                self._traker.featurize(batch=self._out.use_batch(batch), inds=chunk.numpy())
            h = self._out.curvature_sum / n if kind == "prediction" else 1.0
            if not h > 0:
                raise ConfigurationError(
                    f"{self.label}: the loss has mean curvature {h:.3g} <= 0 in the model output; TRAK's "
                    "Gauss-Newton form needs a loss that is convex in the output."
                )
            lam_reg, lam = self._damping(n, p, h, scale)
            self._traker.score_computer.lambda_reg = lam_reg
            self._traker.finalize_features(model_ids=[0])
        self._h = h
        self._model = model
        self.info |= {
            "model_output": kind,
            "damping": lam,
            "lambda_reg": lam_reg,
            "output_curvature": h,
            "projected_dim": proj.proj_dim if proj.proj_dim else p,
            "projector": type(proj).__name__,
        }

    def _make_projector(self, model: torch.nn.Module, p: int) -> tuple[Any, float]:
        """The projector and ``s = E‖Pᵀv‖²/‖v‖²`` (1 without projection, ``k`` otherwise)."""
        projectors = library_module("trak.projectors", self.name)
        BasicProjector, CudaProjector = projectors.BasicProjector, projectors.CudaProjector  # noqa: N806
        NoOpProjector, ProjectionType = projectors.NoOpProjector, projectors.ProjectionType  # noqa: N806
        if self.config.proj_dim is None:
            return NoOpProjector(device=self._device_str), 1.0
        k = self.config.proj_dim
        dtype = torch.float16 if self.config.half_precision else torch.float32
        use_cuda = self.config.projector == "cuda"
        if self.config.projector == "auto" and self._device.type == "cuda":
            try:
                import fast_jl  # noqa: F401

                use_cuda = True
            except ImportError:
                use_cuda = False
        if use_cuda:
            if self._device.type != "cuda":
                raise ConfigurationError("projector='cuda' needs the model on a CUDA device.")
            if k % 512:
                raise ConfigurationError(f"traker's CUDA projector needs proj_dim divisible by 512, got {k}.")
            proj = CudaProjector(grad_dim=p, proj_dim=k, seed=self.config.projector_seed,
                                 proj_type=ProjectionType.rademacher, device=self._device_str,
                                 max_batch_size=32)
            return proj, float(k)
        # at least two blocks: a single-block matrix is freed by finalize_features and never rebuilt
        block = min(BASIC_BLOCK_SIZE, math.ceil(k / 2))
        proj = BasicProjector(grad_dim=p, proj_dim=k, seed=self.config.projector_seed, proj_type=ProjectionType.normal,
                              device=self._device_str, block_size=block, dtype=dtype)
        return proj, float(k)

    def _damping(self, n: int, p: int, h: float, s: float) -> tuple[float, float]:
        """``(lambda_reg, λ)`` with ``λ_reg = s n λ / (h p)``."""
        if self.config.lambda_reg is not None:
            lam_reg = float(self.config.lambda_reg)
            return lam_reg, lam_reg * h * p / (s * n)
        if self.config.damping is not None:
            lam = float(self.config.damping)
            return s * n * lam / (h * p), lam
        grads = torch.as_tensor(np.asarray(self._traker.saver.current_store["grads"]), dtype=torch.float64)
        trace = float(grads.pow(2).sum())  # Σ‖φ_i‖², ≈ (s/p) Σ‖∇F_i‖²
        lam = DEFAULT_DAMPING_SCALE * h * trace / (n * s)  # 0.1 × trace(H_T) / p
        return s * n * lam / (h * p), lam

    # -- scoring ----------------------------------------------------------------------------------
    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        if not self._workdir.exists():
            raise NotFittedError(f"{self.label}: traker's features are gone; fit the estimator again.")
        self._n_scores += 1
        exp = f"scores{self._n_scores}"
        t = test_indices.numel()
        with library_errors(self.label, "traker"), library_output("trak"), _traker_progress(self.config.progress):
            self._out.mode = "target"
            try:
                self._traker.start_scoring_checkpoint(exp_name=exp, checkpoint=self._model.state_dict(),
                                                      model_id=0, num_targets=t)
                start = 0
                for chunk, batch in iter_batches(self.task_, test_dataset, test_indices, self.config.batch_size,
                                                 self._device):
                    self._traker.score(batch=self._out.use_batch(batch),
                                       inds=np.arange(start, start + chunk.numel()))
                    start += chunk.numel()
                scores = self._traker.finalize_scores(exp_name=exp, model_ids=[0])
            finally:
                self._out.mode = "train"
        raw = torch.from_numpy(np.array(scores, dtype=np.float64, copy=True))  # [n_train, n_test]
        del scores
        return raw[self.train_indices_].T / self._h
