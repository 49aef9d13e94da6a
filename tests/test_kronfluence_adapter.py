"""kronfluence estimators (ekfac, kfac, diagonal; identity as a check) against independent oracles."""

from __future__ import annotations

import gc
import logging
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_fimoda import attribute, build_estimator
from lightning_fimoda._quiet import library_output
from lightning_fimoda.estimators.kronfluence_adapter import (
    EKFAC,
    KronfluenceIdentity,
    _FisherSampler,
    kronfluence_tracked_modules,
)

from .conftest import make_mlp, make_regression
from .helpers import (
    CE,
    MSE,
    SIGN_DAMPING,
    assert_signs_match_refits,
    dense_gauss_newton_scores,
    fit_to_convergence,
    make_classification,
    row_cosine,
)

STRATEGIES = ["ekfac", "kfac", "diagonal"]


@pytest.fixture(scope="module")
def regression_setup():
    train, test = make_regression(24, d_in=3, seed=1), make_regression(5, d_in=3, seed=2)
    return make_mlp(d_in=3, hidden=5), train, test


# -- identity == Grad-Dot -------------------------------------------------------------------------------
@pytest.mark.parametrize("task", [MSE, CE], ids=["mse", "cross_entropy"])
def test_identity_strategy_equals_grad_dot_over_n(task):
    if task is MSE:
        model, train, test = make_mlp(d_in=3, hidden=5), make_regression(24, d_in=3), make_regression(5, d_in=3, seed=2)
    else:
        model = make_mlp(d_in=3, hidden=5, d_out=3)
        train, test = make_classification(24), make_classification(5, seed=2)
    out = attribute(model, task, train, test, ["grad_dot", KronfluenceIdentity(batch_size=7)])
    n = len(train)
    assert out["kronfluence_identity"].dtype == torch.float64
    assert (row_cosine(out["kronfluence_identity"], out["grad_dot"]) > 1 - 1e-5).all()
    torch.testing.assert_close(out["kronfluence_identity"] * n, out["grad_dot"], rtol=1e-10, atol=1e-12)


def test_scores_do_not_depend_on_the_batch_size_summed_losses():
    """Mean-reduced losses would scale kronfluence's gradients (and scores) by 1/batch size."""
    model, train, test = make_mlp(d_in=3, hidden=5), make_regression(10, d_in=3), make_regression(3, d_in=3, seed=2)
    a = KronfluenceIdentity(batch_size=1).fit(model, MSE, train).score(test)
    b = KronfluenceIdentity(batch_size=10).fit(model, MSE, train).score(test)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    c = EKFAC(damping=0.01, fisher="empirical", batch_size=3).fit(model, MSE, train).score(test)
    d = EKFAC(damping=0.01, fisher="empirical", batch_size=10).fit(model, MSE, train).score(test)
    torch.testing.assert_close(c, d, rtol=1e-8, atol=1e-10)


def test_scored_subset_uses_the_full_data_curvature(regression_setup):
    model, train, test = regression_setup
    idx = torch.tensor([3, 17, 8])
    full = EKFAC(damping=0.01).fit(model, MSE, train).score(test)
    part = EKFAC(damping=0.01).fit(model, MSE, train, idx).score(test)
    torch.testing.assert_close(part, full[:, idx])


# -- EK-FAC with the sampled Fisher ≈ explicit Gauss-Newton on least squares -------------------------
def test_ekfac_sampled_fisher_matches_gauss_newton_influence_on_least_squares():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    train, test = TensorDataset(x, y), TensorDataset(torch.randn(6, d, generator=g, dtype=torch.float64),
                                                     torch.randn(6, generator=g, dtype=torch.float64))
    torch.manual_seed(0)
    model = nn.Linear(d, 1).double()
    fit_to_convergence(model, MSE, train)
    damping = 0.05
    oracle = dense_gauss_newton_scores(model, MSE, train, test, damping)
    for name in ("ekfac", "kfac"):
        est = build_estimator(name, damping=damping, fisher="sampled", seed=3)
        scores = est.fit(model, MSE, train).score(test)
        assert (row_cosine(scores, oracle) > 0.95).all(), (name, row_cosine(scores, oracle))
        ratio = scores.norm(dim=1) / oracle.norm(dim=1)
        assert ((ratio > 0.8) & (ratio < 1.25)).all(), (name, ratio)
        assert est.settings()["damping"] == damping


