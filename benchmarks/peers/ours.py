"""Our side of every row: the estimator spec per method, run through the public ``attribute()``.

Every call builds a fresh gradient cache, so our time includes the per-sample gradients (as the
peers' times do). Settings come from the :class:`~.problems.Problem`, so the peers get the same ones.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_fimoda import attribute

from .problems import Problem


def exact_hessian() -> str:
    """The name of the true-Hessian option: ``"exact"`` (new) or ``"true"`` (before the rename)."""
    from lightning_fimoda.estimators import influence

    return "exact" if "exact" in getattr(influence, "HESSIAN_TYPES", ("exact",)) else "true"


def _influence(name: str, hessian: str) -> Callable[[Problem], dict]:
    def spec(p: Problem) -> dict:
        s = p.settings
        kw: dict = {"name": name, "hessian": exact_hessian() if hessian == "exact" else hessian,
                    "damping": p.damping}
        if name == "explicit":
            kw["params"] = s["explicit_params"]
        elif name == "cg":
            kw.update(max_iter=s["cg_iter"], tol=1e-6)
        elif name == "lissa":  # equal work: exactly `depth` steps, no residual (pyDVL rtol=0, dattri), no
            # definiteness proof (the peers make none; the problem's damping_for makes H + λI ≻ 0)
            kw.update(depth=s["lissa_depth"], batch_size=s["lissa_batch"], scale=s["lissa_scale"], tol=0.0,
                      check_definite=False, residual_examples=0)
        elif name == "arnoldi":  # complement=False: the peers' rank-r subspace inverse (SPEC §3)
            kw.update(rank=s["rank"], complement=False)
        return kw

    return spec


# method key -> our estimator spec for a problem
METHODS: dict[str, Callable[[Problem], dict]] = {
    "grad_dot": lambda p: {"name": "grad_dot"},
    # kronfluence tracks nn.Linear / nn.Conv2d only: the same parameters on our side (equal work)
    "grad_dot (Linear/Conv2d params)": lambda p: {"name": "grad_dot", "params": p.settings["tracked_params"]},
    "grad_cos": lambda p: {"name": "grad_cos"},
    "explicit (exact)": _influence("explicit", "exact"),
    "explicit (GN)": _influence("explicit", "gauss_newton"),
    "cg (exact)": _influence("cg", "exact"),
    "cg (GN)": _influence("cg", "gauss_newton"),
    "lissa (exact)": _influence("lissa", "exact"),
    "lissa (GN)": _influence("lissa", "gauss_newton"),
    # batch = every training example: the deterministic truncated Neumann series, the same in every library
    "lissa (exact, full batch)": lambda p: {**_influence("lissa", "exact")(p), "batch_size": len(p.train),
                                            "depth": p.settings["lissa_full_depth"]},
    "arnoldi (exact)": _influence("arnoldi", "exact"),
    "datainf": lambda p: {"name": "datainf", "damping_scale": 0.1},
    "ekfac": lambda p: {"name": "ekfac", "damping": p.settings["ekfac_damping"],
                        **({"params": p.settings["ekfac_params"]} if p.settings.get("ekfac_params") else {})},
    "trak": lambda p: {"name": "trak", "proj_dim": p.settings["proj_dim"], "lambda_reg": 0.0},
}


def runner(p: Problem, method: str) -> Callable:
    spec = METHODS[method](p)

    def run():
        return attribute(p.model, p.task, p.train, p.test, [spec])[spec.get("label", _label(spec))]

    return run


def _label(spec: dict) -> str:
    from lightning_fimoda import build_estimator

    kw = {k: v for k, v in spec.items() if k != "name"}
    return build_estimator(spec["name"], **kw).label
