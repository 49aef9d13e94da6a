"""Per-sample gradient engine vs a per-example ``for``-loop oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import AttributionTask, SupervisedTask, per_sample_gradients
from lightning_fimoda.gradients import GradientCache

from .conftest import make_mlp, make_regression
from .helpers import loop_oracle


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


class TinyAttention(nn.Module):
    """Embedding + single-head self-attention + mean pooling + linear head."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens):
        h = self.embed(tokens)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(dim=1))


def _cnn_data(dtype):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(7, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (7,), generator=g))


def _attention_data():
    g = torch.Generator().manual_seed(4)
    return TensorDataset(torch.randint(0, 11, (6, 5), generator=g), torch.randint(0, 2, (6,), generator=g))


@pytest.mark.parametrize(
    ("model_fn", "data_fn", "loss"),
    [
        (lambda: make_mlp(), lambda: make_regression(9), "mse"),
        (lambda: SmallCNN().double(), lambda: _cnn_data(torch.float64), "cross_entropy"),
        (lambda: TinyAttention().double(), _attention_data, "cross_entropy"),
    ],
    ids=["mlp", "cnn", "attention"],
)
def test_matches_per_example_loop(model_fn, data_fn, loss):
    torch.manual_seed(0)
    model, data, task = model_fn(), data_fn(), SupervisedTask(loss)
    idx = list(range(len(data)))
    got = per_sample_gradients(model, task, data, idx, chunk_size=4)
    want = loop_oracle(model, task, data, idx)
    assert got.flat.shape == want.shape
    torch.testing.assert_close(got.flat, want, rtol=1e-5, atol=1e-5)
    assert got.flat.abs().max() > 1e-3  # not trivially zero


def test_float32_model():
    model = make_mlp(dtype=torch.float32)
    data = make_regression(10, dtype=torch.float32)
    task = SupervisedTask("mse")
    got = per_sample_gradients(model, task, data)
    assert got.flat.dtype == torch.float32
    torch.testing.assert_close(got.flat, loop_oracle(model, task, data, range(10)), rtol=1e-5, atol=1e-5)


def test_parameter_subset_and_blocks():
    model, data, task = make_mlp(), make_regression(8), SupervisedTask("mse")
    full = per_sample_gradients(model, task, data)
    sub = per_sample_gradients(model, task, data, params=["2"])
    assert sub.names == ("2.weight", "2.bias")
    torch.testing.assert_close(sub.flat, full.layer_blocks()["2"])
    torch.testing.assert_close(sub.flat, loop_oracle(model, task, data, range(8), names=list(sub.names)))
    blocks = full.blocks()
    assert blocks["0.weight"].shape == (8, 6, 4)
    assert list(full.layer_blocks()) == ["0", "2"]
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        per_sample_gradients(model, task, data, params=["nope"])


def test_chunking_does_not_change_result():
    model, data, task = make_mlp(), make_regression(11), SupervisedTask("mse")
    a = per_sample_gradients(model, task, data, chunk_size=1)
    b = per_sample_gradients(model, task, data, chunk_size=4)
    torch.testing.assert_close(a.flat, b.flat, rtol=0, atol=1e-12)


def test_measurement_gradients_use_the_measurement():
    class PredictionTask(SupervisedTask):
        def measurement(self, model, batch):
            return self.outputs(model, batch)[:, 0]

    model, data, task = make_mlp(), make_regression(5), PredictionTask("mse")
    got = per_sample_gradients(model, task, data, kind="measurement")
    torch.testing.assert_close(got.flat, loop_oracle(model, task, data, range(5), method="measurement"))
    loss = per_sample_gradients(model, task, data, kind="loss")
    assert not torch.allclose(got.flat, loss.flat)


def test_gradients_at_shifted_parameters():
    model, data, task = make_mlp(), make_regression(6), SupervisedTask("mse")
    shift = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    got = per_sample_gradients(model, task, data, at=shift)
    moved = make_mlp()
    moved.load_state_dict(shift)
    torch.testing.assert_close(got.flat, loop_oracle(moved, task, data, range(6)))


def test_eval_mode_and_mode_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 1)).double()
    model.train()
    data, task = make_regression(6), SupervisedTask("mse")
    a = per_sample_gradients(model, task, data)
    b = per_sample_gradients(model, task, data)
    assert model.training and model[1].training
    torch.testing.assert_close(a.flat, b.flat)  # dropout off: deterministic
    torch.testing.assert_close(a.flat, loop_oracle(model, task, data, range(6)))


def test_cache_computes_each_set_once():
    model, data, task = make_mlp(), make_regression(6), SupervisedTask("mse")
    cache = GradientCache()
    idx = torch.arange(6)
    first = cache.get(model, task, data, idx)
    second = cache.get(model, task, data, idx.clone())
    assert first is second and cache.computed == 1
    cache.get(model, task, data, idx, kind="measurement")
    assert cache.computed == 2


class DictTask(AttributionTask):
    """A user task for dict batches, as in the docs."""

    def outputs(self, model, batch):
        return model(batch["features"])

    def loss_from_outputs(self, outputs, batch):
        return (outputs[:, 0] - batch["target"]).pow(2)


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"features": x, "target": y}


def test_custom_task_with_dict_batches():
    model, base = make_mlp(), make_regression(7)
    data, task = DictDataset(base), DictTask()
    got = per_sample_gradients(model, task, data)
    want = per_sample_gradients(model, SupervisedTask("mse"), base)
    torch.testing.assert_close(got.flat, want.flat)


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])})
        self.fc1, self.fc2, self.head = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 1)


@pytest.mark.parametrize(
    ("selection", "want"),
    [
        (["encoder.layer.1.*"], ["encoder.layer.1.weight", "encoder.layer.1.bias"]),
        (["fc*"], ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]),
        (["encoder.layer.[02]"], ["encoder.layer.0.weight", "encoder.layer.0.bias",
                                  "encoder.layer.2.weight", "encoder.layer.2.bias"]),
        (["*.bias", "head"], ["encoder.layer.0.bias", "encoder.layer.1.bias", "encoder.layer.2.bias",
                              "fc1.bias", "fc2.bias", "head.weight", "head.bias"]),
        (["head.weight", "encoder"], [f"encoder.layer.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
         + ["head.weight"]),
        ("fc2", ["fc2.weight", "fc2.bias"]),
    ],
)
def test_select_parameters_by_names_modules_and_globs(selection, want):
    from lightning_fimoda.functional import FunctionalTask, select_parameters

    model = Nested()
    got = select_parameters(model, selection)
    order = [n for n, _ in model.named_parameters()]
    assert got == sorted(want, key=order.index)  # named_parameters order, no duplicates
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    assert FunctionalTask(model, SupervisedTask("mse"), selection).num_params == sum(sizes[n] for n in want)


def test_selection_errors_list_modules_and_num_params_is_exposed():
    from lightning_fimoda.exceptions import ConfigurationError
    from lightning_fimoda.functional import select_parameters

    with pytest.raises(ConfigurationError, match=r"matches no trainable parameter.*encoder\.layer\.0.*fc1.*head"):
        select_parameters(Nested(), ["decoder.*"])
    with pytest.raises(ConfigurationError, match="non-empty strings"):
        select_parameters(Nested(), [""])
    model, data, task = make_mlp(), make_regression(4), SupervisedTask("mse")
    assert per_sample_gradients(model, task, data, params=["0*"]).num_params == 6 * 4 + 6
