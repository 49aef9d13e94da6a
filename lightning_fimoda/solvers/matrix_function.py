"""Functions of a symmetric matrix applied to vectors, ``f(H) v``, given only products ``H V``.

The one function this module is built for is the *horizon filter* of linearised further training
(SPEC §2–§3, ``docs/interpreting_scores.md``), but the Lanczos part takes any spectral function.

Derivation (SGD, learning rate ``η``, ``subtract`` leave-out). Let ``d_k = θ_k^{−j} − θ_k`` be the
difference between the leave-one-out run and the full run after ``k`` steps (same batches, common
random numbers). The LOO run's mini-batch loss is ``L_B − ℓ_j / n``, so, linearising the gradient
around ``θ̂`` and taking the expectation over batches (``E H_B = H``),

    d_{k+1} = d_k − η (H d_k − g_j / n) = (I − ηH) d_k + (η/n) g_j,    d_0 = 0,
    d_t = (1/n) φ_t(H) g_j,   φ_t(λ) = η Σ_{k<t} (1 − ηλ)^k = (1 − (1 − ηλ)^t) / λ   (φ_t(0) = ηt),

and ``f(x; θ_t^{−j}) − f(x; θ_t) ≈ g_xᵀ d_t``: ``τ_t(j, x) = (1/n) g_xᵀ φ_t(H) g_j`` (SPEC §1's sign:
positive = helpful). ``φ_1 = η`` gives Grad-Dot ``· η/n``; ``φ_t → H^{-1}`` as ``t → ∞`` when
``0 < ηλ < 2`` for every eigenvalue (the influence function).

Heavy-ball momentum ``β`` as ``torch.optim.SGD`` runs it (dampening 0, the buffer starts at the first
gradient): ``b_{k+1} = β b_k + ∇L``, ``θ_{k+1} = θ_k − η b_{k+1}``. The differences ``(d, b)`` of the
LOO and full runs obey, per eigenvalue ``λ`` of ``H`` (source ``c = 1/n`` along ``g_j``)::

    b_{k+1} = β b_k + λ d_k − c,   d_{k+1} = d_k − η b_{k+1}
    ⇔  s_{k+1} = A s_k + c u,  s = (d, b),  A = [[1 − ηλ, −ηβ], [λ, β]],  u = (η, −1),

equivalently ``d_{k+1} = d_k − η(λ d_k − c) + β (d_k − d_{k−1})`` (``d_{−1} = d_0 = 0``). So
``φ_t(λ) = e_1ᵀ (Σ_{k<t} A^k) u``, evaluated exactly from the block power
``[[A, I], [0, I]]^t = [[A^t, Σ_{k<t} A^k], [0, I]]`` (:func:`horizon_filter`). The recursion is
stable iff ``0 ≤ ηλ < 2(1 + β)`` (:func:`stability_limit`); beyond it the linearised further
training itself diverges.

Matrix-free evaluation: for each vector ``v`` (a batch of independent runs, vectorised), ``k`` steps of
Lanczos with full reorthogonalisation give ``H Q_k ≈ Q_k T_k`` and ``f(H) v ≈ ‖v‖ Q_k f(T_k) e_1``,
exact when ``f`` is a polynomial of degree ``< k`` (``φ_t`` has degree ``t − 1``). :func:`lanczos`
returns the basis and tridiagonal matrix; :func:`krylov_coefficients` the coefficients of ``f(H) v`` in
that basis for all checkpoints at once, from one run. It differs from the single-vector
:func:`lightning_fimoda.solvers.arnoldi.lanczos` (used for extreme eigenvalues) in running many
start vectors as one batch, with an early-stop hook and zero-padded breakdowns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LanczosBasis",
    "horizon_filter",
    "krylov_coefficients",
    "lanczos",
    "stability_limit",
]

MatVec = Callable[[Tensor], Tensor]


def stability_limit(lr: float, momentum: float = 0.0) -> float:
    """The eigenvalue ``λ`` above which the linearised (heavy-ball) SGD recursion diverges: ``2(1+β)/η``."""
    return 2.0 * (1.0 + momentum) / lr


def horizon_filter(evals: Tensor, steps: Sequence[int], lr: float, momentum: float = 0.0) -> Tensor:
    """``φ_t(λ)`` ``[len(steps), *evals.shape]`` (float64) for each step count ``t`` in ``steps``.

    ``φ_t(λ) = e_1ᵀ Σ_{k<t} A(λ)^k u`` with the companion matrix of the module docstring; without
    momentum this is ``(1 − (1 − ηλ)^t)/λ`` (``ηt`` at ``λ = 0``), computed without cancellation.
    """
    if any(int(t) < 0 for t in steps):
        raise ValueError(f"step counts must be >= 0, got {list(steps)}.")
    lam = evals.detach().to(torch.float64).reshape(-1)
    m = lam.numel()
    block = torch.zeros(m, 4, 4, dtype=torch.float64, device=lam.device)
    block[:, 0, 0] = 1.0 - lr * lam
    block[:, 0, 1] = -lr * momentum
    block[:, 1, 0] = lam
    block[:, 1, 1] = momentum
    block[:, 0, 2] = block[:, 1, 3] = block[:, 2, 2] = block[:, 3, 3] = 1.0
    u = torch.tensor([lr, -1.0], dtype=torch.float64, device=lam.device)
    out = torch.empty(len(steps), m, dtype=torch.float64, device=lam.device)
    power = torch.eye(4, dtype=torch.float64, device=lam.device).expand(m, 4, 4)
    done, cache = 0, {}
    for row, t in sorted(enumerate(int(s) for s in steps), key=lambda rt: rt[1]):
        delta = t - done
        if delta not in cache:
            cache[delta] = torch.linalg.matrix_power(block, delta)
        power, done = power @ cache[delta], t
        out[row] = power[:, 0, 2:] @ u
    return out.reshape(len(steps), *evals.shape)


@dataclass
class LanczosBasis:
    """``b`` independent Lanczos runs of ``k`` steps: ``H Q ≈ Q T`` per run.

    Attributes:
        basis: orthonormal rows ``Q`` ``[b, k, P]`` (rows after a breakdown are zero).
        alpha: diagonal of ``T`` ``[b, k]``; ``beta``: off-diagonal ``[b, k − 1]``.
        norms: ``‖v‖`` per run ``[b]``.
    """

    basis: Tensor
    alpha: Tensor
    beta: Tensor
    norms: Tensor

    @property
    def steps(self) -> int:
        return self.alpha.shape[1]

    def tridiagonal(self, k: int | None = None) -> Tensor:
        """``T_k`` ``[b, k, k]`` (float64) of the first ``k`` steps (default: all)."""
        k = self.steps if k is None else k
        t = torch.diag_embed(self.alpha[:, :k].to(torch.float64))
        off = self.beta[:, : k - 1].to(torch.float64)
        return t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


def lanczos(matvec: MatVec, v: Tensor, steps: int, stop: Callable[[LanczosBasis], bool] | None = None,
            check_every: int = 8) -> LanczosBasis:
    """``steps`` Lanczos iterations for each row of ``v`` ``[b, P]`` at once (full reorthogonalisation).

    ``stop``, if given, is called every ``check_every`` iterations with the basis so far and ends the
    iteration early when it returns ``True`` (e.g. when ``f(T_j) e_1`` has converged).

    ``matvec`` maps ``[b, P] → [b, P]`` (``H`` symmetric). A run whose Krylov space is exhausted
    (``β ≈ 0``: an invariant subspace, e.g. a low-rank Gauss-Newton matrix) continues with zero rows,
    which decouple from ``e_1`` in ``T`` and leave ``f(T) e_1`` exact.
    """
    if v.dim() != 2:
        raise ValueError(f"v must have shape [b, P], got {tuple(v.shape)}.")
    b, p = v.shape
    steps = max(1, min(int(steps), p))
    basis = torch.zeros(b, steps, p, dtype=v.dtype, device=v.device)
    alpha = torch.zeros(b, steps, dtype=v.dtype, device=v.device)
    beta = torch.zeros(b, max(steps - 1, 0), dtype=v.dtype, device=v.device)
    norms = v.norm(dim=1)
    tiny = torch.finfo(v.dtype).tiny
    basis[:, 0] = v / norms.clamp_min(tiny).unsqueeze(1)
    scale = torch.zeros(b, dtype=v.dtype, device=v.device)  # running ‖T‖ estimate, for breakdowns
    for j in range(steps):
        q = basis[:, j]
        w = matvec(q)
        alpha[:, j] = torch.linalg.vecdot(q, w)
        scale = torch.maximum(scale, alpha[:, j].abs())
        if j + 1 == steps:
            break
        if stop is not None and (j + 1) % check_every == 0:
            sofar = LanczosBasis(basis[:, : j + 1], alpha[:, : j + 1], beta[:, :j], norms)
            if stop(sofar):
                return sofar
        done = basis[:, : j + 1]
        for _ in range(2):  # classical Gram–Schmidt against the whole basis, twice
            w = w - torch.bmm(torch.bmm(done, w.unsqueeze(2)).transpose(1, 2), done).squeeze(1)
        nrm = w.norm(dim=1)
        alive = (nrm > 1e3 * torch.finfo(v.dtype).eps * scale.clamp_min(tiny)).to(v.dtype)
        beta[:, j] = nrm * alive
        basis[:, j + 1] = w * (alive / nrm.clamp_min(tiny)).unsqueeze(1)
        scale = torch.maximum(scale, beta[:, j])
    return LanczosBasis(basis, alpha, beta, norms)


def krylov_coefficients(lz: LanczosBasis, f: Callable[[Tensor], Tensor], k: int | None = None) -> Tensor:
    """Coefficients ``c`` ``[C, b, k]`` with ``f(H) v ≈ c @ Q_k`` for each of ``C`` functions.

    ``f`` maps eigenvalues ``[b, k]`` to ``[C, b, k]`` (e.g. :func:`horizon_filter` at ``C`` horizons).
    ``c = ‖v‖ S f(Θ) Sᵀ e_1`` with ``T_k = S Θ Sᵀ``; computed in float64.
    """
    theta, s = torch.linalg.eigh(lz.tridiagonal(k))
    first = s[:, 0, :]  # Sᵀ e_1 [b, k]
    values = f(theta)  # [C, b, k]
    coef = torch.einsum("bik,cbk->cbi", s, values * first)
    return coef * lz.norms.to(torch.float64).view(1, -1, 1)

