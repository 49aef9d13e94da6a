"""Evaluating attribution scores against the further-training gold standard (SPEC §4).

Shapes: estimator scores ``[T, m]`` (``T`` test instances, ``m`` training instances of the LOO set
``J``), or ``[C, T, m]`` for a checkpoint-indexed estimator (one matrix per checkpoint, compared with
the gold standard at the same checkpoint); gold scores ``[T, m]`` or, per further-training checkpoint, ``[C, T, m]``; per-seed gold
differences ``[S, C, T, m]`` (:meth:`GoldStandard.differences`). Signs follow SPEC §1: positive =
the training instance helps the test instance (leaving it out raises ``f``).

- Agreement per test row: **cosine** similarity, or **Spearman** rank correlation (ties get their
  average rank). A row with no direction (all zeros for cosine, constant for Spearman) agrees ``0``.
- Over test rows: the mean and the standard error ``std / sqrt(T)`` (sample std, ``T − 1`` in the
  denominator; ``nan`` when ``T = 1``). Over checkpoints: one value per checkpoint, and the peak.
- Seed averaging: the ``S`` seeds split into ``⌊S/k⌋`` consecutive, non-overlapping groups of ``k``
  (leftover seeds unused); one gold standard per group; mean and standard error over all
  ``(group, test)`` pairs per checkpoint.
- Noise ceiling: agreement between the gold standards of two disjoint halves of the seeds (first
  ``⌊S/2⌋`` seeds against the next ``⌊S/2⌋``).
- Mislabel detection: scores summed over test instances; mislabelled points should be harmful
  (negative), so ``−sum`` is the detector's output and AUC-ROC its separation of flipped from clean.
- Top-k: per test instance, the ``k`` largest scores (most helpful) and the ``k`` smallest (most
  harmful), with their training-set indices.

The ``torchmetrics`` classes accumulate test rows over ``update`` calls (and gather them across
processes), so they can be fed in chunks; the functions compute the same numbers in one go.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "Agreement",
    "AgreementCurve",
    "AttributionAgreement",
    "MislabelDetectionAUROC",
    "NoiseCeiling",
    "SeedAveragedAgreement",
    "TopK",
    "agreement",
    "mislabel_auroc",
    "noise_ceiling",
    "rowwise_agreement",
    "seed_averaging",
    "seed_groups",
    "top_k_examples",
]

Method = Literal["cosine", "spearman"]
METHODS = ("cosine", "spearman")


class Agreement(NamedTuple):
    """Mean and standard error over test rows: scalars, or ``[C]`` curves over checkpoints."""

    mean: Tensor
    sem: Tensor

    def peak(self) -> tuple[int, float, float]:
        """``(checkpoint position, mean, sem)`` where the mean curve is largest (first on ties)."""
        if self.mean.dim() == 0:
            return 0, float(self.mean), float(self.sem)
        i = int(torch.argmax(torch.nan_to_num(self.mean, nan=-torch.inf)))
        return i, float(self.mean[i]), float(self.sem[i])


class TopK(NamedTuple):
    """Most helpful / most harmful training instances per test instance, each ``[T, k]``."""

    helpful_indices: Tensor
    helpful_scores: Tensor
    harmful_indices: Tensor
    harmful_scores: Tensor


# -- functional ------------------------------------------------------------------------------------
def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Agreement method must be one of {METHODS}, got {method!r}.")


def _check_pair(scores: Tensor, gold: Tensor) -> None:
    if scores.dim() < 1 or scores.shape[-1] < 2:
        raise ValueError(f"Need at least 2 training instances per row to compare, got shape {tuple(scores.shape)}.")
    if scores.shape != gold.shape:
        raise ValueError(f"Scores {tuple(scores.shape)} and gold {tuple(gold.shape)} must have the same shape.")
    for name, t in (("scores", scores), ("gold", gold)):
        if not torch.isfinite(t).all():
            raise ValueError(f"Non-finite values in the {name}: agreement would be meaningless.")


def _average_ranks(x: Tensor) -> Tensor:
    """0-based ranks along the last axis, tied values sharing their average rank."""
    ordered = x.sort(dim=-1).values.contiguous()
    x = x.contiguous()
    below = torch.searchsorted(ordered, x, right=False)
    upto = torch.searchsorted(ordered, x, right=True)
    return (below + upto - 1).to(torch.float64) / 2


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(dot))


def rowwise_agreement(scores: Tensor, gold: Tensor, method: Method = "cosine") -> Tensor:
    """Agreement of each row of ``scores`` with the same row of ``gold`` (``[..., m]`` → ``[...]``, float64)."""
    _check_method(method)
    _check_pair(scores, gold)
    a, b = scores.detach().to(torch.float64), gold.detach().to(torch.float64)
    if method == "spearman":
        a, b = _average_ranks(a), _average_ranks(b)
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return _cosine(a, b)


def _mean_sem(values: Tensor, dim: int = 0) -> Agreement:
    n = values.shape[dim]
    if n == 0:
        raise ValueError("No rows to average: the agreement metric saw no data.")
    mean = values.mean(dim)
    if n < 2:
        return Agreement(mean, torch.full_like(mean, float("nan")))
    return Agreement(mean, values.std(dim, correction=1) / n**0.5)


def _per_checkpoint(scores: Tensor, gold: Tensor, method: Method) -> Tensor:
    """Agreement ``[C, T]`` of ``scores`` with ``gold [C, T, m]``: ``scores [T, m]`` is compared with every
    checkpoint; checkpoint-indexed ``scores [C, T, m]`` at checkpoint ``c`` with the gold standard at ``c``."""
    if scores.dim() == 2:
        scores = scores.unsqueeze(0).expand_as(gold)
    return rowwise_agreement(scores, gold, method)


def agreement(scores: Tensor, gold: Tensor, method: Method = "cosine") -> Agreement:
    """Mean ± s.e. over test rows.

    ``scores [T, m]`` with ``gold [T, m]`` (scalars) or ``[C, T, m]`` (curves ``[C]``); checkpoint-indexed
    ``scores [C, T, m]`` with ``gold [C, T, m]`` are compared checkpoint by checkpoint (curves ``[C]``).
    """
    if scores.dim() not in (2, 3):
        raise ValueError(f"scores must be [n_test, m] or [checkpoints, n_test, m], got shape {tuple(scores.shape)}.")
    if gold.dim() == 2 and scores.dim() == 2:
        return _mean_sem(rowwise_agreement(scores, gold, method))
    if gold.dim() == 3:
        return _mean_sem(_per_checkpoint(scores, gold, method), dim=1)
    raise ValueError(
        f"gold must be [n_test, m] or [checkpoints, n_test, m] (the latter for checkpoint-indexed scores "
        f"{tuple(scores.shape)}), got shape {tuple(gold.shape)}."
    )


def seed_groups(num_seeds: int, k: int) -> list[list[int]]:
    """Positions of ``⌊S/k⌋`` consecutive, non-overlapping groups of ``k`` seeds."""
    if k < 1:
        raise ValueError(f"Seeds per group must be >= 1, got {k}.")
    if k > num_seeds:
        raise ValueError(f"Cannot form a group of {k} seeds from {num_seeds}.")
    return [list(range(g * k, (g + 1) * k)) for g in range(num_seeds // k)]


def _check_differences(differences: Tensor) -> None:
    if differences.dim() != 4:
        raise ValueError(
            f"differences must be [seeds, checkpoints, n_test, m] (GoldStandard.differences()), "
            f"got shape {tuple(differences.shape)}."
        )


def _seed_averaged_rows(scores: Tensor, differences: Tensor, k: int, method: Method) -> Tensor:
    """Per-(group, test) agreement ``[G·T, C]`` with the gold standard of each group of ``k`` seeds.

    ``scores``: ``[T, m]``, or checkpoint-indexed ``[C, T, m]`` (compared at the same checkpoint)."""
    _check_differences(differences)
    groups = seed_groups(differences.shape[0], k)
    gold = torch.stack([differences[g].mean(0) for g in groups])  # [G, C, T, m]
    per = rowwise_agreement(scores.expand_as(gold), gold, method)  # [G, C, T]
    return per.permute(0, 2, 1).reshape(-1, per.shape[1])


def seed_averaging(
    scores: Tensor, differences: Tensor, ks: Iterable[int], method: Method = "cosine"
) -> dict[int, Agreement]:
    """For each ``k``: agreement curve ``[C]`` with per-group gold standards of ``k`` seeds (SPEC §4)."""
    return {int(k): _mean_sem(_seed_averaged_rows(scores, differences, int(k), method)) for k in ks}


def _split_half_rows(differences: Tensor, method: Method) -> Tensor:
    _check_differences(differences)
    half = differences.shape[0] // 2
    if half < 1:
        raise ValueError("The noise ceiling needs at least 2 seeds (two disjoint halves).")
    first = differences[:half].mean(0)
    second = differences[half : 2 * half].mean(0)
    return rowwise_agreement(first, second, method).T  # [T, C]


def noise_ceiling(differences: Tensor, method: Method = "cosine") -> Agreement:
    """Split-half agreement of the gold standard with itself, a curve ``[C]`` (SPEC §4)."""
    return _mean_sem(_split_half_rows(differences, method))


def _check_flipped(scores: Tensor, flipped: Tensor) -> Tensor:
    flipped = torch.as_tensor(flipped).reshape(-1)
    if scores.dim() != 2 or scores.shape[1] != flipped.numel():
        raise ValueError(
            f"scores must be [n_test, m] with m = {flipped.numel()} flags, got shape {tuple(scores.shape)}."
        )
    if flipped.dtype != torch.bool and not ((flipped == 0) | (flipped == 1)).all():
        raise ValueError("flipped must be a boolean / 0-1 mask over the scored training instances.")
    return flipped.bool()


def mislabel_auroc(scores: Tensor, flipped: Tensor) -> Tensor:
    """AUC-ROC of ``−scores.sum(0)`` for the ``flipped [m]`` mask (mislabelled points should be harmful)."""
    flipped = _check_flipped(scores, flipped)
    if flipped.all() or not flipped.any():
        raise ValueError("Mislabel AUC needs both flipped and clean training instances.")
    return binary_auroc(-scores.detach().to(torch.float64).sum(0), flipped.long())


def top_k_examples(scores: Tensor, k: int, train_indices: Tensor | None = None) -> TopK:
    """Per test row of ``scores [T, N]``: the ``k`` largest (helpful) and ``k`` smallest (harmful) scores.

    Indices are dataset indices (``train_indices[column]``) when ``train_indices [N]`` is given, else
    columns. Ties keep the lower column first.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_test, n_train], got shape {tuple(scores.shape)}.")
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of training instances ({n}), got {k}.")
    columns = torch.arange(n) if train_indices is None else torch.as_tensor(train_indices).reshape(-1)
    if columns.numel() != n:
        raise ValueError(f"train_indices has {columns.numel()} entries for {n} score columns.")
    order = torch.sort(scores.detach().cpu(), dim=1, descending=True, stable=True).indices
    helpful = order[:, :k]
    harmful = torch.sort(scores.detach().cpu(), dim=1, stable=True).indices[:, :k]
    s = scores.detach().cpu()
    return TopK(columns[helpful], s.gather(1, helpful), columns[harmful], s.gather(1, harmful))


