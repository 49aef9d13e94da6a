"""The ``fimoda`` command line and LightningCLI configurability of FiMODACallback."""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_fimoda.callback import FiMODACallback
from lightning_fimoda.cli import main
from lightning_fimoda.evaluation.report import AttributionReport
from lightning_fimoda.task import SupervisedTask


def write_config(tmp_path: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "default_root_dir": str(tmp_path / "runs"),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"},
            },
        },
        "model": {"class_path": "tests.lightning_helpers.TinyRegressor", "init_args": {"lr": 0.05}},
        "data": {"class_path": "tests.lightning_helpers.TinyDataModule", "init_args": {"batch_size": 10}},
        "fimoda": {
            "estimators": ["grad_dot", {"name": "grad_cos", "label": "cos"}],
            "num_train": 6,
            "num_test": 4,
            "gold": {"optimizer": "sgd", "lr": 0.02, "epochs": 2, "batch_size": 10, "seeds": 2, "progress": False},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_then_attribute_checkpoint_then_report(tmp_path, capsys, caplog):
    config = write_config(tmp_path)
    assert main(["run", str(config)]) == 0
    assert "Tip:" not in caplog.text  # Lightning's tips are silenced
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    fimoda_dir = run_dir / "fimoda"
    trained = AttributionReport.load(fimoda_dir)
    assert trained.labels == ["grad_dot", "cos"] and trained.gold.checkpoints == [1, 2]
    assert (run_dir / "config.yaml").is_file() and (fimoda_dir / "agreement_mean_cosine.png").is_file()
    assert "peak cosine" in capsys.readouterr().out  # the printed summary

    # final-model-only: the saved checkpoint, no training, same numbers
    (ckpt,) = (run_dir / "checkpoints").glob("*.ckpt")
    out = tmp_path / "from_ckpt"
    assert main(["attribute", "--checkpoint", str(ckpt), "--config", str(config), f"--fimoda.output_dir={out}"]) == 0
    again = AttributionReport.load(out)
    # the checkpoint is recorded with the training it had (not "trained epochs: 0")
    assert again.info["trained_steps"] == 6 and again.info["trained_epochs"] == 2
    assert again.info["checkpoint"] == str(ckpt.resolve())
    for label in trained.labels:
        assert torch.allclose(again.scores[label], trained.scores[label], rtol=1e-12, atol=0)
    assert torch.allclose(again.gold.loo, trained.gold.loo, rtol=1e-12, atol=0)

    # `fimoda report` (the installed console script's main) re-renders the same markdown
    (fimoda_script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "fimoda"]
    assert fimoda_script.load() is main
    original = (out / "report.md").read_text()
    (out / "report.md").unlink()
    (out / "sorted_scores.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == original and (out / "sorted_scores.png").is_file()


def test_config_overrides_and_errors(tmp_path, capsys):
    config = write_config(tmp_path)
    # the user's mistakes end in one line on stderr and exit code 2, not a traceback
    assert main(["attribute", "--checkpoint", str(tmp_path / "none.ckpt"), "--config", str(config)]) == 2
    assert "fimoda attribute: error: Checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(config), "--fimoda.num_trian=3"])
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_callback_configurable_from_lightning_cli_yaml(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    config = tmp_path / "lightning.yaml"
    config.write_text(
        textwrap.dedent(
            """
            trainer:
              max_epochs: 1
              logger: false
              callbacks:
                - class_path: lightning_fimoda.callback.FiMODACallback
                  init_args:
                    estimators: [grad_dot, {name: grad_cos, label: cos}]
                    gold: {lr: 0.03, epochs: 2, batch_size: 8, seeds: 3}
                    num_train: 10
                    test_indices: [0, 2]
                    task: {class_path: lightning_fimoda.SupervisedTask, init_args: {loss: mse}}
            model:
              class_path: tests.lightning_helpers.TinyRegressor
            data:
              class_path: tests.lightning_helpers.TinyDataModule
            """
        )
    )
    cli = LightningCLI(run=False, args=["--config", str(config)], save_config_callback=None)
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, FiMODACallback)]
    assert [e.label for e in callback.estimators] == ["grad_dot", "cos"]
    assert callback.gold == {"lr": 0.03, "epochs": 2, "batch_size": 8, "seeds": 3}
    assert callback.num_train == 10 and callback.test_indices == [0, 2]
    assert isinstance(callback.task, SupervisedTask) and callback.task.loss == "mse"


def test_run_with_the_packaged_model_and_datamodule(tmp_path):
    config = tmp_path / "diabetes.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            seed_everything: 0
            trainer:
              max_epochs: 1
              logger: false
              enable_checkpointing: false
              enable_progress_bar: false
              default_root_dir: {tmp_path}
            model:
              class_path: lightning_fimoda.zoo.models.MLP
              init_args: {{input_dim: 10, hidden: [8], lr: 0.05}}
            data:
              class_path: lightning_fimoda.zoo.data.DiabetesDataModule
              init_args: {{batch_size: 64}}
            fimoda:
              estimators: [grad_dot]
              num_train: 5
              num_test: 3
              plots: false
            """
        )
    )
    assert main(["run", str(config)]) == 0
    report = AttributionReport.load(tmp_path / "fimoda")
    assert report.info["model"] == "MLP" and report.info["train_dataset_size"] == 397
    assert report.scores["grad_dot"].shape == (3, 5) and torch.isfinite(report.scores["grad_dot"]).all()
