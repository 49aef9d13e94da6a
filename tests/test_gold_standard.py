"""GoldStandard container: adjustments, seed subsets, persistence."""

from __future__ import annotations

import pytest
import torch

from lightning_fimoda import GoldStandard


def make_gold(full: bool = True) -> GoldStandard:
    g = torch.Generator().manual_seed(0)
    s, c, t, m = 3, 2, 4, 5
    return GoldStandard(
        loo=torch.randn(s, c, t, m, generator=g, dtype=torch.float64),
        full=torch.randn(s, c, t, generator=g, dtype=torch.float64) if full else None,
        checkpoints=[1, 2],
        checkpoint_unit="epoch",
        seeds=[10, 11, 12],
        loo_indices=torch.tensor([0, 3, 4, 7, 9]),
        test_indices=torch.arange(4),
        config={"lr": 0.01, "optimizer": "sgd"},
    )


def test_mean_adjustment_by_hand():
    gold = make_gold()
    s = 1
    d = gold.loo[s] - gold.full[s].unsqueeze(-1)  # D_{s,t}(j, x)
    want = d - d.mean(dim=-1, keepdim=True)  # the full run cancels
    torch.testing.assert_close(gold.differences("mean")[s], want)
    torch.testing.assert_close(gold.scores("mean"), gold.differences("mean").mean(0))
    torch.testing.assert_close(gold.scores("mean").sum(-1), torch.zeros(2, 4, dtype=torch.float64))


def test_full_adjustment_and_seed_subsets():
    gold = make_gold()
    want = (gold.loo[[0, 2]] - gold.full[[0, 2]].unsqueeze(-1)).mean(0)
    torch.testing.assert_close(gold.scores("full", seeds=[10, 12]), want)
    with pytest.raises(KeyError, match="not run"):
        gold.scores("mean", seeds=[99])
    with pytest.raises(ValueError, match="'mean' or 'full'"):
        gold.scores("median")


def test_full_adjustment_needs_full_run():
    gold = make_gold(full=False)
    assert gold.adjustments == ("mean",)
    gold.scores("mean")
    with pytest.raises(ValueError, match="full-data run, which was skipped"):
        gold.scores("full")


def test_shape_validation():
    gold = make_gold()
    with pytest.raises(ValueError, match="expected"):
        GoldStandard(gold.loo, None, [1], "epoch", gold.seeds, gold.loo_indices, gold.test_indices)


@pytest.mark.parametrize("full", [True, False])
def test_save_load_round_trip(tmp_path, full):
    gold = make_gold(full)
    path = gold.save(tmp_path / "sub" / "gold.safetensors")
    back = GoldStandard.load(path)
    assert back.equals(gold)
    assert [p.name for p in path.parent.iterdir()] == ["gold.safetensors"]  # no temporary files left
