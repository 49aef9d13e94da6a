"""pyDVL (``pydvl.influence.torch``) on the benchmark problems.

``influences(x_test, y_test, x, y, mode="up")`` returns ``[n_test, n_train]`` =
``(H^{-1} g_x)ᵀ g_j`` (no minus sign) with ``H`` averaged over the fit loader's batches, i.e. the
Hessian of the mean loss: ``n × τ`` of SPEC §1, same sign, same orientation — no mapping beyond scale.
pyDVL's ``SecondOrderMode.GAUSS_NEWTON`` is the empirical Fisher ``(1/n) Σ g_i g_iᵀ``, not SPEC §3's
``Jᵀ ∇²_o ℓ J``: those rows are run and printed, marked as different mathematics.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor
from torch.utils.data import DataLoader

from .harness import Unsupported
from .problems import Problem

EF_NOTE = "pyDVL 'gauss_newton' = empirical Fisher: different mathematics"


def _fit_and_score(p: Problem, model_cls, fit_batch: int | None = None, **kw) -> Tensor:
    inf = model_cls(p.model, p.batch_loss, **kw)
    inf = inf.fit(DataLoader(p.train, batch_size=fit_batch or len(p.train)))
    (x, y), (xt, yt) = p.train.tensors, p.test.tensors
    return inf.influences(xt, yt, x, y, mode="up")  # [n_test, n_train], n × τ (see module doc)


def _mode(gauss_newton: bool):
    from pydvl.influence.torch.util import SecondOrderMode

    return SecondOrderMode.GAUSS_NEWTON if gauss_newton else SecondOrderMode.HESSIAN


def _with_only(p: Problem, names: list[str], fn: Callable[[], Tensor]) -> Tensor:
    """Run ``fn`` with gradients restricted to ``names`` (pyDVL differentiates requires_grad params)."""
    params = dict(p.model.named_parameters())
    for n, q in params.items():
        q.requires_grad_(n in names)
    try:
        return fn()
    finally:
        for q in params.values():
            q.requires_grad_(True)


def explicit(p: Problem, gn: bool) -> Tensor:
    from pydvl.influence.torch import DirectInfluence

    return _with_only(p, p.settings["explicit_params"], lambda: _fit_and_score(
        p, DirectInfluence, regularization=p.damping, second_order_mode=_mode(gn)))


def cg(p: Problem, gn: bool) -> Tensor:
    from pydvl.influence.torch import CgInfluence

    # rtol on the relative residual like ours (tol=1e-6), same iteration cap.
    return _fit_and_score(p, CgInfluence, regularization=p.damping, rtol=1e-6, atol=0.0,
                          maxiter=p.settings["cg_iter"], warn_on_max_iteration=False,
                          second_order_mode=_mode(gn))


def lissa(p: Problem, gn: bool, full: bool = False) -> Tensor:
    from pydvl.influence.torch import LissaInfluence

    # pyDVL LiSSA: h <- b + (1 - dampen) h - (H + λI) h / s over the fit loader's batches (cycled),
    # `maxiter` steps, result h / s -> (H + λI)^{-1} b; same depth, batch size and scale as ours
    # (`full`: one batch of every training example, the deterministic Neumann series).
    batch, depth = (len(p.train), p.settings["lissa_full_depth"]) if full else (p.settings["lissa_batch"],
                                                                                 p.settings["lissa_depth"])
    return _fit_and_score(p, LissaInfluence, fit_batch=batch, regularization=p.damping,
                          maxiter=depth, dampen=0.0, scale=p.settings["lissa_scale"],
                          rtol=0.0, warn_on_max_iteration=False, second_order_mode=_mode(gn))


def arnoldi(p: Problem) -> Tensor:
    from pydvl.influence.torch import ArnoldiInfluence

    # Top-`rank` eigenpairs of the true Hessian; V (D + λ)^{-1} Vᵀ b; n × τ, same sign.
    return _fit_and_score(p, ArnoldiInfluence, regularization=p.damping, rank=p.settings["rank"])


def _blocks(p: Problem) -> OrderedDict:
    out: OrderedDict = OrderedDict()
    for name, _ in p.model.named_parameters():
        out.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return out


def datainf(p: Problem) -> Tensor:
    from pydvl.influence.torch import InverseHarmonicMeanInfluence

    # DataInf's inverse harmonic mean per layer with our λ_l = 0.1 · mean(g_l²); returns
    # g_xl·(G_l + λ_l)^{-1}_{IHM} g_jl = τ's layer term (same sign and scale). pyDVL 0.10.0 rejects every
    # valid per-block regularization dict (its subset check is inverted), so: one run per layer
    # (gradients restricted to it, float λ_l), summed — exact, as DataInf is separable over layers.
    total = None
    for names, lam in zip(_blocks(p).values(), p.settings["datainf_lambdas"]):
        part = _with_only(p, names, lambda lam=lam: _fit_and_score(p, InverseHarmonicMeanInfluence,
                                                                    regularization=float(lam)))
        total = part if total is None else total + part
    return total


def ekfac(p: Problem) -> Tensor:
    from pydvl.influence.torch import EkfacInfluence

    if p.loss_kind != "cross_entropy":
        raise Unsupported("pyDVL EK-FAC: cross-entropy classification only")
    if any(not _is_linear(m) for m in p.model.modules() if next(m.parameters(recurse=False), None) is not None):
        raise Unsupported("pyDVL EK-FAC: nn.Linear layers only (this model has Conv2d/BatchNorm)")
    inf = EkfacInfluence(p.model, hessian_regularization=p.settings["ekfac_damping"])
    inf = inf.fit(DataLoader(p.train, batch_size=128))
    (x, y), (xt, yt) = p.train.tensors, p.test.tensors
    return inf.influences(xt, yt, x, y, mode="up")


def _is_linear(m) -> bool:
    import torch

    return isinstance(m, torch.nn.Linear)


RUNNERS: dict[str, Callable[[Problem], Tensor]] = {
    "explicit (exact)": lambda p: explicit(p, False),
    "explicit (GN)": lambda p: explicit(p, True),
    "cg (exact)": lambda p: cg(p, False),
    "cg (GN)": lambda p: cg(p, True),
    "lissa (exact)": lambda p: lissa(p, False),
    "lissa (GN)": lambda p: lissa(p, True),
    "lissa (exact, full batch)": lambda p: lissa(p, False, full=True),
    "arnoldi (exact)": arnoldi,
    "datainf": datainf,
    "ekfac": ekfac,
}
NOTES = {"explicit (GN)": EF_NOTE, "cg (GN)": EF_NOTE, "lissa (GN)": EF_NOTE}
UNSUPPORTED: dict[str, str] = {}
