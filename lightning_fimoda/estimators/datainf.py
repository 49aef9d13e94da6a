"""DataInf (SPEC §3): a layer-wise closed form of the damped influence function.

For layer ``l`` (the parameters of one module, :meth:`PerSampleGradients.layer_slices`) with
per-example training gradients ``g_{il}`` over the ``n`` examples of the training dataset,

    ``λ_l = c · mean_i mean(g_{il}²)``,
    ``τ(j, x) = Σ_l (1/λ_l) [ g_{xl}·g_{jl} − (1/n) Σ_i (g_{xl}·g_{il})(g_{il}·g_{jl}) / (λ_l + ‖g_{il}‖²) ]``.

Positive = helpful (SPEC §1). Rewritten as ``τ(j, x) = k_x · g_j`` with the test-side vector

    ``k_{xl} = (1/λ_l) [ g_{xl} − (1/n) Σ_i w_{il} (g_{il}·g_{xl}) g_{il} ]``, ``w_{il} = 1/(λ_l + ‖g_{il}‖²)``,

so the test gradients ``[T, P]`` are held in memory while the training gradients stream past them in
chunks (one pass for ``λ_l`` at fit, one for the sum over ``i`` and one for the scores at score time;
the last two are one stream when every training example is scored): memory stays within the gradient
cache's budget, whatever ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..exceptions import ConfigurationError
from ..gradients import streamed_layer_accumulate, streamed_layer_mean_square, streamed_products
from ..registry import register_estimator
from .base import Estimator
from .config import EstimatorConfig

__all__ = ["DataInf", "DataInfConfig"]


@dataclass(frozen=True)
class DataInfConfig(EstimatorConfig):
    """Args:
    damping_scale: ``c`` (0.1 by default, SPEC §3).
    chunk_size: accepted for compatibility and ignored: the training gradients stream in chunks
        sized by the gradient cache's memory budget.
    projection_dim: must stay ``None``: DataInf's damping and correction are per layer, and a random
        projection mixes the layers (select layers with ``params=`` instead).
    """

    damping_scale: float = 0.1
    chunk_size: int = 4096
    projection_dim: None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._number("damping_scale", strict=True)
        self._integer("chunk_size")
        if self.projection_dim is not None:
            self._fail(
                f"projection_dim={self.projection_dim!r} is not supported: DataInf's damping and correction are "
                "per layer and a random projection mixes the layers. Select layers with params=, or use "
                "grad_dot / grad_cos with projection_dim."
            )


@register_estimator("datainf")
class DataInf(Estimator):
    """DataInf with per-layer damping ``λ_l = damping_scale · (mean squared gradient entry of l)``.

    Settings: :class:`DataInfConfig`. ``info["damping"]`` reports ``λ_l`` per layer.
    """

    config_class = DataInfConfig

    def _fit(self) -> None:
        c = self.config.damping_scale
        self._train = self.train_stream()
        n = len(self.train_dataset_)
        everything = self.train_indices_.numel() == n  # scored set = training set (indices are unique)
        self._all = self._train if everything else self.train_stream(torch.arange(n), what="training (all)")
        lam = {name: c * v for name, v in streamed_layer_mean_square(self._all).items()}
        if any(v <= 0 for v in lam.values()):
            zero = [name for name, v in lam.items() if v <= 0]
            raise ConfigurationError(f"{self.label}: the training gradients of layer(s) {zero} are all zero.")
        self._damping = lam
        self.info["damping"] = lam

    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        g_x = self.test_matrix(test_dataset, test_indices)  # [T, P]
        correction = streamed_layer_accumulate(self._all, g_x, self._damping)  # Σ_i w_il (g_il·g_xl) g_il
        keys = torch.empty_like(g_x)
        for name, sl in self._all.layer_slices().items():
            keys[:, sl] = (g_x[:, sl] - correction[:, sl] / self._all.n) / self._damping[name]
        del correction
        return streamed_products(self._train, keys.T).T
