"""TRAK (M = 1) through traker against dense Gauss-Newton oracles, refits and its traps."""

from __future__ import annotations

import copy
import gc
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.func import functional_call, jacrev
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask, attribute, build_estimator
from lightning_fimoda.estimators.trak_adapter import TRAK

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


def corr(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.fixture(scope="module")
def regression_setup():
    model = make_mlp(d_in=3, hidden=4)
    return model, make_regression(40, d_in=3, seed=1), make_regression(6, d_in=3, seed=2)


# -- TRAK == dense Gauss-Newton influence ---------------------------------------------------------------
def test_without_projection_equals_the_gauss_newton_influence_function(regression_setup):
    model, train, test = regression_setup
    damping = 1e-3
    oracle = dense_gauss_newton_scores(model, MSE, train, test, damping)
    est = TRAK(proj_dim=None, damping=damping)
    scores = est.fit(model, MSE, train).score(test)
    assert corr(scores, oracle) > 0.999
    torch.testing.assert_close(scores, oracle, rtol=1e-3, atol=1e-4 * oracle.abs().max().item())
    p = sum(q.numel() for q in model.parameters())
    assert est.info["lambda_reg"] == pytest.approx(len(train) * damping / (2 * p))  # λ_reg = nλ/(h p), h = 2
    assert est.info["output_curvature"] == pytest.approx(2.0)


def test_with_a_2048_dimensional_projection_correlates_above_098(regression_setup):
    model, train, test = regression_setup
    damping = 1e-3
    oracle = dense_gauss_newton_scores(model, MSE, train, test, damping)
    est = TRAK(proj_dim=2048, damping=damping, projector_seed=1)
    scores = est.fit(model, MSE, train).score(test)
    assert corr(scores, oracle) > 0.98
    ratio = scores.norm() / oracle.norm()
    assert 0.8 < ratio < 1.25  # the damping conversion λ_reg = k n λ / (h p) keeps the scale
    assert est.info["projected_dim"] == 2048 and est.info["projector"] == "BasicProjector"


def test_projection_dimension_below_the_block_size_still_scores(regression_setup):
    """traker's single-block CPU projector is freed by finalize_features and then cannot score."""
    model, train, test = regression_setup
    oracle = dense_gauss_newton_scores(model, MSE, train, test, 1e-2)
    scores = TRAK(proj_dim=64, damping=1e-2).fit(model, MSE, train).score(test)
    assert corr(scores, oracle) > 0.9


def test_projection_is_seeded(regression_setup):
    model, train, test = regression_setup
    a = TRAK(proj_dim=128, projector_seed=3).fit(model, MSE, train).score(test)
    b = TRAK(proj_dim=128, projector_seed=3).fit(model, MSE, train).score(test)
    c = TRAK(proj_dim=128, projector_seed=4).fit(model, MSE, train).score(test)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_margin_model_output_matches_its_dense_formula():
    """Classification: ``τ = Q_j ∇m_jᵀ (Σ_i ∇m_i ∇m_iᵀ + nλ I)^{-1} g_x`` with ``Q = −(1 − p_y)``."""
    model = make_mlp(d_in=3, hidden=4, d_out=3)
    train, test = make_classification(30), make_classification(4, seed=2)
    damping = 0.01
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)

    def margins(p, data):
        logits = functional_call(model, p, (data.tensors[0],))
        y = data.tensors[1]
        correct = logits.gather(1, y[:, None])[:, 0]
        others = logits.masked_fill(torch.nn.functional.one_hot(y, 3).bool(), -torch.inf).logsumexp(dim=1)
        return correct - others

    def losses(p, data):
        return CE.loss_from_outputs(functional_call(model, p, (data.tensors[0],)), data.tensors)

    def flat(jac):
        return torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1)

    dm = flat(jacrev(margins)(params, train))
    prob_y = torch.sigmoid(margins(params, train))
    g_test = flat(jacrev(losses)(params, test))
    n, p = dm.shape
    oracle = (-(1 - prob_y))[None, :] * (g_test @ torch.linalg.solve(dm.T @ dm + n * damping * torch.eye(p, dtype=dm.dtype), dm.T))
    est = TRAK(proj_dim=None, damping=damping)
    scores = est.fit(model, CE, train).score(test)
    assert est.info["model_output"] == "margin"
    assert corr(scores, oracle) > 0.999
    torch.testing.assert_close(scores, oracle, rtol=1e-3, atol=1e-4 * oracle.abs().max().item())


