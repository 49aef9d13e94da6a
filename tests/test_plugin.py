"""The Lightning callback-factory plugin: every Trainer gets a FiMODACallback iff the env var is set."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from lightning_fimoda.callback import FiMODACallback
from lightning_fimoda.plugin import ENV_VAR, callbacks_factory

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    from lightning_fimoda.callback import FiMODACallback
    from tests.lightning_helpers import TinyDataModule, TinyRegressor, quiet_trainer

    trainer = quiet_trainer(max_epochs=1)  # the user's script knows nothing about FiMODA
    found = [cb for cb in trainer.callbacks if isinstance(cb, FiMODACallback)]
    print("FIMODA_CALLBACKS", len(found))
    if found:
        print("ESTIMATORS", [e.label for e in found[0].estimators], "NUM_TRAIN", found[0].num_train)
        trainer.fit(TinyRegressor(), datamodule=TinyDataModule())
    """
)


def run_script(env_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if env_value is not None:
        env[ENV_VAR] = env_value
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "fimoda.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            fimoda:
              estimators: [grad_dot, {{name: grad_cos, label: cos}}]
              num_train: 7
              num_test: 3
              output_dir: {tmp_path / "out"}
            """
        )
    )
    return path


def test_entry_point_is_registered():
    names = {ep.value for ep in entry_points(group="lightning.pytorch.callbacks_factory")}
    assert "lightning_fimoda.plugin:callbacks_factory" in names


def test_subprocess_without_the_variable_adds_nothing():
    proc = run_script(None)
    assert proc.returncode == 0, proc.stderr
    assert "FIMODA_CALLBACKS 0" in proc.stdout


def test_subprocess_with_the_variable_attributes_after_fit(tmp_path):
    proc = run_script(str(write_config(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "FIMODA_CALLBACKS 1" in proc.stdout
    assert "ESTIMATORS ['grad_dot', 'cos'] NUM_TRAIN 7" in proc.stdout
    assert (tmp_path / "out" / "report.md").is_file()
    assert "grad_dot" in proc.stdout.split("FIMODA_CALLBACKS 1")[1]  # the printed summary table


def test_factory_in_process(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert callbacks_factory() == []
    monkeypatch.setenv(ENV_VAR, str(write_config(tmp_path)))
    (callback,) = callbacks_factory()
    assert isinstance(callback, FiMODACallback) and callback.num_test == 3
    # a file of bare callback arguments (no fimoda: section) works too
    bare = tmp_path / "bare.yaml"
    bare.write_text("estimators: [grad_cos]\nnum_train: 4\n")
    monkeypatch.setenv(ENV_VAR, str(bare))
    assert [e.name for e in callbacks_factory()[0].estimators] == ["grad_cos"]
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        callbacks_factory()
    bad = tmp_path / "bad.yaml"
    bad.write_text("fimoda:\n  num_trian: 4\n")
    monkeypatch.setenv(ENV_VAR, str(bad))
    with pytest.raises(Exception, match="num_trian"):
        callbacks_factory()
