"""AttributionReport: evaluation numbers, exact save/load round trip, markdown, figures, profiling."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from lightning_fimoda import GoldStandard, GradientCache, SupervisedTask, attribute
from lightning_fimoda.attribute import run_estimators
from lightning_fimoda.cli import main as fimoda_main
from lightning_fimoda.evaluation.metrics import agreement, noise_ceiling, seed_averaging, top_k_examples
from lightning_fimoda.evaluation.plotting import render_figures, save_figures
from lightning_fimoda.evaluation.report import AttributionReport, jsonable
from lightning_fimoda.profiling import PeakMemory

from .conftest import make_mlp, make_regression


def rand(*shape: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_gold(full: bool = True, seeds: int = 4) -> GoldStandard:
    S, C, T, m = seeds, 3, 4, 5
    return GoldStandard(
        loo=rand(S, C, T, m, seed=1),
        full=rand(S, C, T, seed=2) if full else None,
        checkpoints=[2, 4, 6],
        checkpoint_unit="step",
        seeds=list(range(10, 10 + S)),
        loo_indices=torch.tensor([7, 2, 9, 4, 0]),
        test_indices=torch.tensor([3, 1, 0, 2]),
        config={"lr": 0.01, "optimizer": "sgd"},
    )


def make_report(gold: GoldStandard | None = None, **kwargs) -> AttributionReport:
    train_idx = torch.arange(10)
    test_idx = torch.arange(4)
    defaults = dict(
        scores={"grad_dot": rand(4, 10, seed=3), "cg (λ=0.1)": rand(4, 10, seed=4, dtype=torch.float32)},
        train_indices=train_idx,
        test_indices=test_idx,
        gold=gold,
        seconds={"grad_dot": 0.125, "cg (λ=0.1)": 1.0 / 3.0},
        peak_memory={"grad_dot": 1 << 20, "cg (λ=0.1)": 12345},
        memory_kind="test",
        settings={"grad_dot": {"params": None}, "cg (λ=0.1)": {"damping": 0.1, "shape": (2, 3), "dtype": torch.float64}},
        mislabeled=torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool),
        info={"model": "MLP", "versions": {"torch": torch.__version__}},
    )
    defaults.update(kwargs)
    return AttributionReport.from_scores(**defaults)


def test_evaluation_aligns_columns_and_rows_with_the_gold_standard():
    gold = make_gold()
    report = make_report(gold)
    scores = report.scores["grad_dot"]
    aligned = scores[gold.test_indices][:, gold.loo_indices]
    assert torch.equal(report.aligned_scores("grad_dot"), aligned)
    for adjust in ("mean", "full"):
        for method in ("cosine", "spearman"):
            got, want = report.agreement("grad_dot", adjust, method), agreement(aligned, gold.scores(adjust), method)
            assert torch.equal(got.mean, want.mean) and torch.equal(got.sem, want.sem)
        ceiling = report.noise_ceiling(adjust)
        assert torch.equal(ceiling.mean, noise_ceiling(gold.differences(adjust)).mean)
        curves = report.seed_averaging("grad_dot", adjust)
        assert report.seed_ks == [1, 2, 4] and set(curves) == {1, 2, 4}
        assert torch.equal(curves[2].mean, seed_averaging(aligned, gold.differences(adjust), [2])[2].mean)
    row = report.table("mean")[0]
    i, mean, sem = report.agreement("grad_dot").peak()
    assert row["peak_cosine"] == (mean, sem, gold.checkpoints[i])


def test_gold_indices_must_be_scored():
    gold = make_gold()
    with pytest.raises(ValueError, match=r"LOO \(training\) indices \[7, 9\] were not scored"):
        make_report(gold, scores={"a": rand(4, 6)}, train_indices=torch.arange(6), seconds={}, peak_memory={},
                    settings={}, mislabeled=None)
    with pytest.raises(ValueError, match="expected \\(4, 10\\)"):
        make_report(None, scores={"a": rand(4, 9)})
    with pytest.raises(ValueError, match="seed_ks \\[8\\]"):
        make_report(gold, seed_ks=[1, 8])
    with pytest.raises(ValueError, match="no gold standard"):
        make_report(None).agreement("grad_dot")


@pytest.mark.parametrize("gold", [None, make_gold(full=False), make_gold(full=True)])
def test_save_load_round_trip_is_exact(tmp_path, gold):
    report = make_report(gold)
    report.save(tmp_path / "run")
    loaded = AttributionReport.load(tmp_path / "run")
    assert loaded.equals(report)
    assert loaded.scores["cg (λ=0.1)"].dtype == torch.float32
    assert loaded.seconds["cg (λ=0.1)"] == 1.0 / 3.0
    assert loaded.settings["cg (λ=0.1)"] == {"damping": 0.1, "shape": [2, 3], "dtype": "torch.float64"}
    assert loaded.to_markdown() == report.to_markdown()
    assert (tmp_path / "run" / "report.md").read_text() == report.to_markdown()
    meta = json.loads((tmp_path / "run" / "report.json").read_text())
    assert meta["labels"] == ["grad_dot", "cg (λ=0.1)"]
    other = make_report(gold, seconds={"grad_dot": 0.5, "cg (λ=0.1)": 1.0})
    assert not other.equals(report)


def test_save_accepts_transposed_and_shared_scores(tmp_path):
    """A transposed score matrix (e.g. TRAK's) and two views of one tensor save and load exactly."""
    base = rand(10, 4, seed=5)
    scores = {"grad_dot": base.T, "cg (λ=0.1)": base.T[:, :]}
    report = make_report(scores=scores)
    report.save(tmp_path / "run")
    loaded = AttributionReport.load(tmp_path / "run")
    assert torch.equal(loaded.scores["grad_dot"], base.T) and torch.equal(loaded.scores["cg (λ=0.1)"], base.T)


def test_fimoda_report_regenerates_identical_markdown_and_figures(tmp_path, capsys):
    report = make_report(make_gold())
    run_dir = report.save(tmp_path / "run")
    original = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    assert fimoda_main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == original
    for name in ("agreement_mean_cosine", "agreement_full_spearman", "seed_averaging_mean", "sorted_scores"):
        assert (run_dir / f"{name}.png").stat().st_size > 10_000
    assert "peak cosine" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="No attribution report"):
        fimoda_main(["report", str(tmp_path / "nothing")])


