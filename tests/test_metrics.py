"""Evaluation metrics against direct Python computations (no numpy / scipy)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_fimoda.evaluation.metrics import (
    AgreementCurve,
    AttributionAgreement,
    MislabelDetectionAUROC,
    NoiseCeiling,
    SeedAveragedAgreement,
    agreement,
    mislabel_auroc,
    noise_ceiling,
    rowwise_agreement,
    seed_averaging,
    seed_groups,
    top_k_examples,
)


# -- direct oracles -----------------------------------------------------------------------------------
def py_cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return 0.0 if na == 0 or nb == 0 else dot / (na * nb)


def py_ranks(a: list[float]) -> list[float]:
    """1-based ranks, ties averaged."""
    out = []
    for x in a:
        less = sum(1 for y in a if y < x)
        equal = sum(1 for y in a if y == x)
        out.append(less + (equal + 1) / 2)
    return out


def py_pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    return py_cosine([x - ma for x in a], [y - mb for y in b])


def py_spearman(a: list[float], b: list[float]) -> float:
    return py_pearson(py_ranks(a), py_ranks(b))


def py_mean_sem(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std / math.sqrt(n)


def py_auc(suspicion: list[float], flipped: list[bool]) -> float:
    pos = [s for s, f in zip(suspicion, flipped) if f]
    neg = [s for s, f in zip(suspicion, flipped) if not f]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- per-row agreement --------------------------------------------------------------------------------
@pytest.mark.parametrize("method, oracle", [("cosine", py_cosine), ("spearman", py_spearman)])
def test_rowwise_agreement_matches_direct(method, oracle):
    scores, gold = rand(6, 9, seed=1), rand(6, 9, seed=2)
    gold[0] = scores[0] * 3.0  # perfect agreement
    scores[1, :4] = 0.5  # ties
    gold[2, 3:6] = -1.0
    got = rowwise_agreement(scores, gold, method)
    want = [oracle(scores[t].tolist(), gold[t].tolist()) for t in range(6)]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert got[0] == pytest.approx(1.0)


def test_rowwise_agreement_without_direction_is_zero():
    scores = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    gold = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert rowwise_agreement(scores, gold, "cosine").tolist() == [0.0, pytest.approx(py_cosine([1, 1, 1], [1, 2, 3]))]
    assert rowwise_agreement(scores, gold, "spearman").tolist() == [0.0, 0.0]


def test_spearman_is_rank_based_and_cosine_scale_free():
    scores, gold = rand(4, 12, seed=3), rand(4, 12, seed=4)
    base = rowwise_agreement(scores, gold, "spearman")
    assert torch.allclose(rowwise_agreement(scores.pow(3) * 7 + 2, gold, "spearman"), base)
    cos = rowwise_agreement(scores, gold, "cosine")
    assert torch.allclose(rowwise_agreement(scores * torch.tensor([[2.0], [5.0], [0.1], [9.0]]), gold), cos)


@given(st.lists(st.integers(-3, 3), min_size=2, max_size=8), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_spearman_with_ties_property(values, seed):
    a = torch.tensor([values], dtype=torch.float64)
    b = rand(1, len(values), seed=seed).round()
    got = float(rowwise_agreement(a, b, "spearman"))
    ra, rb = py_ranks(a[0].tolist()), py_ranks(b[0].tolist())
    constant = len(set(ra)) == 1 or len(set(rb)) == 1
    assert got == pytest.approx(0.0 if constant else py_pearson(ra, rb), abs=1e-12)


def test_agreement_mean_and_standard_error():
    scores, gold = rand(7, 5, seed=5), rand(7, 5, seed=6)
    for method, oracle in (("cosine", py_cosine), ("spearman", py_spearman)):
        rows = [oracle(scores[t].tolist(), gold[t].tolist()) for t in range(7)]
        mean, sem = agreement(scores, gold, method)
        assert (float(mean), float(sem)) == pytest.approx(py_mean_sem(rows), abs=1e-12)


def test_agreement_curve_over_checkpoints_and_peak():
    scores, gold = rand(5, 6, seed=7), rand(4, 5, 6, seed=8)
    gold[2] = scores + 0.01 * gold[2]  # checkpoint 2 agrees best
    curve = agreement(scores, gold)
    for c in range(4):
        rows = [py_cosine(scores[t].tolist(), gold[c, t].tolist()) for t in range(5)]
        assert (float(curve.mean[c]), float(curve.sem[c])) == pytest.approx(py_mean_sem(rows), abs=1e-12)
    i, mean, sem = curve.peak()
    assert i == 2 and mean == pytest.approx(float(curve.mean[2])) and sem == float(curve.sem[2])


def test_single_test_row_has_undefined_standard_error():
    mean, sem = agreement(rand(1, 4, seed=1), rand(1, 4, seed=2))
    assert math.isfinite(float(mean)) and math.isnan(float(sem))


@pytest.mark.parametrize(
    "scores, gold, match",
    [
        (torch.zeros(3, 4), torch.zeros(3, 5), "same shape"),
        (torch.zeros(3, 1), torch.zeros(3, 1), "at least 2"),
        (torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2), "Non-finite"),
    ],
)
def test_agreement_rejects_bad_input(scores, gold, match):
    with pytest.raises(ValueError, match=match):
        agreement(scores, gold)


def test_unknown_method():
    with pytest.raises(ValueError, match="cosine"):
        rowwise_agreement(torch.ones(2, 3), torch.ones(2, 3), "pearson")


# -- seed averaging and noise ceiling ------------------------------------------------------------------
def test_seed_groups_are_disjoint_and_consecutive():
    assert seed_groups(7, 3) == [[0, 1, 2], [3, 4, 5]]
    assert seed_groups(4, 1) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="group of 5 seeds from 4"):
        seed_groups(4, 5)


def test_seed_averaging_matches_direct():
    S, C, T, m = 5, 3, 4, 6
    diffs, scores = rand(S, C, T, m, seed=9), rand(T, m, seed=10)
    out = seed_averaging(scores, diffs, [1, 2, 5], "cosine")
    for k in (1, 2, 5):
        groups = [list(range(g * k, (g + 1) * k)) for g in range(S // k)]
        for c in range(C):
            rows = []
            for grp in groups:
                for t in range(T):
                    gold = [sum(float(diffs[s, c, t, j]) for s in grp) / k for j in range(m)]
                    rows.append(py_cosine(scores[t].tolist(), gold))
            mean, sem = py_mean_sem(rows)
            assert float(out[k].mean[c]) == pytest.approx(mean, abs=1e-12)
            assert float(out[k].sem[c]) == pytest.approx(sem, abs=1e-12)
    # all seeds in one group is the ordinary agreement with the seed-averaged gold standard
    assert torch.allclose(out[5].mean, agreement(scores, diffs.mean(0)).mean)


def test_noise_ceiling_matches_direct():
    S, C, T, m = 5, 2, 3, 4
    diffs = rand(S, C, T, m, seed=11)
    ceiling = noise_ceiling(diffs, "spearman")
    for c in range(C):
        rows = []
        for t in range(T):
            a = [sum(float(diffs[s, c, t, j]) for s in (0, 1)) / 2 for j in range(m)]
            b = [sum(float(diffs[s, c, t, j]) for s in (2, 3)) / 2 for j in range(m)]
            rows.append(py_spearman(a, b))
        assert (float(ceiling.mean[c]), float(ceiling.sem[c])) == pytest.approx(py_mean_sem(rows), abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        noise_ceiling(diffs[:1])


# -- mislabel detection and top-k -----------------------------------------------------------------------
def test_mislabel_auroc_matches_pairwise_count():
    scores = rand(4, 10, seed=12)
    flipped = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    scores[:, 3] = -5.0  # clearly harmful flipped point
    suspicion = [-sum(float(scores[t, j]) for t in range(4)) for j in range(10)]
    # torchmetrics' AUROC computes in float32
    assert float(mislabel_auroc(scores, flipped)) == pytest.approx(py_auc(suspicion, flipped.tolist()), abs=1e-6)
    # harmful flipped points are detected: scores = -flags gives AUC 1
    assert float(mislabel_auroc(-flipped.double().expand(3, 10), flipped)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both flipped and clean"):
        mislabel_auroc(scores, torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="m = 9 flags"):
        mislabel_auroc(scores, flipped[:9])


def test_top_k_examples():
    scores = torch.tensor([[0.25, -1.0, 2.0, 0.0, -0.5], [1.0, 1.0, -2.0, 0.5, 3.0]])
    train_idx = torch.tensor([10, 11, 12, 13, 14])
    top = top_k_examples(scores, 2, train_idx)
    assert top.helpful_indices.tolist() == [[12, 10], [14, 10]]
    assert top.helpful_scores.tolist() == [[2.0, 0.25], [3.0, 1.0]]
    assert top.harmful_indices.tolist() == [[11, 14], [12, 13]]
    assert top.harmful_scores.tolist() == [[-1.0, -0.5], [-2.0, 0.5]]
    assert top_k_examples(scores, 1).helpful_indices.tolist() == [[2], [4]]
    with pytest.raises(ValueError, match="k must be between 1 and"):
        top_k_examples(scores, 6)


# -- torchmetrics classes: chunked updates give the functional numbers ----------------------------------
def test_metric_classes_accumulate_test_rows():
    S, C, T, m = 4, 3, 8, 5
    diffs, scores = rand(S, C, T, m, seed=13), rand(T, m, seed=14)
    gold = diffs.mean(0)
    parts = [slice(0, 3), slice(3, 8)]

    single = AttributionAgreement("spearman")
    curve = AgreementCurve("cosine")
    seeds = SeedAveragedAgreement(2)
    ceiling = NoiseCeiling()
    for p in parts:
        single.update(scores[p], gold[-1, p])
        curve.update(scores[p], gold[:, p])
        seeds.update(scores[p], diffs[:, :, p])
        ceiling.update(diffs[:, :, p])
    want = agreement(scores, gold[-1], "spearman")
    assert torch.allclose(single.compute().mean, want.mean) and torch.allclose(single.compute().sem, want.sem)
    for got, want in (
        (curve.compute(), agreement(scores, gold)),
        (ceiling.compute(), noise_ceiling(diffs)),
    ):
        assert torch.allclose(got.mean, want.mean) and torch.allclose(got.sem, want.sem)
    # seed averaging pools (group, test) pairs: same mean; compare with the functional result
    want = seed_averaging(scores, diffs, [2])[2]
    got = seeds.compute()
    assert torch.allclose(got.mean, want.mean) and torch.allclose(got.sem, want.sem)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_mislabel_metric_and_empty_compute():
    scores = rand(3, 8, seed=15)
    flipped = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    metric = MislabelDetectionAUROC()
    metric.update(scores[:, :4], flipped[:4])
    metric.update(scores[:, 4:], flipped[4:])
    assert float(metric.compute()) == pytest.approx(float(mislabel_auroc(scores, flipped)))
    with pytest.raises(ValueError, match="before update"):
        AttributionAgreement().compute()


# -- checkpoint-indexed scores (issue 15.4) ----------------------------------------------------------------
def test_checkpoint_indexed_scores_are_compared_at_the_same_checkpoint():
    gold = rand(3, 4, 6, seed=1)
    scores = gold * torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64)[:, None, None]  # same direction per c
    curve = agreement(scores, gold)
    assert torch.allclose(curve.mean, torch.ones(3, dtype=torch.float64), atol=1e-12)
    other = agreement(rand(3, 4, 6, seed=2), gold)
    noise = rand(3, 4, 6, seed=2)
    by_hand = [sum(py_cosine(noise[c, t].tolist(), gold[c, t].tolist()) for t in range(4)) / 4 for c in range(3)]
    assert other.mean.tolist() == pytest.approx(by_hand, abs=1e-12)
    metric = AgreementCurve()
    metric.update(noise[:, :2], gold[:, :2])
    metric.update(noise[:, 2:], gold[:, 2:])
    assert torch.allclose(metric.compute().mean, other.mean, atol=1e-12)
    differences = gold.unsqueeze(0).expand(4, -1, -1, -1)  # 4 identical seeds
    assert torch.allclose(seed_averaging(scores, differences, [2])[2].mean, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        agreement(scores[:2], gold)
