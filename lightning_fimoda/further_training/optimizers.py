"""Functional optimizers over stacked parameters ``{name: [K, *shape]}``, matching ``torch.optim``.

:class:`StackedOptimizer` is the further-training optimizer ``A'`` of a config (SPEC §2). It builds the
``torch.optim`` optimizer for the sequential path and runs the same update functionally for ``K``
models at once in the vectorised engine: SGD (optional momentum, dampening 0) with the exact operation
order of ``torch.optim``'s single-tensor implementation; Adam (L2 weight decay added to the gradient)
and AdamW (decoupled decay ``θ ← θ (1 − lr·wd)``) with ``torch.optim``'s fused kernel
(``torch._fused_adam_`` / ``torch._fused_adamw_``: one pass over parameters, gradients and moments
instead of nine; equal to the single-tensor update up to rounding). Gradient clipping is per model
(global norm over all its parameters, as ``torch.nn.utils.clip_grad_norm_``) and applied before the
update.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import FurtherTrainingConfig

__all__ = ["StackedOptimizer", "clip_grad_norm"]

Stacked = dict[str, Tensor]


class StackedOptimizer:
    """The optimizer of a :class:`FurtherTrainingConfig`: ``torch.optim`` for one model, or the same
    update run functionally for ``K`` stacked models (hyperparameters validated by the config)."""

    def __init__(self, config: FurtherTrainingConfig) -> None:
        self.name, self.lr = config.optimizer, config.lr
        self.weight_decay, self.momentum = config.weight_decay, config.momentum
        self.betas, self.eps = tuple(config.betas), config.eps

    # -- the reference: torch.optim -----------------------------------------------------------
    def torch_optimizer(self, params: Iterable[Tensor]) -> torch.optim.Optimizer:
        """The equivalent ``torch.optim`` optimizer (used by the sequential path)."""
        params = list(params)
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    # -- functional, stacked ------------------------------------------------------------------
    def init(self, params: Stacked) -> dict[str, Stacked | Tensor]:
        """Fresh optimizer state for stacked parameters ``[K, ...]`` (per-model step counters ``[K]``)."""
        first = next(iter(params.values()))
        k = first.shape[0]
        state: dict[str, Stacked | Tensor] = {}
        if self.name == "sgd":
            if self.momentum:
                state["buf"] = {n: torch.zeros_like(p) for n, p in params.items()}
        else:
            state["exp_avg"] = {n: torch.zeros_like(p) for n, p in params.items()}
            state["exp_avg_sq"] = {n: torch.zeros_like(p) for n, p in params.items()}
            state["step"] = torch.zeros(k, dtype=torch.float64, device=first.device)
        return state

    def step(self, params: Stacked, grads: Stacked, state: dict, active: Tensor | None = None) -> Stacked:
        """One update of every model (in place on ``params`` and ``state``); returns ``params``.

        ``active`` (bool ``[K]``) marks the models that take this step; the others keep their
        parameters and optimizer state (a ``drop`` run whose epoch has one batch fewer).
        """
        if active is not None and bool(active.all()):
            active = None
        if self.name != "sgd":
            self._adam(params, grads, state, active)
            return params
        old = None
        if active is not None:
            old = ({n: p.clone() for n, p in params.items()}, _clone_state(state))
        self._sgd(params, grads, state)
        if old is not None:
            _restore_inactive(params, state, old, active)
        return params

    def _sgd(self, params: Stacked, grads: Stacked, state: dict) -> None:
        for n, p in params.items():
            d_p = grads[n]
            if self.weight_decay:
                d_p = d_p.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = state["buf"][n]
                buf.mul_(self.momentum).add_(d_p)  # first step: 0·μ + g = g, as torch's clone
                d_p = buf
            p.add_(d_p, alpha=-self.lr)

    def _adam(self, params: Stacked, grads: Stacked, state: dict, active: Tensor | None) -> None:
        """``torch.optim``'s fused Adam/AdamW kernel over the stacked tensors (one call, one pass), or
        over per-model views of the ``active`` models when step counts differ or some models sit out."""
        step = state["step"]
        if active is None:
            step += 1
        else:
            step += active.to(step.dtype)
        # the fused kernel walks each tensor's memory in order: all four must share one (contiguous) layout
        grads = {n: g.contiguous() for n, g in grads.items()}
        tensors = (params, grads, state["exp_avg"], state["exp_avg_sq"])
        steps32 = step.float()  # the kernel's step type (torch.optim's fused state)
        if active is None and bool((step == step[0]).all()):
            lists = [list(t.values()) for t in tensors]
            steps = [steps32[:1]] * len(params)
        else:
            keep = range(step.numel()) if active is None else active.nonzero().flatten().tolist()
            lists = [_models(t, keep) for t in tensors]
            per_model = steps32.unbind(0)
            steps = [per_model[k] for _ in params for k in keep]
        fused = torch._fused_adamw_ if self.name == "adamw" else torch._fused_adam_
        beta1, beta2 = self.betas
        fused(*lists, [], steps, amsgrad=False, lr=self.lr, beta1=beta1, beta2=beta2,
              weight_decay=self.weight_decay, eps=self.eps, maximize=False)


def clip_grad_norm(grads: Stacked, max_norm: float) -> Stacked:
    """Scale each model's gradient to global norm ``<= max_norm`` as ``clip_grad_norm_`` does.

    ``norm_k = ‖(‖g_{k,1}‖, ‖g_{k,2}‖, ...)‖`` over the parameters of model ``k``;
    ``g_k ← g_k · min(1, max_norm / (norm_k + 1e-6))``.
    """
    norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads.values()], dim=1)
    total = norms.norm(dim=1)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return {n: g * coef.view((-1,) + (1,) * (g.dim() - 1)) for n, g in grads.items()}


def _models(stacked: Stacked, keep: Iterable[int]) -> list[Tensor]:
    """Per-model views ``[p[k] for p in stacked, for k in keep]``."""
    out: list[Tensor] = []
    for p in stacked.values():
        views = p.unbind(0)
        out += [views[k] for k in keep]
    return out


def _clone_state(state: dict) -> dict:
    return {
        k: ({n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v.clone())
        for k, v in state.items()
    }


def _restore_inactive(params: Stacked, state: dict, old: tuple, active: Tensor) -> None:
    old_params, old_state = old

    def keep(new: Tensor, prev: Tensor) -> None:
        mask = active.view((-1,) + (1,) * (new.dim() - 1))
        new.copy_(torch.where(mask, new, prev))

    for n, p in params.items():
        keep(p, old_params[n])
    for k, v in state.items():
        if isinstance(v, dict):
            for n, t in v.items():
                keep(t, old_state[k][n])
        else:
            keep(v, old_state[k])
