"""A run_dir never mixes results (issue 13.1/13.2/13.7): content fingerprint, checksummed units,
refused mismatches, corrupt units named and recomputed, ``fimoda verify``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lightning_fimoda import GoldStandard, SupervisedTask
from lightning_fimoda.exceptions import MismatchError
from lightning_fimoda.fingerprint import model_architecture
from lightning_fimoda.further_training import FurtherTrainingLoop
from lightning_fimoda.further_training.fingerprint import job_fingerprint
from lightning_fimoda.further_training.verify import add_verify_command, run_verify, verify_run_dir

N = 12
LOO = [0, 3, 7, 9, 11]


def problem(act=nn.Tanh):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), act(), nn.Linear(5, 1)).double()
    train = TensorDataset(torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 1, dtype=torch.float64))
    test = TensorDataset(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    return model, train, test


def loop(run_dir=None, task=None, **kw) -> FurtherTrainingLoop:
    base = dict(lr=0.05, batch_size=4, epochs=2, seeds=2, chunk_size=2, progress=False, run_dir=run_dir)
    return FurtherTrainingLoop(task or SupervisedTask(), **{**base, **kw})


def units(run_dir):
    return sorted((run_dir / "units").glob("*.safetensors"))


def test_changed_architecture_with_same_weights_is_refused(tmp_path):
    model, train, test = problem(nn.Tanh)
    loop(tmp_path).run(model, train, test, LOO)
    relu, _, _ = problem(nn.ReLU)
    relu.load_state_dict(model.state_dict())  # the very same weights
    with pytest.raises(MismatchError, match=r"differing: \['model_architecture'\]"):
        loop(tmp_path).run(relu, train, test, LOO)


_NET = """
import torch
from torch import nn


class Net(nn.Module):
    {doc}

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)  {comment}

    def forward(self, x):
        return self.lin(x).{act}()
"""


def _net_class(tmp_path, monkeypatch, name, **fields):
    """``Net`` from a module file of its own (registered, so that ``inspect`` finds its source)."""
    path = tmp_path / f"{name}.py"
    path.write_text(_NET.format(**fields))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module.Net


def test_architecture_ignores_docstrings_and_comments_but_not_code(tmp_path, monkeypatch):
    first = _net_class(tmp_path, monkeypatch, "first", doc='"""One layer."""', comment="", act="tanh")
    reworded = _net_class(tmp_path, monkeypatch, "reworded", doc='"""One linear layer, then tanh (reworded)."""',
                          comment="# a comment", act="tanh")
    changed = _net_class(tmp_path, monkeypatch, "changed", doc='"""One layer."""', comment="", act="relu")
    assert model_architecture(first()) == model_architecture(reworded())  # a docstring edit keeps runs resumable
    assert model_architecture(first()) != model_architecture(changed())


def test_changed_task_is_refused(tmp_path):
    class Shifted(SupervisedTask):
        def measurement(self, model, batch):
            return self.per_example_loss(model, batch) + 1.0

    model, train, test = problem()
    loop(tmp_path, engine="vectorised").run(model, train, test, LOO)
    with pytest.raises(MismatchError, match=r"differing: \['task'\]"):
        loop(tmp_path, task=Shifted(), engine="vectorised").run(model, train, test, LOO)
    with pytest.raises(MismatchError, match=r"differing: \['task'\]"):
        loop(tmp_path, task=SupervisedTask("cross_entropy")).run(model, train, test, LOO)


class Rows(Dataset):
    """A custom map-style dataset (not a TensorDataset)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("kind", ["custom", "subset"])
def test_changed_labels_of_a_custom_dataset_or_subset_are_refused(tmp_path, kind):
    model, train, test = problem()
    x, y = train.tensors

    def wrap(labels):
        if kind == "custom":
            return Rows(x, labels)
        return torch.utils.data.Subset(TensorDataset(x, labels), list(range(N)))

    loop(tmp_path).run(model, wrap(y), test, LOO)
    flipped = y.clone()
    flipped[5] += 1.0
    with pytest.raises(MismatchError, match=r"differing: \['train_digest'\]"):
        loop(tmp_path).run(model, wrap(flipped), test, LOO)


def test_missing_config_with_units_is_refused(tmp_path):
    model, train, test = problem()
    loop(tmp_path).run(model, train, test, LOO)
    (tmp_path / "config.json").unlink()
    with pytest.raises(MismatchError, match="unit files but no config.json"):
        loop(tmp_path).run(model, train, test, LOO)