# -- the sign test ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converged_regression():
    train, test = make_regression(20, d_in=2, seed=5), make_regression(4, d_in=2, seed=6)
    model = fit_to_convergence(make_mlp(d_in=2, hidden=3, seed=1), MSE, train)
    return model, train, test


@pytest.mark.parametrize("proj_dim", [None, 2048])
def test_sign_matches_leave_one_out_refits(converged_regression, proj_dim):
    model, train, test = converged_regression
    scores = TRAK(proj_dim=proj_dim, damping=SIGN_DAMPING).fit(model, MSE, train).score(test)
    assert_signs_match_refits(scores, model, MSE, train, test)


def test_sign_matches_leave_one_out_refits_for_classification():
    train, test = make_classification(30, d_in=2, classes=2, seed=3), make_classification(4, d_in=2, classes=2, seed=4)
    model = make_mlp(d_in=2, hidden=3, d_out=2, seed=2)
    scores = TRAK(proj_dim=None, damping=SIGN_DAMPING).fit(model, CE, train).score(test)
    assert_signs_match_refits(scores, model, CE, train, test)


# -- traps: fresh directories, memory maps, devices, precision, output ---------------------------------------
def test_running_twice_with_different_data_gives_different_correct_scores(tmp_path, regression_setup):
    model, train, test = regression_setup
    other = make_regression(40, d_in=3, seed=9)
    for out_dir in (None, tmp_path):
        est = TRAK(proj_dim=None, damping=1e-3, output_dir=out_dir)
        first = est.fit(model, MSE, train).score(test)
        second = est.fit(model, MSE, other).score(test)
        torch.testing.assert_close(second, dense_gauss_newton_scores(model, MSE, other, test, 1e-3),
                                   rtol=1e-3, atol=1e-4 * second.abs().max().item())
        assert (first - second).abs().max() > 1e-2 * first.abs().max()
        again = est.score(make_regression(3, d_in=3, seed=11))  # a second scoring of the same fit
        assert again.shape == (3, 40)
    assert len(list(tmp_path.iterdir())) == 2  # one fresh subdirectory per fit


def test_nothing_left_in_the_working_directory_and_scores_survive_cleanup(tmp_path, monkeypatch, regression_setup):
    model, train, test = regression_setup
    monkeypatch.chdir(tmp_path)
    est = TRAK(proj_dim=128)
    scores = est.fit(model, MSE, train).score(test)
    kept = scores.clone()
    workdir = est._workdir.path
    assert workdir.exists() and tmp_path not in workdir.parents
    attribute(model, MSE, train, test, ["trak"])
    assert list(tmp_path.iterdir()) == []
    del est
    gc.collect()
    assert not workdir.exists()
    assert not isinstance(scores.numpy(), np.memmap) and torch.equal(scores, kept)


def test_device_string_half_precision_and_model_untouched(regression_setup):
    model, train, test = regression_setup
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    est = TRAK(proj_dim=128).fit(model, MSE, train)
    assert est._traker.device == "cpu" and isinstance(est._traker.device, str)
    assert est._traker.dtype == torch.float32
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    with pytest.raises(ValueError, match="half_precision"):
        TRAK(half_precision=True).fit(model, MSE, train)


def test_damping_and_lambda_reg_are_the_same_knob(regression_setup):
    model, train, test = regression_setup
    a = TRAK(proj_dim=256, damping=0.01)
    sa = a.fit(model, MSE, train).score(test)
    b = TRAK(proj_dim=256, lambda_reg=a.info["lambda_reg"])
    sb = b.fit(model, MSE, train).score(test)
    torch.testing.assert_close(sa, sb)
    assert b.info["damping"] == pytest.approx(0.01)
    default = TRAK(proj_dim=None).fit(model, MSE, train)
    p = sum(q.numel() for q in model.parameters())
    x, y = train.tensors
    jac = jacrev(lambda th: functional_call(model, th, (x,))[:, 0])({n: q.detach() for n, q in model.named_parameters()})
    mean_eig = 2 * sum(j.pow(2).sum() for j in jac.values()) / (len(train) * p)  # trace(H_GN) / P
    assert default.info["damping"] == pytest.approx(0.1 * float(mean_eig), rel=1e-4)


