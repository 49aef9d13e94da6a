"""Smoke test of examples/make_results.py (``--quick`` on Concrete) and of the experiment configs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"


def load_script():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "examples" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_the_agreement_table(shared_data, tmp_path):
    script = load_script()
    out = tmp_path / "docs"
    path = script.main(["--quick", "--datasets", "concrete", "--data-dir", str(shared_data), "--out", str(out),
                        "--work-dir", str(tmp_path / "runs")])
    text = path.read_text()
    assert path == out / "results.md" and "Smoke test (`--quick`)" in text
    for label in ("grad_dot", "grad_cos", "cg", "lissa", "lissa_h", "trak", "ekfac", "datainf"):
        row = re.search(rf"^\| {label} \| (-?\d\.\d{{3}}) ± (\d\.\d{{3}}) \| epoch \d+ \|", text, re.MULTILINE)
        if row is None and label == "lissa_h":  # after the short --quick training H + λI may be indefinite
            assert re.search(r"^- lissa_h: .*not positive definite", text, re.MULTILINE), "no row for lissa_h"
            continue
        assert row is not None, f"no agreement row for {label}"
        assert -1 <= float(row.group(1)) <= 1
    assert "*noise ceiling*" in text and "## Where our numbers differ from the paper's findings" in text
    for name in ("agreement_cosine", "agreement_spearman", "seed_averaging"):
        assert (out / "figures" / f"concrete_{name}.png").stat().st_size > 0
        assert f"figures/concrete_{name}.png" in text

    # --reuse rewrites the markdown from the finished run without training again
    (out / "results.md").unlink()
    script.main(["--reuse", "--quick", "--datasets", "concrete", "--data-dir", str(shared_data), "--out", str(out),
                 "--work-dir", str(tmp_path / "runs")])
    assert "| grad_dot |" in (out / "results.md").read_text()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_documents_how_to_run_it(path):
    text = path.read_text()
    assert f"fimoda run examples/configs/{path.name}" in text.split("seed_everything")[0]
    config = yaml.safe_load(text)
    assert set(config) >= {"trainer", "model", "data", "fimoda"}
    assert "data_dir" in config["data"]["init_args"]
    labels = [e if isinstance(e, str) else e.get("label", e["name"]) for e in config["fimoda"]["estimators"]]
    assert labels[:2] == ["grad_dot", "grad_cos"] and len(set(labels)) == len(labels)


def test_cpu_and_full_configs_come_in_pairs():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    full = {n for n in names if not n.endswith("_cpu")}
    assert full == {"concrete", "energy", "heloc", "adult", "folktables", "cifar10", "sst2"}
    assert names == full | {f"{n}_cpu" for n in full}


PAPER = {  # SPEC §5: further-training optimizer, lr, length; seeds; m; tests (None: all)
    "concrete": ("sgd", 3e-2, {"epochs": 500}, 100, 100, None),
    "energy": ("sgd", 3e-2, {"epochs": 500}, 100, 100, None),
    "heloc": ("sgd", 1e-4, {"epochs": 200}, 100, 100, 100),
    "adult": ("sgd", 1e-4, {"epochs": 25}, 100, 100, 100),
    "folktables": ("sgd", 1e-4, {"epochs": 25}, 100, 100, 100),
    "cifar10": ("sgd", 0.04, {}, 100, 50, 100),
    "sst2": ("adamw", 1e-6, {"epochs": 1, "eval_every": 5}, 100, 50, 100),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_full_configs_have_the_papers_settings(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    optimizer, lr, length, seeds, m, tests = PAPER[name]
    gold, fimoda = config["fimoda"]["gold"], config["fimoda"]
    assert (gold["optimizer"], gold["lr"], gold["seeds"]) == (optimizer, lr, seeds)
    assert all(gold[k] == v for k, v in length.items())
    assert fimoda["num_train"] == m and fimoda.get("num_test") == tests
    labels = {e if isinstance(e, str) else e.get("label", e["name"]) for e in fimoda["estimators"]}
    paper = {"grad_dot", "grad_cos", "cg", "lissa", "lissa_h", "trak", "ekfac", "datainf"}
    # the paper could not run CG on CIFAR-10 and SST-2, nor LiSSA-H on SST-2
    paper -= {"cifar10": {"cg"}, "sst2": {"cg", "lissa_h"}}.get(name, set())
    assert labels == paper


def test_seed_blocks_concatenate_to_the_whole_job():
    """A variant's seed blocks, run as separate jobs, give the same gold standard as one job."""
    import sys

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from lightning_fimoda import SupervisedTask
    from lightning_fimoda.further_training import FurtherTrainingLoop

    sys.path.insert(0, str(ROOT / "examples"))
    from results.runs import concatenate, seed_blocks
    from results.settings import VARIANTS

    energy = next(v for v in VARIANTS if v.slug == "energy_sgd_drop")
    assert [b[0] for b in seed_blocks(energy)] == list(range(0, energy.seeds, 20))
    assert sum(len(b) for b in seed_blocks(energy)) == energy.seeds
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    train, test = TensorDataset(x[:30], y[:30]), TensorDataset(x[30:], y[30:])

    def gold(seeds):
        loop = FurtherTrainingLoop(SupervisedTask("mse"), lr=0.05, epochs=2, batch_size=8, seeds=seeds,
                                   leave_out="drop", adjustments=("mean", "full"), progress=False)
        return loop.run(model, train, test, loo_indices=[0, 1, 2])

    whole, parts = gold([0, 1, 2, 3]), concatenate([gold([0, 1]), gold([2, 3])])
    assert parts.seeds == whole.seeds
    torch.testing.assert_close(parts.loo, whole.loo, rtol=0, atol=1e-6)
    torch.testing.assert_close(parts.full, whole.full, rtol=0, atol=1e-6)
