"""Hand-written forward/backward for stacks of ``K`` MLPs: the engine's fast path on CPU.

For ``nn.Sequential`` models (or modules naming their ``nn.Sequential`` body in ``fimoda_sequential``) made of ``nn.Linear`` layers and elementwise activations (ReLU, LeakyReLU,
Tanh, Sigmoid, Identity; Dropout counts as identity in eval mode) with a :class:`SupervisedTask`, the
gradient of each member's weighted loss ``L_k = Σ_r w_{kr} ℓ(z_{kr}; θ_k)`` is computed with batched
matrix products (``torch.baddbmm`` / ``torch.bmm`` over the member axis) instead of ``vmap(grad)``:

    forward   z_l = a_{l−1} W_lᵀ + b_l,  a_l = σ(z_l)                     [K, R, width]
    backward  δ_L = w · ∂ℓ/∂o  (MSE: 2(o − y); cross-entropy: softmax(o) − onehot(y))
              ∇W_l = δ_lᵀ a_{l−1},  ∇b_l = Σ_r δ_l,  δ_{l−1} = (δ_l W_l) ⊙ σ'(z_{l−1})

The generic ``torch.func`` path stays the reference for every other model; both are tested against
the sequential ``torch.optim`` oracle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..task import AttributionTask, SupervisedTask

__all__ = ["MLPKernel"]

_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout)


class MLPKernel:
    """Batched loss gradients of ``K`` stacked copies of a supported MLP (see module docstring)."""

    def __init__(self, model: nn.Module, task: AttributionTask, example: Any = None) -> None:
        reason = self.unsupported(model, task, example)
        if reason:
            raise ValueError(f"The 'mlp' engine cannot run this model: {reason}. Use engine='vectorised'.")
        self.loss = task.loss
        self.unpack = task.unpack  # batch -> (x [.., d_in], y): the task's layout, not the engine's
        body, prefix = _sequential_body(model)
        self.layers: list[tuple[str, nn.Module]] = [(prefix + n, m) for n, m in body.named_children()]

    @staticmethod
    def unsupported(model: nn.Module, task: AttributionTask, example: Any = None) -> str | None:
        """Why the kernel cannot handle ``model`` + ``task`` (``None`` when it can).

        ``example``: a collated batch of training data, checked for ``(x [B, d], y)`` layout.
        """
        if type(task) is not SupervisedTask:
            return f"the task is {type(task).__name__}, not SupervisedTask"
        body, prefix = _sequential_body(model)
        if body is None:
            return (
                f"the model is {type(model).__name__}, not nn.Sequential (nor does it name its "
                "nn.Sequential body in a `fimoda_sequential` attribute)"
            )
        if any(not n.startswith(prefix) for n, _ in model.named_parameters()):
            return f"it has parameters outside its nn.Sequential body {prefix.rstrip('.')!r}"
        kinds = [type(m).__name__ for m in body.children() if not isinstance(m, (nn.Linear, *_ACTIVATIONS))]
        if kinds:
            return f"it contains {sorted(set(kinds))} (only Linear and elementwise activations are supported)"
        linears = [m for m in body.children() if isinstance(m, nn.Linear)]
        if not linears:
            return "it has no Linear layer"
        if any(not p.requires_grad for p in model.parameters()):
            return "some parameters are frozen"
        if len({p.dtype for p in model.parameters()}) != 1:
            return "its parameters have mixed dtypes"
        if example is not None:
            x = example[0] if isinstance(example, (tuple, list)) and len(example) == 2 else None
            if not (isinstance(x, Tensor) and x.dim() == 2 and x.shape[1] == linears[0].in_features):
                return "its training inputs are not flat feature vectors [B, in_features]"
        return None

    def grad_and_value(
        self, params: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor
    ) -> tuple[dict, Tensor]:
        """Gradients ``{name: [K, *shape]}`` and values ``[K]`` of ``L_k = Σ_r w[k, r] ℓ(x[k, r], y[k, r])``.

        ``x``: ``[K, R, d_in]`` inputs; ``y``: ``[K, R, ...]`` targets; ``w``: ``[K, R]`` row weights.
        """
        if x.dim() != 3:
            raise ValueError(
                f"The 'mlp' engine needs flat feature vectors per example, got inputs {tuple(x.shape)}."
            )
        saved: list[tuple[str, nn.Module, Tensor | None]] = []  # (name, module, input to the layer)
        a = x if x.dtype == w.dtype else x.to(w.dtype)
        for name, module in self.layers:
            if isinstance(module, nn.ReLU) and saved and isinstance(saved[-1][1], nn.Linear):
                # in place on the Linear's fresh output, which nothing else keeps: ReLU's backward
                # needs only its output
                saved.append((name, module, None))
                a = a.relu_()
                continue
            saved.append((name, module, a))
            if isinstance(module, nn.Linear):
                weight = params[f"{name}.weight"]
                bias = params.get(f"{name}.bias")
                a = (
                    torch.bmm(a, weight.transpose(1, 2))
                    if bias is None
                    else torch.baddbmm(bias.unsqueeze(1), a, weight.transpose(1, 2))
                )
            else:
                a = _forward(module, a)
        out = a
        ell, delta = self._loss_and_grad(out, y)
        value = (ell * w).sum(1)
        delta = delta * w.unsqueeze(-1)
        grads: dict[str, Tensor] = {}
        for i in range(len(saved) - 1, -1, -1):
            name, module, a_in = saved[i]
            if isinstance(module, nn.Linear):
                grads[f"{name}.weight"] = torch.bmm(delta.transpose(1, 2), a_in)
                if f"{name}.bias" in params:
                    grads[f"{name}.bias"] = delta.sum(1)
                if i > 0:
                    delta = torch.bmm(delta, params[f"{name}.weight"])
            else:
                out_i = saved[i + 1][2] if i + 1 < len(saved) else out
                delta = _backward(module, delta, a_in, out_i)
        return {n: grads[n] for n in params}, value

    def _loss_and_grad(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row loss ``[K, R]`` and its gradient in the outputs ``[K, R, O]`` (SupervisedTask's losses)."""
        k, r, o = out.shape
        if self.loss == "mse":
            diff = out - y.reshape(k, r, -1).to(out.dtype)
            if diff.shape != out.shape:
                raise ValueError(
                    f"SupervisedTask(mse): outputs {tuple(out.shape)} and targets {tuple(y.shape)} differ."
                )
            return diff.pow(2).sum(-1), 2 * diff
        labels = y.reshape(k, r).long()
        logp = out.log_softmax(-1)
        ell = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        grad = logp.exp()
        grad.scatter_add_(-1, labels.unsqueeze(-1), -torch.ones_like(ell).unsqueeze(-1))
        return ell, grad