def test_markdown_and_summary_content():
    report = make_report(make_gold())
    md = report.to_markdown()
    for text in (
        "## Agreement with further training (mean adjustment)",
        "## Agreement with further training (full adjustment)",
        "noise ceiling (split-half)",
        "### Seed averaging (mean adjustment)",
        "## Mislabel detection (3 flipped of 10",
        "## Most helpful / most harmful",
        "## Estimator settings",
        "torch " + torch.__version__,
    ):
        assert text in md
    _, mean, sem = report.agreement("grad_dot").peak()
    assert f"| grad_dot | {mean:.3f} ± {sem:.3f} |" in md
    summary = report.summary()
    assert summary.splitlines()[1].split()[:3] == ["estimator", "peak", "cosine"]
    assert "noise ceiling" in summary
    no_gold = make_report(None).to_markdown()
    assert "## Cost" in no_gold and "Agreement" not in no_gold


def test_figures_without_gold_standard(tmp_path):
    figures = render_figures(make_report(None))
    assert list(figures) == ["sorted_scores"]
    paths = save_figures(figures, tmp_path)
    assert paths["sorted_scores"].stat().st_size > 10_000


def test_jsonable():
    assert jsonable({1: (torch.tensor(2.5), [None, True]), "x": torch.tensor([1, 2])}) == {"1": [2.5, [None, True]], "x": [1, 2]}
    assert jsonable(object).startswith("<class")


# -- profiling -----------------------------------------------------------------------------------------
def test_run_estimators_with_memory_scores_equal_attribute_and_record_cost():
    model, task = make_mlp(), SupervisedTask("mse")
    train, test = make_regression(12), make_regression(3, seed=5)
    runs = run_estimators(model, task, train, test, ["grad_dot", "grad_cos"], train_indices=[1, 4, 7, 9],
                          share_gradients=False, measure_memory=True)
    direct = attribute(model, task, train, test, ["grad_dot", "grad_cos"], train_indices=[1, 4, 7, 9])
    for run in runs:
        assert torch.allclose(run.scores, direct[run.label], rtol=1e-12, atol=0)
        assert run.seconds > 0 and run.peak_memory >= 0 and run.settings["estimator"] == run.label
    shared = run_estimators(model, task, train, test, ["grad_dot"], measure_memory=True)
    assert shared[0].scores.shape == (3, 12) and shared[0].peak_memory >= 0
    assert run_estimators(model, task, train, test, ["grad_dot"])[0].peak_memory is None  # not measured
    with pytest.raises(ValueError, match="share_gradients=False"):
        run_estimators(model, task, train, test, ["grad_dot"], cache=GradientCache(), share_gradients=False)


