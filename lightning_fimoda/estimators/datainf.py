"""DataInf (SPEC §3): a layer-wise closed form of the damped influence function.

For layer ``l`` (the parameters of one module, :meth:`PerSampleGradients.layer_slices`) with
per-example training gradients ``g_{il}`` over the ``n`` examples of the training dataset,

    ``λ_l = c · mean_i mean(g_{il}²)``,
    ``τ(j, x) = Σ_l (1/λ_l) [ g_{xl}·g_{jl} − (1/n) Σ_i (g_{xl}·g_{il})(g_{il}·g_{jl}) / (λ_l + ‖g_{il}‖²) ]``.

Positive = helpful (SPEC §1). Rewritten as ``τ(j, x) = g_x · k_j`` with the training-side vector

    ``k_{jl} = (1/λ_l) [ g_{jl} − (1/n) Σ_i w_{il} (g_{il}·g_{jl}) g_{il} ]``, ``w_{il} = 1/(λ_l + ‖g_{il}‖²)``,

computed once per fit with matrix products over all training examples (no loop over them), so
scoring is one ``[T, P] × [P, N]`` product.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..exceptions import ConfigurationError
from ..gradients import per_sample_gradients
from ..registry import register_estimator
from .base import Estimator
from .config import EstimatorConfig

__all__ = ["DataInf", "DataInfConfig"]


@dataclass(frozen=True)
class DataInfConfig(EstimatorConfig):
    """Args:
    damping_scale: ``c`` (0.1 by default, SPEC §3).
    chunk_size: training examples per chunk when the sums over the training set need gradients of
        examples that are not scored (they are then streamed twice, never all held at once).
    """

    damping_scale: float = 0.1
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        self._number("damping_scale", strict=True)
        self._integer("chunk_size")


@register_estimator("datainf")
class DataInf(Estimator):
    """DataInf with per-layer damping ``λ_l = damping_scale · (mean squared gradient entry of l)``.

    Settings: :class:`DataInfConfig`. ``info["damping"]`` reports ``λ_l`` per layer.
    """

    config_class = DataInfConfig

    def _fit(self) -> None:
        c = self.config.damping_scale
        scored = self.train_gradients()
        layers = scored.layer_slices()
        n = len(self.train_dataset_)
        sums = {name: 0.0 for name in layers}
        for chunk in self._training_set_gradients():
            for name, sl in layers.items():
                sums[name] += chunk[:, sl].pow(2).sum().item()
        lam = {name: c * sums[name] / (n * (sl.stop - sl.start)) for name, sl in layers.items()}
        if any(v <= 0 for v in lam.values()):
            zero = [name for name, v in lam.items() if v <= 0]
            raise ConfigurationError(f"{self.label}: the training gradients of layer(s) {zero} are all zero.")
        g_j = scored.flat
        correction = torch.zeros_like(g_j)
        for chunk in self._training_set_gradients():
            for name, sl in layers.items():
                g_i = chunk[:, sl]  # [c, P_l]
                w = 1.0 / (lam[name] + g_i.pow(2).sum(dim=1))  # [c]
                correction[:, sl] += ((g_j[:, sl] @ g_i.T) * w) @ g_i  # Σ_i w_i (g_il·g_jl) g_il
        keys = torch.empty_like(g_j)
        for name, sl in layers.items():
            keys[:, sl] = (g_j[:, sl] - correction[:, sl] / n) / lam[name]
        self._keys = keys
        self.info["damping"] = lam

    def _training_set_gradients(self) -> Iterator[Tensor]:
        """Per-sample loss gradients of every training example, in chunks ``[c, P]``."""
        n = len(self.train_dataset_)
        if self.train_indices_.numel() == n:  # scored set = training set (indices are unique)
            yield self.train_gradients().flat
            return
        chunk = self.config.chunk_size
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(n, start + chunk))
            yield per_sample_gradients(
                self.model_, self.task_, self.train_dataset_, idx, kind="loss", params=self.params,
                memory_budget=self.cache_.memory_budget,
            ).flat

    def _score(self, test_dataset: Any, test_indices: Tensor) -> Tensor:
        return self.test_gradients(test_dataset, test_indices).flat @ self._keys.T