def test_fisher_sampler_covariance_is_the_output_hessian():
    """``E[∇_o ℓ̃ ∇_o ℓ̃ᵀ] = ∇²_o ℓ``: 2I for MSE (y ~ N(o, I/2)), diag(p) − ppᵀ for cross-entropy."""
    reps = 40000
    for task, outputs in ((MSE, torch.tensor([[0.3, -1.0]])), (CE, torch.tensor([[0.5, -0.2, 1.0]]))):
        outputs = outputs.double().expand(reps, -1).clone().requires_grad_(True)
        batch = (torch.zeros(reps, 1), torch.zeros(reps, dtype=torch.long))
        sampler = _FisherSampler(task, seed=0)
        v = torch.autograd.grad(sampler(outputs, batch), outputs)[0]
        cov = v.T @ v / reps
        expected = task.output_hessian(outputs[:1].detach(), batch)[0]
        torch.testing.assert_close(cov, expected, atol=0.05, rtol=0.05)
        again = torch.autograd.grad(_FisherSampler(task, seed=0)(outputs, batch), outputs)[0]
        assert torch.equal(v, again)  # seeded


# -- the sign test --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converged_regression():
    train, test = make_regression(20, d_in=2, seed=5), make_regression(4, d_in=2, seed=6)
    model = fit_to_convergence(make_mlp(d_in=2, hidden=3, seed=1), MSE, train)
    return model, train, test


@pytest.mark.parametrize("name", STRATEGIES)
def test_sign_matches_leave_one_out_refits(converged_regression, name):
    model, train, test = converged_regression
    scores = build_estimator(name, damping=SIGN_DAMPING).fit(model, MSE, train).score(test)
    assert_signs_match_refits(scores, model, MSE, train, test)


# -- no stale results, nothing left behind, the user's model untouched ---------------------------------
def test_running_twice_with_different_data_gives_different_correct_scores(tmp_path, regression_setup):
    """kronfluence silently reloads results saved under a reused name; every fit here starts afresh."""
    model, train, test = regression_setup
    other = make_regression(24, d_in=3, seed=7)
    identity = KronfluenceIdentity(output_dir=tmp_path)
    first = identity.fit(model, MSE, train).score(test)
    second = identity.fit(model, MSE, other).score(test)
    ref = attribute(model, MSE, other, test, ["grad_dot"])["grad_dot"] / len(other)
    torch.testing.assert_close(second, ref, rtol=1e-10, atol=1e-12)
    assert (first - second).abs().max() > 1e-3 * first.abs().max()
    assert len(list(tmp_path.iterdir())) == 2  # one fresh subdirectory per fit, in the user's folder
    ekfac = EKFAC(damping=0.01)
    a = ekfac.fit(model, MSE, train).score(test)
    b = ekfac.fit(model, MSE, other).score(test)
    torch.testing.assert_close(b, EKFAC(damping=0.01).fit(model, MSE, other).score(test))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    c = ekfac.fit(model, MSE, other).score(make_regression(5, d_in=3, seed=8))  # other test data, same name slot
    assert (c - b).abs().max() > 1e-3 * b.abs().max()


def test_nothing_left_in_the_working_directory_and_temporary_files_removed(tmp_path, monkeypatch, regression_setup):
    model, train, test = regression_setup
    monkeypatch.chdir(tmp_path)
    est = EKFAC(damping=0.01)
    est.fit(model, MSE, train).score(test)
    workdir = est._workdir.path
    assert workdir.exists() and tmp_path not in workdir.parents
    attribute(model, MSE, train, test, ["kfac", "diagonal"])
    assert list(tmp_path.iterdir()) == []
    del est
    gc.collect()
    assert not workdir.exists()


def test_the_users_model_is_not_modified(regression_setup):
    model, train, test = regression_setup
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    EKFAC(damping=0.01).fit(model, MSE, train).score(test)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert [type(m) for m in model.modules()] == [nn.Sequential, nn.Linear, nn.Tanh, nn.Linear]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


# -- tracked modules -------------------------------------------------------------------------------------
class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def test_untracked_parameters_are_reported_and_the_rest_scored(regression_setup):
    _, train, test = regression_setup
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 1), _Scaled()).double()
    with pytest.warns(UserWarning, match=r"ignored: \['1.weight', '1.bias', '4.scale'\]"):
        est = KronfluenceIdentity().fit(model, MSE, train)
    scores = est.score(test)
    ref = attribute(model, MSE, train, test, [build_estimator("grad_dot", params=["0", "3"])])["grad_dot"]
    torch.testing.assert_close(scores * len(train), ref, rtol=1e-10, atol=1e-12)
    assert est.info["tracked_modules"] == ["0", "3"]


def test_params_globs_select_layers_and_the_parameter_count_is_reported(regression_setup):
    model, train, test = regression_setup  # Linear(3, 5), Tanh, Linear(5, 1)
    est = KronfluenceIdentity(params=["2.*"]).fit(model, MSE, train)
    assert est.info["tracked_modules"] == ["2"] and est.info["num_params"] == 5 + 1
    ref = build_estimator("grad_dot", params=["2.*"]).fit(model, MSE, train)
    assert ref.info["num_params"] == 6
    torch.testing.assert_close(est.score(test) * len(train), ref.score(test), rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = KronfluenceIdentity().fit(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).double(), MSE, train)
    assert other.info["num_params"] == 3 * 4 + 4  # the LayerNorm's parameters are not attributed over


