"""captum (``captum.influence``): ``TracInCP`` (one checkpoint) and ``ArnoldiInfluenceFunction``.

Both ``influence(inputs=(x_test, y_test))`` return ``[n_test, n_train]`` with no minus sign
(positive = proponent = helpful): SPEC §1's sign and orientation.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .harness import Unsupported
from .problems import Problem


class _Loss(nn.Module):
    """Per-example loss ``[B]`` (``reduction="none"``, as captum requires), SPEC's ``ℓ``."""

    reduction = "none"

    def __init__(self, p: Problem) -> None:
        super().__init__()
        self.p = p

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        if self.p.loss_kind == "mse":
            return (out - y.reshape(out.shape)).pow(2).sum(-1)
        return nn.functional.cross_entropy(out, y, reduction="none")


_CHECKPOINTS: dict[int, str] = {}


def _checkpoint(p: Problem) -> str:
    """The model's weights saved once to a temporary file (captum loads checkpoints from paths)."""
    key = id(p.model)
    if key not in _CHECKPOINTS:
        path = Path(tempfile.mkdtemp(prefix="fimoda-peers-")) / f"{p.name}.pt"
        torch.save(p.model.state_dict(), path)
        _CHECKPOINTS[key] = str(path)
    return _CHECKPOINTS[key]


def _load(model: nn.Module, path: str) -> float:
    model.load_state_dict(torch.load(path))
    model.eval()
    return 1.0  # the "learning rate" TracIn multiplies by: 1, so scores are plain g_x · g_j


def grad_dot(p: Problem) -> Tensor:
    from captum.influence import TracInCP

    limit = p.settings.get("captum_tracin_max_train")
    if limit is not None and len(p.train) > limit:
        raise Unsupported(f"skipped above {limit} training images: TracInCP's per-example autograd loop took "
                          "47.4 CPU-s and 8.7 GiB vs our 0.86 CPU-s on 200 images x 5 tests (--quick): "
                          "~8 CPU-min per call at 2,000 (linear)")
    tracin = TracInCP(p.model, p.train, checkpoints=[_checkpoint(p)], checkpoints_load_func=_load,
                      loss_fn=_Loss(p), batch_size=256, sample_wise_grads_per_batch=False)
    x, y = p.test.tensors
    return tracin.influence((x, y))  # Σ_ckpt lr · g_x · g_j with lr = 1: τ of Grad-Dot, same sign


def arnoldi(p: Problem) -> Tensor:
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    r, n = p.settings["rank"], len(p.train)
    # captum's Hessian is that of the SUMMED loss (n·H), and hessian_reg is added to its Krylov
    # restriction: hessian_reg = n·λ gives eigenvalues n(μ + λ), so its scores g_x V (n(μ+λ))^{-1} Vᵀ g_j
    # are exactly τ = (1/n) g_j (H + λI)^{-1} g_x in the rank-r subspace (same sign and scale).
    fn = ArnoldiInfluenceFunction(p.model, p.train, checkpoint=_checkpoint(p), checkpoints_load_func=_load,
                                  loss_fn=_Loss(p), batch_size=len(p.train), projection_dim=r,
                                  arnoldi_dim=3 * r, hessian_reg=n * p.damping, hessian_inverse_tol=1e-12)
    x, y = p.test.tensors
    return fn.influence((x, y))


RUNNERS: dict[str, Callable[[Problem], Tensor]] = {"grad_dot": grad_dot, "arnoldi (exact)": arnoldi}
