"""Every python code block of docs/custom_tasks.md runs, and its dict-batch task works with
vmapped gradients and with TRAK (issue 12.4)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_fimoda import AttributionTask, SupervisedTask, build_estimator, per_sample_gradients

from .conftest import make_mlp
from .helpers import make_classification

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_tasks.md"


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def namespace() -> dict:
    ns: dict = {}
    for block in code_blocks():
        exec(compile(block, str(DOC), "exec"), ns)  # noqa: S102 - the documentation's own examples
    return ns


class DictModel(nn.Module):
    """``model(input_ids=..., attention_mask=...)`` over float features, as the docs' example calls it."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, input_ids, attention_mask):
        return self.body(input_ids * attention_mask)


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, data) -> None:
        self.x, self.y = data.tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


def test_every_code_block_runs(namespace):
    assert len(code_blocks()) >= 2
    assert {"TextTask", "MyModule"} <= set(namespace)


def test_docs_margin_works_under_vmap_and_equals_the_one_hot_formula(namespace):
    model, data = DictModel(make_mlp(d_in=3, hidden=4, d_out=3)), make_classification(8)
    task, dict_data = namespace["TextTask"](), DictDataset(data)
    batch = task.collate([dict_data[i] for i in range(8)])
    logits = model(batch["input_ids"], batch["attention_mask"])
    one_hot = nn.functional.one_hot(batch["labels"], 3).bool()  # fine outside vmap
    expected = logits[one_hot] - logits.masked_fill(one_hot, float("-inf")).logsumexp(dim=1)
    torch.testing.assert_close(task.measurement(model, batch), expected)
    torch.testing.assert_close(task.model_output(model, batch), expected)
    grads = per_sample_gradients(model, task, dict_data, kind="measurement")  # vmapped
    assert torch.isfinite(grads.flat).all() and grads.flat.abs().sum() > 0


def test_trak_on_a_dict_batch_classifier_equals_the_tuple_batch_one(namespace):
    body, data = make_mlp(d_in=3, hidden=4, d_out=3), make_classification(20)
    test = make_classification(4, seed=2)
    ref = build_estimator("trak", proj_dim=None, damping=0.01).fit(body, SupervisedTask("cross_entropy"), data)
    class LossMeasured(namespace["TextTask"]):  # the docs' task, measuring the loss like the reference
        measurement = AttributionTask.measurement

    custom = build_estimator("trak", proj_dim=None, damping=0.01)
    custom.fit(DictModel(body), LossMeasured(), DictDataset(data))
    assert custom.info["model_output"] == "margin"
    torch.testing.assert_close(custom.score(DictDataset(test)), ref.score(test), rtol=1e-5, atol=1e-8)