def test_edited_config_is_refused(tmp_path):
    model, train, test = problem()
    loop(tmp_path).run(model, train, test, LOO)
    record = json.loads((tmp_path / "config.json").read_text())
    record["fingerprint"]["further_training"]["optimizer"]["lr"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(MismatchError, match="fingerprint id does not match"):
        loop(tmp_path).run(model, train, test, LOO)


def damage(path, how: str, other=None) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":  # one bit of the last stored value
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "garble":
        path.write_bytes(b"\x00garbage" * 20)
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "swap":
        other_data = other.read_bytes()
        other.write_bytes(bytes(data))
        path.write_bytes(other_data)


@pytest.mark.parametrize("how", ["flip", "garble", "truncate", "swap"])
def test_corrupt_unit_is_named_moved_aside_and_recomputed(tmp_path, how):
    model, train, test = problem()
    fresh = loop(tmp_path / "fresh").run(model, train, test, LOO)
    run = tmp_path / "run"
    loop(run).run(model, train, test, LOO)
    files = units(run)
    assert len(files) == 6  # 2 seeds x 3 chunks
    damage(files[1], how, other=files[2])
    bad = {files[1].name} | ({files[2].name} if how == "swap" else set())
    report = verify_run_dir(run)
    assert not report.ok and set(report.corrupt) == bad
    assert len(report.to_recompute) == len(bad)
    again = loop(run)
    with pytest.warns(UserWarning, match="it is recomputed") as record:
        gold = again.run(model, train, test, LOO)
    assert {name for name in bad if any(name in str(w.message) for w in record)} == bad  # named
    assert gold.equals(fresh)  # the corrupt unit was not used
    assert again.info["units_computed"] == len(bad) and again.info["units_loaded"] == 6 - len(bad)
    assert len(again.info["units_corrupt"]) == len(bad)
    assert len([w for w in record if "it is recomputed" in str(w.message)]) == len(bad)
    assert len(list((run / "units" / "corrupt").iterdir())) == len(bad)  # kept for inspection
    assert verify_run_dir(run).ok


def test_stale_tmp_files_are_cleaned_at_bind(tmp_path):
    model, train, test = problem()
    loop(tmp_path).run(model, train, test, LOO)
    stale = [tmp_path / "units" / "seed0_chunk00000.safetensorsab12.tmp", tmp_path / "gold.safetensorsx.tmp"]
    for path in stale:
        path.write_bytes(b"half a unit")
    assert verify_run_dir(tmp_path).stale_tmp
    loop(tmp_path).run(model, train, test, LOO)
    assert not any(p.exists() for p in stale)
    assert not list(tmp_path.rglob("*.tmp"))


def test_fingerprint_leaves_out_what_does_not_change_the_numbers(tmp_path):
    model, train, test = problem()
    gold = loop(tmp_path, chunk_size=2, engine="vectorised", progress=True).run(model, train, test, LOO)
    # another chunking, engine choice, memory budget and progress: the same job, its units are reused
    other = loop(tmp_path, chunk_size=None, memory_budget=1 << 20)
    assert other.run(model, train, test, LOO).equals(gold) and other.info["units_computed"] == 0
    assert other.info["engine"] == "vectorised" and other.info["chunk_size"] == 2  # the run_dir's layout
    explicit = loop(tmp_path, chunk_size=3)
    with pytest.warns(UserWarning, match="resumed with that layout"):
        assert explicit.run(model, train, test, LOO).equals(gold)
    fp = job_fingerprint({}, model, SupervisedTask(), train, test, torch.tensor(LOO), torch.arange(4))
    assert set(fp) == {"further_training", "n_train", "loo_indices", "test_indices", "model_architecture",
                       "model_digest", "task", "train_digest", "test_digest", "versions"}


def test_verify_run_dir_and_command(tmp_path):
    model, train, test = problem()
    missing = verify_run_dir(tmp_path / "nothing")
    assert not missing.ok and "missing" in missing.config_error
    loop(tmp_path).run(model, train, test, LOO)
    ok = verify_run_dir(tmp_path)
    assert ok.ok and ok.units_ok == ok.units_expected == 6 and ok.to_recompute == []
    units(tmp_path)[0].unlink()
    partial = verify_run_dir(tmp_path)
    assert partial.ok and partial.to_recompute == [(0, 0)] and "seed 0 chunk 0" in str(partial)

    parser = argparse.ArgumentParser()
    add_verify_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["verify", str(tmp_path)])
    assert run_verify(args) == 0
    damage(units(tmp_path)[0], "flip")
    assert run_verify(args) == 1
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from lightning_fimoda.further_training.verify import add_verify_command, run_verify, verify_run_dir; "
         f"print(verify_run_dir({str(tmp_path)!r}))"], capture_output=True, text=True, timeout=120,
    ).stdout
    assert "fails its checksum" in out and "a resume would compute 2 unit(s)" in out


def test_gold_standard_file_still_loads(tmp_path):
    model, train, test = problem()
    gold = loop(tmp_path).run(model, train, test, LOO)
    assert GoldStandard.load(tmp_path / "gold_standard.safetensors").equals(gold)


def test_run_root_gives_each_job_its_own_directory(tmp_path):
    model, train, test = problem()
    first = loop(None, run_root=tmp_path)
    gold = first.run(model, train, test, LOO)
    frozen, _, _ = problem()
    frozen[0].bias.requires_grad_(False)  # same weights, another job (the bias is not trained further)
    other = loop(None, run_root=tmp_path)
    other.run(frozen, train, test, LOO)
    assert other.info["run_dir"] != first.info["run_dir"] and other.info["units_loaded"] == 0
    again = loop(None, run_root=tmp_path)
    assert again.run(model, train, test, LOO).equals(gold) and again.info["units_computed"] == 0
    assert again.info["run_dir"] == first.info["run_dir"]


def test_fimoda_verify_command_reports_ok_and_corrupt_units(tmp_path, capsys):
    from lightning_fimoda.cli import main as fimoda_main

    model, train, test = problem()
    run = tmp_path / "run"
    loop(run).run(model, train, test, LOO)
    assert fimoda_main(["verify", str(run)]) == 0
    files = units(run)
    damage(files[0], "flip", other=files[1])
    assert fimoda_main(["verify", str(run)]) == 1
    assert files[0].name in capsys.readouterr().out
