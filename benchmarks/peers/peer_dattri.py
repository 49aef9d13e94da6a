"""dattri (``dattri.algorithm``) on the benchmark problems.

Every dattri attributor returns ``[n_train, n_test]``; we transpose to ``[n_test, n_train]``. Loaders
are unshuffled and hold the whole training set in one batch: dattri's influence attributors re-solve
the inverse-Hessian products for every training batch and sum per-batch Hessians over the batches of
the "full" loader, so one batch is both its fastest and its only exact setting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .harness import Unsupported
from .problems import Problem

GN_REASON = "dattri has no Gauss-Newton curvature (true-Hessian HVPs only)"


def _task(p: Problem, loss: Callable | None = None):
    from dattri.task import AttributionTask

    return AttributionTask(loss_func=loss or p.functional_loss, model=p.model,
                           checkpoints={k: v.detach() for k, v in p.model.state_dict().items()})


def _loaders(p: Problem) -> tuple[DataLoader, DataLoader]:
    return DataLoader(p.train, batch_size=len(p.train)), DataLoader(p.test, batch_size=len(p.test))


def _run(p: Problem, attributor) -> Tensor:
    train, test = _loaders(p)
    attributor.cache(train)
    return attributor.attribute(train, test).T  # [n_train, n_test] -> [n_test, n_train]


def _layers(p: Problem) -> dict[str, list[str]]:
    """Parameter names per module (``fc1.weight``, ``fc1.bias`` -> ``fc1``), as our DataInf groups them."""
    out: dict[str, list[str]] = {}
    for name, _ in p.model.named_parameters():
        out.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return out


def grad_dot(p: Problem, normalized: bool = False) -> Tensor:
    from dattri.algorithm import TracInAttributor

    # TracIn with one checkpoint and weight 1: g_j · g_x (or the cosine) — SPEC §3's sign, no rescale.
    att = TracInAttributor(_task(p), weight_list=torch.ones(1), normalized_grad=normalized)
    # dattri 0.3.0 ignores projector_kwargs=None (it always copies its defaults: a 512-d random
    # projection, ~0.997 cosine to exact Grad-Dot); None on the attribute is its exact no-projection path.
    att.projector_kwargs = None
    train, test = _loaders(p)
    return att.attribute(train, test).T


def explicit(p: Problem) -> Tensor:
    from dattri.algorithm import IFAttributorExplicit

    # g_j (H + λI)^{-1} g_x with H the Hessian of the mean loss = n × SPEC's τ: same sign, scale n.
    return _run(p, IFAttributorExplicit(_task(p), layer_name=p.settings["explicit_params"],
                                        regularization=p.damping))


def cg(p: Problem) -> Tensor:
    from dattri.algorithm import IFAttributorCG

    # Same mapping as explicit (n × τ); tol is dattri's absolute residual norm.
    return _run(p, IFAttributorCG(_task(p), max_iter=p.settings["cg_iter"], tol=1e-7,
                                  regularization=p.damping))


def lissa(p: Problem, full: bool = False) -> Tensor:
    from dattri.algorithm import IFAttributorLiSSA

    # dattri: h <- v + (1 - d) h - H h / s, returns h / s -> (H + s·d·I)^{-1} v, so d = λ / s gives
    # (H + λI)^{-1} v; scores n × τ (same sign). Batches are drawn without replacement: `full` (every
    # training example) is the deterministic Neumann series.
    s = p.settings["lissa_scale"]
    batch, depth = (len(p.train), p.settings["lissa_full_depth"]) if full else (p.settings["lissa_batch"],
                                                                                 p.settings["lissa_depth"])
    return _run(p, IFAttributorLiSSA(_task(p), batch_size=batch, num_repeat=1, recursion_depth=depth,
                                     damping=p.damping / s, scaling=s))


def arnoldi(p: Problem) -> Tensor:
    from dattri.algorithm import IFAttributorArnoldi

    # Top-`rank` eigenpairs of the true Hessian, (μ + λ)^{-1} in that subspace; n × τ (same sign).
    r = p.settings["rank"]
    return _run(p, IFAttributorArnoldi(_task(p), proj_dim=r, max_iter=3 * r, regularization=p.damping))


def datainf(p: Problem) -> Tensor:
    from dattri.algorithm import IFAttributorDataInf

    # dattri's DataInf takes one λ for all layers; ours uses λ_l = 0.1 · mean(g_l²) per layer. The
    # closed form is separable over layers, so one dattri run per layer with that layer's λ_l, summed,
    # is exactly SPEC §3's τ (dattri returns g_j·q with q = (1/n)Σ_i(...)/λ: τ itself, same sign).
    total = None
    for names, lam in zip(_layers(p).values(), p.settings["datainf_lambdas"]):
        part = _run(p, IFAttributorDataInf(_task(p), layer_name=names, regularization=lam))
        total = part if total is None else total + part
    return total


def ekfac(p: Problem) -> Tensor:
    from dattri.algorithm import IFAttributorEKFAC

    if p.loss_kind != "cross_entropy":
        raise Unsupported("dattri EK-FAC samples labels from a softmax: classification only")
    modules = p.settings.get("ekfac_modules")

    def loss(params, data):  # dattri's EK-FAC wants (mean loss, mask) with a per-position mask
        return p.functional_loss(params, data), torch.ones(data[0].shape[0], 1)

    # Inverse (EK-FAC) Fisher with damping λ added to the eigenvalues; n × τ (same sign).
    return _run(p, IFAttributorEKFAC(_task(p, loss), module_name=modules, damping=p.settings["ekfac_damping"]))


def trak(p: Problem) -> Tensor:
    from dattri.algorithm import TRAKAttributor
    from dattri.task import AttributionTask

    def output(params, data):  # model-output function F: margin (classification) or prediction
        x, y = data
        out = torch.func.functional_call(p.model, params, (x.unsqueeze(0),))[0]
        if p.loss_kind == "mse":
            return out.sum()
        others = out.masked_fill(torch.nn.functional.one_hot(y, out.shape[-1]).bool(), float("-inf"))
        return out[y] - torch.logsumexp(others, dim=-1)

    def correct_prob(params, data):  # dattri weights train features by Q = 1 - "p"
        if p.loss_kind == "mse":  # Q = ∂ℓ/∂o = 2(o - y), as in our TRAK: "p" = 1 - 2(o - y)
            return 1 - 2 * (output(params, data) - data[1].sum())
        return torch.sigmoid(output(params, data))  # sigmoid(margin) = p_y: Q = 1 - p_y

    # Train features ∇F, test features ∇ of the test loss (ours: f = loss) via target_func; no ridge
    # (λ_reg = 0 on both sides, k < n). Regression: Q_j ∇F_j = g_j, so dattri gives + g_j K g_x = SPEC
    # §1's sign. Classification: dattri's Q = 1 - p_j is minus ours (Q = ∂ℓ/∂m = -(1 - p_j)), so its
    # scores are -τ: multiplied by -1 below. Random projections differ (same dimension).
    task = AttributionTask(loss_func=output, model=p.model, target_func=p.functional_loss,
                           checkpoints={k: v.detach() for k, v in p.model.state_dict().items()})
    att = TRAKAttributor(task, correct_probability_func=correct_prob, regularization=0.0,
                         projector_kwargs={"proj_dim": p.settings["proj_dim"], "device": "cpu"})
    train, test = _loaders(p)
    att.cache(train)
    sign = -1.0 if p.loss_kind == "cross_entropy" else 1.0
    return sign * att.attribute(test).T  # TRAK's signature is attribute(test_loader, train_loader=None)


RUNNERS: dict[str, Callable[[Problem], Tensor]] = {
    "grad_dot": grad_dot,
    "grad_cos": lambda p: grad_dot(p, normalized=True),
    "explicit (exact)": explicit,
    "cg (exact)": cg,
    "lissa (exact)": lissa,
    "lissa (exact, full batch)": lambda p: lissa(p, full=True),
    "arnoldi (exact)": arnoldi,
    "datainf": datainf,
    "ekfac": ekfac,
    "trak": trak,
}
UNSUPPORTED = {"explicit (GN)": GN_REASON, "cg (GN)": GN_REASON, "lissa (GN)": GN_REASON}
