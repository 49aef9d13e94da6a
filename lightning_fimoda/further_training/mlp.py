"""Hand-written forward/backward for stacks of ``K`` MLPs: the engine's fast path on CPU.

For ``nn.Sequential`` models (or modules naming their ``nn.Sequential`` body in ``fimoda_sequential``) made
of ``nn.Linear`` layers and elementwise activations (ReLU, LeakyReLU, Tanh, Sigmoid, Identity; Dropout
counts as identity in eval mode) with a :class:`SupervisedTask`, the gradient of each member's weighted
loss ``L_k = Σ_r w_{kr} ℓ(z_{kr}; θ_k)`` is computed by hand instead of ``vmap(grad)``:

    forward   z_l = a_{l−1} W_lᵀ + b_l,  a_l = σ(z_l)                     [K, R, width]
    backward  δ_L = w · ∂ℓ/∂o  (MSE: 2(o − y); cross-entropy: softmax(o) − onehot(y))
              ∇W_l = δ_lᵀ a_{l−1},  ∇b_l = Σ_r δ_l,  δ_{l−1} = (δ_l W_l) ⊙ σ'(z_{l−1})

Two paths compute it (``benchmarks/further_training.py`` measures both):

- the compiled step (:mod:`.native`, on CPU in float32/float64, where the layers allow it): member by
  member, the whole pass with the member's weights and activations in cache, each product one BLAS
  ``gemm``, the elementwise work fused into loops over the products' outputs;
- ``torch.bmm`` over the member axis (elsewhere: accelerators, other dtypes, ``native=False``). On one
  CPU thread the members go in chunks of ``c`` whose activations fit in a core's L2 cache, so the
  elementwise passes run from cache (with more threads, or on an accelerator, one chunk: measured);
  activations and their derivatives run in place; biases are added after the product (``baddbmm``
  first copies the broadcast bias into its output: slower); outputs and gradients go to buffers reused
  from call to call; a layer with at most 8 outputs is computed as ``W aᵀ`` (faster there).

The engine's test measurements go through the same forward (:meth:`MLPKernel.measurement`). The engine
steps all members in lockstep: training them in cache-sized groups for the whole schedule (temporal
blocking) gained at most 1–3% of the GEMM rate in its best case (README, ``--groups``).

The generic ``torch.func`` path stays the reference for every other model; both are tested against
the sequential ``torch.optim`` oracle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..task import AttributionTask, SupervisedTask
from .native import CompiledStep

__all__ = ["MLPKernel"]

_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout)
_CACHE_BYTES = 1 << 20  # one chunk's [c, R, width] activation (c = 16 for Energy: measured best)
_NARROW = 8


@dataclass(frozen=True)
class _Block:
    """A ``nn.Linear`` (its parameters' names; ``weight=None`` before the first Linear) and the
    elementwise activations that follow it, in order."""

    weight: str | None
    bias: str | None
    acts: tuple[nn.Module, ...]
    inp: int = 0
    out: int = 0

    @property
    def narrow(self) -> bool:
        """Few outputs per row: ``W aᵀ`` (``[c, out, R]``) is the faster product than ``a Wᵀ``."""
        return self.out <= _NARROW


class MLPKernel:
    """Batched loss gradients of ``K`` stacked copies of a supported MLP (see module docstring).

    ``cache_bytes``: target size of one chunk's activation tensor ``[c, R, width]`` on one CPU thread (sets
    ``c``; with several threads or on an accelerator, all members form one chunk).
    ``native``: on CPU in float32/float64, run the compiled step (:mod:`.native`: each member's whole pass
    in cache, elementwise work fused into loops over the BLAS products; members split over torch's
    threads) when this model's layers allow it (see :attr:`native_unavailable`); otherwise, or with
    ``native=False``, ``torch.bmm``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: AttributionTask,
        example: Any = None,
        cache_bytes: int = _CACHE_BYTES,
        native: bool = True,
    ) -> None:
        reason = self.unsupported(model, task, example)
        if reason:
            raise ValueError(f"The 'mlp' engine cannot run this model: {reason}. Use engine='vectorised'.")
        self.loss = task.loss
        self.unpack = task.unpack  # batch -> (x [.., d_in], y): the task's layout, not the engine's
        self.cache_bytes = cache_bytes
        body, prefix = _sequential_body(model)
        self.blocks = _blocks(body, prefix)
        self.width = max(max(b.inp, b.out) for b in self.blocks)
        self._grads: dict[str, Tensor] = {}
        self._work: dict[tuple, tuple[int, list[tuple[Tensor, Tensor]]]] = {}
        self.compiled = CompiledStep(self.blocks, task.loss) if native else None

    @property
    def native_unavailable(self) -> str | None:
        """Why the compiled step will not run (``None``: it runs on CPU in float32/float64)."""
        return "native=False" if self.compiled is None else self.compiled.unavailable

    def _uses_native(self, like: Tensor) -> bool:
        return self.compiled is not None and self.compiled.usable(like)

    def path(self, like: Tensor) -> str:
        """The path that runs for parameters like ``like``: ``"compiled step"`` or ``"torch.bmm (why)"``."""
        if self._uses_native(like):
            return "compiled step"
        why = self.native_unavailable
        if why is None:
            cpu = like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64)
            why = f"{torch.get_num_threads()} threads without MKL" if cpu else f"{like.device.type}, {like.dtype}"
        return f"torch.bmm ({why})"

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
        The gradient tensors are buffers of this kernel: the next call overwrites them.
        """
        if x.dim() != 3:
            raise ValueError(
                f"The 'mlp' engine needs flat feature vectors per example, got inputs {tuple(x.shape)}."
            )
        k, r = w.shape
        grads = self._grad_buffers(params)
        value = w.new_empty(k)
        x = x if x.dtype == w.dtype else x.to(w.dtype)
        if self._uses_native(w):
            self.compiled(params, x, y, w, value, grads)
            return dict(grads), value
        c = self._chunk_size(k, r, x)
        work = self._workspace(c, r, x)
        for k0 in range(0, k, c):
            part = slice(k0, k0 + c)
            self._chunk(params, grads, part, (x[part], y[part], w[part]), work, value[part])
        return dict(grads), value

    def measurement(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """``f`` of every member on one batch, ``[K, B]``: the task's measurement (SupervisedTask's
        per-example loss), by the kernel's forward pass (the engine's test measurements)."""
        x, y = self.unpack(batch)
        if x.dim() != 2:
            raise ValueError(f"The 'mlp' engine needs flat feature vectors per example, got {tuple(x.shape)}.")
        first = next(iter(params.values()))
        k, r = first.shape[0], x.shape[0]
        x = x.to(first.dtype).expand(k, *x.shape)
        y = y.expand(k, *y.shape)
        values = x.new_empty(k, r)
        if self._uses_native(x):
            self.compiled(params, x, y, None, values, None)
            return values
        c = self._chunk_size(k, r, x)
        work = self._workspace(c, r, x)
        for k0 in range(0, k, c):
            part = slice(k0, k0 + c)
            out = self._forward(params, part, x[part], work)[-1][2]
            values[part] = self._loss_and_grad(out, y[part])[0]
        return values

    def _chunk_size(self, k: int, r: int, like: Tensor) -> int:
        """Members per chunk: one chunk on an accelerator (chunks cost launches) and on several threads
        (synchronisations); on one CPU thread, as many as fit ``cache_bytes`` at ``[R, width]`` each."""
        if like.device.type == "cpu" and torch.get_num_threads() == 1:
            return min(k, max(1, self.cache_bytes // (r * self.width * like.element_size())))
        return k

    def _grad_buffers(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Gradient buffers shaped like ``params``, kept between calls (reallocated when they differ)."""
        for n, p in params.items():
            buf = self._grads.get(n)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                self._grads[n] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return {n: self._grads[n] for n in params}

    def _chunk(
        self,
        params: dict[str, Tensor],
        grads: dict[str, Tensor],
        part: slice,
        batch: tuple[Tensor, Tensor, Tensor],
        work: list[tuple[Tensor, Tensor]],
        value: Tensor,
    ) -> None:
        """Members ``part`` (``c`` of them; ``batch``: their ``x [c, R, d_in]``, ``y``, ``w [c, R]``): fill
        their rows of ``grads`` and their losses ``value [c]``."""
        x, y, w = batch
        c = w.shape[0]
        saved = self._forward(params, part, x, work)
        ell, delta = self._loss_and_grad(saved[-1][2], y)
        delta.mul_(w.unsqueeze(-1))
        torch.sum(ell.mul_(w), 1, out=value)
        for i in range(len(self.blocks) - 1, -1, -1):
            block, (a_in, acts, _) = self.blocks[i], saved[i]
            if block.weight is None:  # activations on the inputs: no parameters below
                break
            for module, t in reversed(acts):
                _derivative(module, delta, t)
            torch.bmm(delta.mT, a_in, out=grads[block.weight][part])
            if block.bias is not None:
                torch.sum(delta, 1, out=grads[block.bias][part])
            if i > 0 and self.blocks[i - 1].weight is not None:
                delta = torch.bmm(delta, params[block.weight][part], out=work[i][1][:c])

    def _forward(
        self, params: dict[str, Tensor], part: slice, x: Tensor, work: list[tuple[Tensor, Tensor]]
    ) -> list[tuple[Tensor, list, Tensor]]:
        """Per block: ``(input, [(activation, tensor its derivative needs)], output)``; outputs ``[c, R, width]``."""
        saved = []
        c, a = x.shape[0], x
        for block, (z, _) in zip(self.blocks, work):
            a_in, fresh = (
                a,
                block.weight is not None,
            )  # fresh: this chunk's, saved by nothing: may go in place
            if block.weight is not None:
                weight = params[block.weight][part]
                bias = params[block.bias][part] if block.bias is not None else None
                z = z[:c]
                if block.narrow:  # (W aᵀ + b)ᵀ: a few outputs per row, the faster product
                    a = _affine(weight, a.mT, bias, 2, z).mT
                else:
                    a = _affine(a, weight.mT, bias, 1, z)
            acts = []
            for module in block.acts:
                # the derivative needs the activation's output, except LeakyReLU's (its input)
                if isinstance(module, nn.LeakyReLU):
                    acts.append((module, a))
                    a, fresh = torch.nn.functional.leaky_relu(a, module.negative_slope), True
                else:
                    a, fresh = _activation(module, a, inplace=fresh), False
                    acts.append((module, a))
            saved.append((a_in, acts, a))
        return saved

    def _workspace(self, c: int, r: int, like: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per block, reused buffers for its output ``[c, R, out]`` (``[c, out, R]`` when narrow) and
        the loss gradient in its input ``[c, R, in]`` (kept between calls for the largest ``c``)."""
        key = (r, like.dtype, like.device)
        if key not in self._work or self._work[key][0] < c:
            shapes = [((c, b.out, r) if b.narrow else (c, r, b.out), (c, r, b.inp)) for b in self.blocks]
            self._work[key] = (c, [(like.new_empty(o), like.new_empty(i)) for o, i in shapes])
        return self._work[key][1]

    def _loss_and_grad(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row loss ``[K, R]`` and its gradient in the outputs ``[K, R, O]`` (SupervisedTask's losses)."""
        k, r, o = out.shape
        if self.loss == "mse":
            diff = out - y.reshape(k, r, -1).to(out.dtype)
            if diff.shape != out.shape:
                raise ValueError(
                    f"SupervisedTask(mse): outputs {tuple(out.shape)} and targets {tuple(y.shape)} differ."
                )
            return diff.pow(2).sum(-1), diff.mul_(2)
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


def _blocks(body: nn.Module, prefix: str) -> list[_Block]:
    """``body``'s layers grouped as Linear + following activations (Identity and Dropout dropped)."""
    blocks = [_Block(None, None, ())]
    for name, module in body.named_children():
        if isinstance(module, nn.Linear):
            bias = f"{prefix}{name}.bias" if module.bias is not None else None
            blocks.append(_Block(f"{prefix}{name}.weight", bias, (), module.in_features, module.out_features))
        elif not isinstance(module, (nn.Identity, nn.Dropout)):
            blocks[-1] = dataclasses.replace(blocks[-1], acts=(*blocks[-1].acts, module))
    return blocks if blocks[0].acts else blocks[1:]


def _affine(a: Tensor, b: Tensor, bias: Tensor | None, dim: int, out: Tensor) -> Tensor:
    """``a @ b + bias.unsqueeze(dim)`` (batched) into ``out``: the product, then the bias in place
    (3% faster per step than ``baddbmm``, which first copies the broadcast bias into ``out``; measured)."""
    out = torch.bmm(a, b, out=out)
    return out if bias is None else out.add_(bias.unsqueeze(dim))


def _activation(module: nn.Module, a: Tensor, inplace: bool) -> Tensor:
    """``σ(a)`` for ReLU, Tanh or Sigmoid, in place on ``a`` when ``inplace``."""
    if isinstance(module, nn.ReLU):
        return a.relu_() if inplace else a.relu()
    if isinstance(module, nn.Tanh):
        return a.tanh_() if inplace else a.tanh()
    return a.sigmoid_() if inplace else a.sigmoid()


def _derivative(module: nn.Module, delta: Tensor, t: Tensor) -> None:
    """``δ ← δ ⊙ σ'``, in place, from the activation's output ``t`` (its input for LeakyReLU);
    autograd's conventions at 0."""
    aten = torch.ops.aten
    if isinstance(module, nn.ReLU):
        aten.threshold_backward.grad_input(delta, t, 0, grad_input=delta)
    elif isinstance(module, nn.LeakyReLU):
        aten.leaky_relu_backward.grad_input(delta, t, module.negative_slope, False, grad_input=delta)
    elif isinstance(module, nn.Tanh):
        aten.tanh_backward.grad_input(delta, t, grad_input=delta)
    else:
        aten.sigmoid_backward.grad_input(delta, t, grad_input=delta)