def test_bad_settings_raise_clear_errors(regression_setup):
    model, train, _ = regression_setup
    with pytest.raises(ValueError, match="not both"):
        TRAK(damping=1.0, lambda_reg=1.0)
    with pytest.raises(ValueError, match="proj_dim"):
        TRAK(proj_dim=1)
    with pytest.raises(ValueError, match="model_output"):
        TRAK(model_output="logit")
    with pytest.raises(ValueError, match="margin"):
        TRAK(model_output="margin").fit(model, MSE, train)
    with pytest.raises(ValueError, match="one output per example"):
        TRAK().fit(make_mlp(d_in=3, d_out=2), MSE, make_regression(10, d_in=3))
    with pytest.raises(ValueError, match="CUDA"):
        TRAK(projector="cuda").fit(model, MSE, train)
    with pytest.raises(TypeError, match="Allowed"):
        build_estimator("trak", proj_type="normal")


def test_library_output_is_routed_quiet_by_default_visible_on_request(capsys, regression_setup):
    model, train, test = regression_setup
    root_handlers = list(logging.getLogger().handlers)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        TRAK(proj_dim=128).fit(model, MSE, train).score(test)
    assert [str(w.message) for w in escaped] == []
    assert capsys.readouterr().err == ""
    assert logging.getLogger().handlers == root_handlers  # traker's logging.basicConfig() undone
    TRAK(proj_dim=128, progress=True).fit(model, MSE, train).score(test)
    assert "Finalizing" in capsys.readouterr().err


def test_scored_subset_and_float32_model(regression_setup):
    model, train, test = regression_setup
    idx = torch.tensor([5, 0, 33])
    full = TRAK(proj_dim=None, damping=1e-3).fit(model, MSE, train).score(test)
    part = TRAK(proj_dim=None, damping=1e-3).fit(model, MSE, train, idx).score(test)
    torch.testing.assert_close(part, full[:, idx])
    model32 = copy.deepcopy(model).float()
    train32, test32 = (TensorDataset(*(t.float() for t in d.tensors)) for d in (train, test))
    s32 = TRAK(proj_dim=None, damping=1e-3).fit(model32, MSE, train32).score(test32)
    assert row_cosine(s32.double(), dense_gauss_newton_scores(model, MSE, train, test, 1e-3)).min() > 0.999


def test_registered_with_sensible_defaults(regression_setup):
    model, train, test = regression_setup
    out = attribute(model, SupervisedTask("mse"), train, test, ["trak", "grad_dot"])
    assert out["trak"].shape == (6, 40) and torch.isfinite(out["trak"]).all()
    assert (row_cosine(out["trak"], out["grad_dot"]) > 0).all()


def test_text_classification_task_gives_trak_the_margin():
    """The zoo's dict-batch task (SST-2 configs list TRAK): ``model_output`` is the margin of the logits
    the model returns for the batch, ``o_y − logsumexp_{c≠y} o_c``, checked against a one-hot formula."""
    from lightning_fimoda.zoo.models.text import TextClassificationTask

    class BagOfWords(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(11, 4), torch.nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask):
            assert attention_mask.dim() == 4  # the task hands over the additive [B, 1, L, L] mask
            return self.head(self.emb(input_ids).mean(dim=1))

    torch.manual_seed(0)
    model, task = BagOfWords(), TextClassificationTask()
    batch = task.collate([{"input_ids": torch.randint(1, 11, (n,)), "labels": torch.tensor(n % 3)} for n in (3, 5, 4)])
    logits = model(batch["input_ids"], batch["attention_mask"][:, None, None, :].expand(-1, 1, 5, 5))
    one_hot = torch.nn.functional.one_hot(batch["labels"], 3).bool()
    expected = logits[one_hot] - logits.masked_fill(one_hot, -torch.inf).logsumexp(dim=1)
    torch.testing.assert_close(task.model_output(model, batch), expected)
