"""Typed estimator configs (validated at construction), ``Estimator.check`` before any work, and
checkpoint-indexed scores."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_fimoda import AttributionTask, Estimator, SupervisedTask, build_estimator
from lightning_fimoda.attribute import build_estimators
from lightning_fimoda.estimators import EstimatorConfig, InfluenceConfig, InfluenceFunction
from lightning_fimoda.exceptions import ConfigurationError, PrecisionError
from lightning_fimoda.solvers import CGConfig, CGSolver

from .conftest import make_mlp, make_regression

MSE = SupervisedTask("mse")


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("lissa", {"depth": 0}, "depth must be an integer >= 1"),
    ("cg", {"damping": -1.0}, "damping must be None or a finite number >= 0"),
    ("cg", {"hessian": "fisher"}, r"hessian must be one of \['exact', 'gauss_newton'\]"),
    ("cg", {"hessian": False}, "hessian must be one of"),
    ("cg", {"tol": 0.0}, "tol must be a finite number > 0"),
    ("explicit", {"max_params": 0}, "max_params"),
    ("arnoldi", {"rank": 5, "iterations": 3}, r"iterations \(3\) must be >= rank"),
    ("datainf", {"damping_scale": -1.0}, "damping_scale"),
    ("trak", {"model_output": "logit"}, r"model_output must be one of \['auto', 'prediction', 'margin'\]"),
    ("ekfac", {"fisher": "true"}, r"fisher must be one of \['sampled', 'empirical'\]"),
])
def test_bad_settings_fail_at_construction_naming_the_estimator(name, kwargs, match):
    with pytest.raises(ConfigurationError, match=rf"Estimator '{name}': .*{match}"):
        build_estimator(name, **kwargs)


@pytest.mark.parametrize("hessian", ["exact", "true", True])
def test_exact_hessian_and_its_yaml_aliases_build(hessian):
    est = build_estimator("lissa", hessian=hessian)
    assert est.config.hessian == "exact" and est.settings()["hessian"] == "exact"


def test_exact_alias_gives_the_same_scores_as_the_canonical_name():
    model, train, test = make_mlp(d_in=3, hidden=3), make_regression(12, d_in=3), make_regression(3, d_in=3)
    a = build_estimator("explicit", hessian="exact", damping=0.5).fit(model, MSE, train).score(test)
    b = build_estimator("explicit", hessian=True, damping=0.5).fit(model, MSE, train).score(test)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_settings_are_the_config_as_json_plus_info():
    est = build_estimator("cg", params=["0"], tol=1e-4, label="mine")
    settings = est.settings()
    assert settings == {
        "estimator": "cg", "params": ["0"], "label": "mine", "hessian": "gauss_newton", "damping": None,
        "damping_scale": 100.0, "generalized": False, "chunk_size": 512, "tol": 1e-4, "max_iter": 500,
    }
    json.dumps(settings)
    assert est.label == "mine" and est.params == ["0"]


def test_influence_function_from_config_objects():
    est = InfluenceFunction(CGSolver(CGConfig(tol=1e-9)), InfluenceConfig(damping=0.5))
    assert est.name == "cg" and est.settings()["tol"] == 1e-9 and est.settings()["damping"] == 0.5
    with pytest.raises(ConfigurationError, match="Unknown solver 'newton'"):
        InfluenceFunction("newton")
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['depth'\]"):
        InfluenceFunction("cg", depth=3)


def test_meta_device_and_half_precision_are_refused_before_any_work():
    train = make_regression(6, d_in=3)
    with torch.device("meta"):
        meta = nn.Linear(3, 1)
    with pytest.raises(PrecisionError, match="meta device"):
        build_estimator("grad_dot").check(meta, MSE, train)
    for dtype in (torch.float16, torch.bfloat16):
        half = make_mlp(d_in=3).to(dtype)
        with pytest.raises(PrecisionError, match=f"{str(dtype)}.*float32"):
            build_estimator("cg").fit(half, MSE, train)
        with pytest.raises(PrecisionError, match="half precision"):
            build_estimator("ekfac").fit(half, MSE, train)


def test_check_refuses_what_the_estimator_cannot_do():
    model, train = make_mlp(d_in=3, hidden=4), make_regression(6, d_in=3)
    with pytest.raises(ConfigurationError, match="P = 21 selected parameters, above max_params = 20"):
        build_estimator("explicit", max_params=20).check(model, MSE, train)
    build_estimator("explicit", max_params=20, params=["2"]).check(model, MSE, train)  # 5 parameters
    with pytest.raises(ConfigurationError, match="'fc9' matches no trainable parameter"):
        build_estimator("grad_dot", params=["fc9"]).check(model, MSE, train)

    class LossOnly(AttributionTask):
        def per_example_loss(self, model, batch):
            return (model(batch[0])[:, 0] - batch[1]).pow(2)

    with pytest.raises(ConfigurationError, match="gauss_newton' needs the task's outputs"):
        build_estimator("cg").check(model, LossOnly(), train)
    build_estimator("cg", hessian="exact").check(model, LossOnly(), train)
    with pytest.raises(ConfigurationError, match="one output per example"):
        build_estimator("trak").check(make_mlp(d_in=3, d_out=2), MSE, train)


def test_checkpoint_indexed_estimators_return_one_matrix_per_checkpoint():
    @dataclass(frozen=True)
    class HorizonConfig(EstimatorConfig):
        checkpoints: int = 3

    class Horizon(Estimator):
        name = "test_horizon"
        config_class = HorizonConfig
        checkpoint_indexed = True

        def _fit(self):
            pass

        def _score(self, test_dataset, test_indices):
            c, t, n = self.config.checkpoints, test_indices.numel(), self.train_indices_.numel()
            return torch.arange(c * t * n, dtype=torch.float64).reshape(c, t, n)

    model, train, test = make_mlp(d_in=3), make_regression(5, d_in=3), make_regression(2, d_in=3)
    scores = Horizon().fit(model, MSE, train).score(test)
    torch.testing.assert_close(scores, torch.arange(30, dtype=torch.float64).reshape(3, 2, 5))
    flat = copy.copy(Horizon())
    type(flat).checkpoint_indexed = False
    with pytest.raises(RuntimeError, match=r"scores have shape \(3, 2, 5\), expected \(2, 5\)"):
        flat.fit(model, MSE, train).score(test)


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_builds_its_estimators(path):
    specs = yaml.safe_load(path.read_text())["fimoda"]["estimators"]
    built = build_estimators(specs)
    assert [e.label for e in built] == [s if isinstance(s, str) else s.get("label", s["name"]) for s in specs]
    for spec, est in zip(specs, built):
        if isinstance(spec, dict) and "hessian" in spec:
            assert est.config.hessian == "exact"


@pytest.mark.parametrize("text", ['hessian: "true"', "hessian: true", "hessian: exact", "hessian: True"])
def test_yaml_spellings_of_the_exact_hessian(text):
    spec = yaml.safe_load(f"{{name: lissa, {text}}}")
    assert build_estimators([spec])[0].config.hessian == "exact"
