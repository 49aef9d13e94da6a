"""``RetrainingLoop``: leave-one-out re-training from scratch, on the further-training machinery.

Re-training (the training-algorithm-available gold standard the paper contrasts further training
with, its Appendix E.1 "Comparison to re-training") starts every run from the model's **initial**
weights ``θ₀`` — the weights before the original training — and repeats the original recipe
(optimizer, lr, epochs, batch size) without ``z_j``. For every seed ``s`` (the sample order, as in
further training) and ``j ∈ J``: ``loo[s, c, t, j] = f(x_t; A(D \\ z_j, θ₀))`` after checkpoint ``c``.

Everything except the starting point is :class:`~lightning_fimoda.FurtherTrainingLoop`: the same
schedule, engines (all LOO runs of a seed at once), checks, run directory and
:class:`~lightning_fimoda.GoldStandard`. The differences:

- the runs start from ``θ₀``: ``initial_weights`` (a state dict or a module of the same architecture)
  or, with ``init_seed``, the architecture re-initialised by every module's ``reset_parameters()`` in
  module order under ``torch.manual_seed(init_seed)``, in float32 on the CPU as a module is constructed
  (for the zoo's models exactly their ``seed=`` initialisation, whatever the model's dtype and device);
  the final weights passed to :meth:`run` only give the architecture;
- ``leave_out`` defaults to ``"drop"`` (``z_j`` removed: true LOO re-training); ``"subtract"`` works too;
- the job's fingerprint carries ``kind = "retraining"`` (and ``init_seed``), so a run directory holds
  one kind of job only: re-training and further training of the same model never mix.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigurationError, MismatchError
from .config import FurtherTrainingConfig
from .loop import FurtherTrainingLoop
from .plan import TrainingPlan

__all__ = ["KIND", "RetrainingConfig", "RetrainingLoop", "reinitialise"]

KIND = "retraining"
SETTINGS = tuple(f.name for f in fields(FurtherTrainingConfig)) + ("init_seed",)


@dataclass(frozen=True, kw_only=True)
class RetrainingConfig(FurtherTrainingConfig):
    """A :class:`FurtherTrainingConfig` for re-training from scratch: the original training recipe.

    Attributes (beyond the further-training ones, which now describe the *original* training):
        leave_out: default ``"drop"`` (``z_j`` removed from every epoch).
        init_seed: re-initialise the architecture with this seed (see the module docstring); ``None``:
            the loop is given ``initial_weights`` instead.
    """

    leave_out: str = "drop"
    init_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        seed = self.init_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigurationError(f"init_seed must be None or a non-negative integer, got {seed!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The further-training settings plus ``kind = "retraining"`` and ``init_seed``."""
        return {**super().to_dict(), "kind": KIND, "init_seed": self.init_seed}


class RetrainingLoop(FurtherTrainingLoop):
    """Leave-one-out re-training from the initial weights with the original recipe (module docstring).

    Args:
        task: as :class:`~lightning_fimoda.FurtherTrainingLoop`.
        initial_weights: ``θ₀`` as a state dict (every parameter and buffer of the model) or a module
            of the model's architecture; give it or ``init_seed``, not both.
        config: a :class:`RetrainingConfig`; or give its settings as keywords (the further-training
            settings and ``init_seed``).
        **options: the further-training loop's other arguments (``run_dir``, ``run_root``, ``progress``,
            ``engine``, ``chunk_size``, ``memory_budget``).

    Example::

        loop = RetrainingLoop(SupervisedTask("mse"), init_seed=0, lr=0.3, epochs=1000, batch_size=128,
                              seeds=5, run_dir="runs/retrain")
        gold = loop.run(final_model, train, test, loo_indices=loo)  # only its architecture is used
        gold.scores("mean")  # [epochs, n_test, m]; positive = z_j helps f(x)
    """

    config: RetrainingConfig

    config_class = RetrainingConfig

    def __init__(
        self,
        task: Any = None,
        *,
        initial_weights: Mapping[str, Tensor] | nn.Module | None = None,
        config: RetrainingConfig | None = None,
        **options: Any,
    ) -> None:
        config = self.resolve_config(config, {k: options.pop(k) for k in list(options) if k in SETTINGS})
        if (initial_weights is None) == (config.init_seed is None):
            raise ConfigurationError(
                "RetrainingLoop needs the weights before the original training: give exactly one of "
                "initial_weights= (a state dict or a module) and init_seed= (re-initialise the architecture)."
            )
        if initial_weights is not None and not isinstance(initial_weights, (Mapping, nn.Module)):
            raise TypeError(f"initial_weights must be a state dict or an nn.Module, got {type(initial_weights).__name__}.")
        super().__init__(task, config=config, **options)
        self.initial_weights = initial_weights

    def initial_model(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the initial weights ``θ₀`` (``model`` itself is not changed)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if self.config.init_seed is not None:
            return reinitialise(model, self.config.init_seed)
        state = self.initial_weights
        if isinstance(state, nn.Module):
            state = state.state_dict()
        net = copy.deepcopy(model)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise MismatchError(f"initial_weights do not fit the model's architecture: {err}") from err
        return net

    def plan(self, model: nn.Module, train_dataset: Any, test_dataset: Any, loo_indices: Sequence[int] | Tensor,
             test_indices: Sequence[int] | Tensor | None = None) -> TrainingPlan:
        """The job of re-training from ``θ₀`` (fingerprint with ``kind = "retraining"``); trains nothing."""
        plan = super().plan(self.initial_model(model), train_dataset, test_dataset, loo_indices, test_indices)
        return dataclasses.replace(plan, fingerprint={**plan.fingerprint, "kind": KIND})

    def __repr__(self) -> str:
        return super().__repr__().replace("FurtherTrainingLoop", "RetrainingLoop", 1)


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` re-initialised: ``reset_parameters()`` of every module in module order under
    ``torch.manual_seed(seed)``, in float32 on the CPU (as modules are constructed), then cast to the
    dtypes and devices of ``model``'s tensors (the draws do not depend on them).

    Raises :class:`ConfigurationError` naming modules that hold parameters but have no
    ``reset_parameters()`` (give ``initial_weights`` for such models).
    """
    missing = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False)) and not callable(getattr(m, "reset_parameters", None))
    ]
    if missing:
        raise ConfigurationError(
            f"init_seed cannot re-initialise modules without reset_parameters(): {missing}; give initial_weights."
        )
    fresh = copy.deepcopy(model).cpu().float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    net = copy.deepcopy(model)
    net.load_state_dict(fresh.state_dict())  # copies into net's tensors: their dtypes and devices
    return net