def _sequential_body(model: nn.Module) -> tuple[nn.Module | None, str]:
    """The ``nn.Sequential`` that computes ``model``'s forward, and its parameter-name prefix.

    A plain ``nn.Sequential`` is its own body; another module opts in by naming the submodule whose
    forward *is* its forward in a class attribute ``fimoda_sequential`` (``lightning_fimoda.zoo.models.MLP``
    sets ``"net"``).
    """
    if type(model) is nn.Sequential:
        return model, ""
    name = getattr(model, "fimoda_sequential", None)
    body = getattr(model, name, None) if isinstance(name, str) else None
    if type(body) is nn.Sequential:
        return body, name + "."
    return None, ""


def _forward(module: nn.Module, a: Tensor) -> Tensor:
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return a
    if isinstance(module, nn.ReLU):
        return torch.relu(a)
    return module(a)


def _backward(module: nn.Module, delta: Tensor, z: Tensor, a: Tensor) -> Tensor:
    """``δ ⊙ σ'(z)`` for an activation with input ``z`` and output ``a`` (autograd's conventions at 0)."""
    if isinstance(module, nn.ReLU):
        return torch.ops.aten.threshold_backward(delta, a, 0)
    if isinstance(module, nn.LeakyReLU):
        return torch.ops.aten.leaky_relu_backward(delta, z, module.negative_slope, False)
    if isinstance(module, nn.Tanh):
        return torch.ops.aten.tanh_backward(delta, a)
    if isinstance(module, nn.Sigmoid):
        return torch.ops.aten.sigmoid_backward(delta, a)
    return delta