# -- torchmetrics classes ----------------------------------------------------------------------------
class _RowsMetric(Metric):
    """Collects per-row agreement values ``[rows, C]`` and reduces them to mean ± s.e."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, method: Method = "cosine", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_method(method)
        self.method = method
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def _reduce(self) -> Agreement:
        if not self.rows:
            raise ValueError(f"{type(self).__name__}.compute() called before update().")
        return _mean_sem(dim_zero_cat(self.rows))


class AttributionAgreement(_RowsMetric):
    """Mean ± s.e. over test rows of the agreement between ``scores [T, m]`` and ``gold [T, m]``.

    ``compute()`` returns an :class:`Agreement` of scalars. ``method``: ``"cosine"`` or ``"spearman"``.
    """

    def update(self, scores: Tensor, gold: Tensor) -> None:
        if scores.dim() != 2:
            raise ValueError(f"scores must be [n_test, m], got shape {tuple(scores.shape)}.")
        self.rows.append(rowwise_agreement(scores, gold, self.method).unsqueeze(1))

    def compute(self) -> Agreement:
        mean, sem = self._reduce()
        return Agreement(mean[0], sem[0])


class AgreementCurve(_RowsMetric):
    """Agreement of ``scores [T, m]`` with the gold standard at each checkpoint, ``gold [C, T, m]``;
    checkpoint-indexed ``scores [C, T, m]`` are compared with the gold standard at the same checkpoint.

    ``compute()`` returns an :class:`Agreement` of ``[C]`` curves; ``.peak()`` gives the maximum.
    """

    def update(self, scores: Tensor, gold: Tensor) -> None:
        if gold.dim() != 3:
            raise ValueError(f"gold must be [checkpoints, n_test, m], got shape {tuple(gold.shape)}.")
        self.rows.append(_per_checkpoint(scores, gold, self.method).T)

    def compute(self) -> Agreement:
        return self._reduce()


class SeedAveragedAgreement(_RowsMetric):
    """Agreement curve ``[C]`` with gold standards from groups of ``k`` seeds (SPEC §4 seed averaging).

    ``update(scores [T, m], differences [S, C, T, m])``; mean and s.e. run over ``(group, test)`` pairs.
    """

    def __init__(self, k: int, method: Method = "cosine", **kwargs: Any) -> None:
        super().__init__(method, **kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        self.k = k

    def update(self, scores: Tensor, differences: Tensor) -> None:
        self.rows.append(_seed_averaged_rows(scores, differences, self.k, self.method))

    def compute(self) -> Agreement:
        return self._reduce()


class NoiseCeiling(_RowsMetric):
    """Split-half noise ceiling ``[C]``: the gold standard of one half of the seeds against the other.

    ``update(differences [S, C, T, m])``.
    """

    higher_is_better = None

    def update(self, differences: Tensor) -> None:
        self.rows.append(_split_half_rows(differences, self.method))

    def compute(self) -> Agreement:
        return self._reduce()


class MislabelDetectionAUROC(Metric):
    """AUC-ROC of detecting flipped labels from attribution scores (SPEC §4).

    Each ``update(scores [T, m], flipped [m])`` brings all test rows for a set of ``m`` training
    instances; their scores are summed over the tests and negated (harmful = suspicious).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("suspicion", default=[], dist_reduce_fx="cat")
        self.add_state("flipped", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, flipped: Tensor) -> None:
        flags = _check_flipped(scores, flipped)
        self.suspicion.append(-scores.detach().to(torch.float64).sum(0))
        self.flipped.append(flags.long().to(scores.device))

    def compute(self) -> Tensor:
        if not self.suspicion:
            raise ValueError("MislabelDetectionAUROC.compute() called before update().")
        flags = dim_zero_cat(self.flipped)
        if flags.all() or not flags.any():
            raise ValueError("Mislabel AUC needs both flipped and clean training instances.")
        return binary_auroc(dim_zero_cat(self.suspicion), flags)