def test_peak_memory_sees_a_large_cpu_allocation():
    with PeakMemory("cpu") as meter:
        block = torch.ones(40 * 2**20 // 4)  # 40 MiB, touched, alive until the block ends
        block += 1
    del block
    assert meter.peak_bytes >= 30 * 2**20
    assert "resident set size" in meter.kind


def test_peak_memory_is_not_hidden_by_garbage_collected_during_the_block():
    cycle: list = [torch.ones(80 * 2**20 // 4)]  # 80 MiB held only by a reference cycle
    cycle.append(cycle)
    del cycle
    with PeakMemory("cpu") as meter:
        gc.collect()  # a collection inside the block must not offset what the block allocates
        block = torch.ones(40 * 2**20 // 4)
        block += 1
    del block
    assert meter.peak_bytes >= 30 * 2**20


# -- figures: integer checkpoint ticks, 9+ distinguishable estimators (issue 12.8) ------------------------
def test_agreement_figure_has_integer_ticks_and_distinct_non_grey_styles():
    from matplotlib.colors import to_rgb

    from lightning_fimoda.evaluation.plotting import _style, agreement_figure

    styles = [_style(i) for i in range(12)]
    assert len({(to_rgb(s["color"]), s["linestyle"], s["marker"]) for s in styles}) == 12
    assert len({to_rgb(s["color"]) for s in styles[:9]}) == 9
    assert not any(len(set(to_rgb(s["color"]))) == 1 for s in styles)  # grey is the noise ceiling's
    gold = make_gold()
    gold.checkpoints, gold.checkpoint_unit = [1, 2, 3], "epoch"
    scores = {f"e{i}": rand(4, 10, seed=i) for i in range(10)}
    fig = agreement_figure(AttributionReport.from_scores(scores, torch.arange(10), torch.arange(4), gold))
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_checkpoint_indexed_scores_in_the_report_match_the_gold_standard_per_checkpoint(tmp_path):
    gold = make_gold()
    train_idx, test_idx = torch.arange(10), torch.arange(4)
    exact = torch.zeros(3, 4, 10, dtype=torch.float64)
    exact[:, gold.test_indices[:, None], gold.loo_indices] = gold.scores("full")  # gold-like, per checkpoint
    scores = {"copy": exact, "flat": exact[0], "transposed": rand(10, 4, seed=9).T}  # shared / strided memory
    report = AttributionReport.from_scores(scores, train_idx, test_idx, gold, checkpoint_indexed=("copy",))
    assert torch.allclose(report.agreement("copy", "full").mean, torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(report.agreement("flat", "full").mean, torch.ones(3, dtype=torch.float64))
    assert report.horizon_matched == ["copy"] and "horizon-matched" in report.to_markdown()
    assert "copy *" in report.summary()  # marked horizon-matched in the console table
    assert torch.equal(report.top_k("copy", 3).helpful_indices, top_k_examples(exact[-1], 3, train_idx).helpful_indices)
    assert set(render_figures(report)) >= {"agreement_full_cosine", "sorted_scores"}
    report.save(tmp_path)
    assert AttributionReport.load(tmp_path).equals(report)
    with pytest.raises(ValueError, match=r"expected \(3, 4, 10\) \(checkpoints, tests, training\)"):
        AttributionReport.from_scores({"copy": exact[:2]}, train_idx, test_idx, gold, checkpoint_indexed=("copy",))


def test_reports_saved_in_format_1_still_load(tmp_path):
    report = make_report(make_gold())
    report.save(tmp_path)
    meta = json.loads((tmp_path / "report.json").read_text())
    runs = meta.pop("runs")
    meta.update(format_version=1, seconds={r["label"]: r["seconds"] for r in runs},
                peak_memory={r["label"]: r["peak_memory"] for r in runs},
                settings={r["label"]: r["settings"] for r in runs})
    (tmp_path / "report.json").write_text(json.dumps(meta))
    assert AttributionReport.load(tmp_path).equals(report)