def test_nothing_tracked_or_a_split_layer_is_an_error(regression_setup):
    _, train, _ = regression_setup
    with pytest.raises(ValueError, match="supports only layers"):
        EKFAC().fit(nn.Sequential(_Scaled()), MSE, train)
    model = make_mlp(d_in=3, hidden=5)
    with pytest.raises(ValueError, match="weight and bias together|select the whole layer"):
        kronfluence_tracked_modules(model, ["0.weight"])
    assert kronfluence_tracked_modules(model, ["2"]) == (["2"], [])


# -- settings, damping, bad input, output routing ---------------------------------------------------------
def test_default_damping_is_kronfluences_heuristic_and_reported(regression_setup):
    model, train, test = regression_setup
    est = EKFAC(fisher="empirical").fit(model, MSE, train)
    damping = est.settings()["damping"]
    assert set(damping) == {"0", "2"} and all(v > 0 for v in damping.values())
    # the heuristic applied per layer equals an explicit damping when there is one layer
    lin = nn.Linear(3, 1).double()
    est = EKFAC(fisher="empirical").fit(lin, MSE, train)
    (value,) = est.info["damping"].values()
    torch.testing.assert_close(est.score(test), EKFAC(fisher="empirical", damping=value).fit(lin, MSE, train).score(test))


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="damping"):
        EKFAC(damping=-1.0)
    with pytest.raises(ValueError, match="fisher"):
        EKFAC(fisher="true")
    with pytest.raises(ValueError, match="batch_size"):
        EKFAC(batch_size=0)
    with pytest.raises(TypeError, match="Allowed"):
        build_estimator("ekfac", strategy="kfac")


def test_library_output_is_routed_quiet_by_default_visible_on_request(capsys, regression_setup):
    model, train, test = regression_setup
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        EKFAC(damping=0.01).fit(model, MSE, train).score(test)
    assert [str(w.message) for w in escaped] == []  # kronfluence's FutureWarnings went to our logger
    assert capsys.readouterr().err == ""
    EKFAC(damping=0.01, progress=True).fit(model, MSE, train)
    assert "%" in capsys.readouterr().err  # tqdm bars when asked for


def test_library_output_reissues_warnings_on_our_logger_and_restores_root_handlers(caplog):
    root = logging.getLogger()
    before = list(root.handlers)
    with caplog.at_level(logging.DEBUG, "lightning_fimoda"), library_output("somelib") as log:
        warnings.warn("internal detail", FutureWarning, stacklevel=1)
        warnings.warn("check your data", UserWarning, stacklevel=1)
        warnings.warn("check your data", UserWarning, stacklevel=1)  # repeated: reported once
        root.addHandler(logging.NullHandler())  # what logging.basicConfig() would do
    assert log.name == "lightning_fimoda.somelib" and root.handlers == before
    got = [(r.levelno, r.getMessage().split(" (")[0]) for r in caplog.records if r.name == log.name]
    assert got == [(logging.DEBUG, "FutureWarning from somelib: internal detail"),
                   (logging.WARNING, "UserWarning from somelib: check your data")]


def test_classification_runs_in_float64_with_sensible_scores():
    model = make_mlp(d_in=3, hidden=4, d_out=3)
    train, test = make_classification(30), make_classification(4, seed=2)
    oracle = dense_gauss_newton_scores(model, CE, train, test, damping=0.05)
    for name in STRATEGIES:
        scores = build_estimator(name, damping=0.05, seed=1).fit(model, CE, train).score(test)
        assert scores.dtype == torch.float64 and scores.shape == (4, 30)
        assert (row_cosine(scores, oracle) > 0.8).all(), (name, row_cosine(scores, oracle))


def test_kronfluences_memory_release_does_not_reset_compiled_graphs(monkeypatch, regression_setup):
    """kronfluence's release_memory calls torch.compiler.reset() (and a full gc) ~10 times per fit."""
    import kronfluence.computer.computer as computer
    import kronfluence.utils.state as state

    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    model, train, test = regression_setup
    EKFAC(damping=0.01).fit(model, MSE, train).score(test)
    assert resets == []
    assert computer.release_memory is state.release_memory  # restored afterwards


def test_kronfluences_process_wide_device_follows_the_model(regression_setup):
    """kronfluence's State singleton keeps the device of its first Analyzer; a model elsewhere resets it
    (here a stale state from a 'meta' run, as after a CUDA run when the next model is on the CPU)."""
    from kronfluence.utils.state import State

    model, train, test = regression_setup
    State._reset_state()
    State()._shared_state["device"] = torch.device("meta")
    scores = attribute(model, MSE, train, test, ["ekfac"])["ekfac"]
    assert State().device == torch.device("cpu") and torch.isfinite(scores).all()
