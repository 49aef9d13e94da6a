"""The leave-one-out gold standard on the paper's real models, against a naive hand-written loop.

ResNet-9 (narrow, float64) with BatchNorm in eval mode on the vectorised engine and with batch
statistics (``train_mode=True``) on the sequential path; the text classifier (a tiny random BERT)
with AdamW, gradient clipping and ``subtract``. The oracle below shares nothing with the engines but
the seeded sample order of SPEC §2 (``epoch_permutation``): one ``copy.deepcopy`` and one
``torch.optim`` optimizer per run, losses written out by hand.

Tolerances (float64): every measurement ``f`` to 1e-10 relative to max |f|, and the leave-one-out
differences ``D = f(θ^{-j}) − f(θ^{full})`` to 1e-7 relative to max |D|.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_fimoda import GoldStandard
from lightning_fimoda.further_training import FurtherTrainingLoop, epoch_permutation
from lightning_fimoda.zoo.models import ResNet9

N, B, EPOCHS = 24, 8, 2
LOO = [0, 5, 17]
F_TOL, D_TOL = 1e-10, 1e-7


# -- the naive oracle ------------------------------------------------------------------------------
def naive_run(
    model: nn.Module,
    loss_of: Callable[[nn.Module, Tensor], Tensor],
    measure: Callable[[nn.Module], Tensor],
    make_opt: Callable[[list[Tensor]], torch.optim.Optimizer],
    seed: int,
    j: int | None,
    leave_out: str,
    train_mode: bool = False,
    grad_clip: float | None = None,
) -> tuple[Tensor, float]:
    """``f`` after every epoch ``[E, n_test]`` of one run, and the largest gradient norm seen.

    ``loss_of(net, idx)``: per-example losses ``[len(idx)]``. ``subtract`` runs take the ``ℓ(z_j)/n``
    term with BatchNorm on its running statistics (not updated), as documented in ``sequential.py``.
    """
    net = copy.deepcopy(model)
    net.train(train_mode)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_opt(params)
    out, max_norm = [], 0.0
    for epoch in range(EPOCHS):
        perm = epoch_permutation(seed, epoch, N)
        if leave_out == "drop" and j is not None:
            perm = perm[perm != j]
        for idx in perm.split(B):
            loss = loss_of(net, idx).mean()
            if leave_out == "subtract" and j is not None:
                norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
                for m in norms:
                    m.eval()
                loss = loss - loss_of(net, torch.tensor([j])).sum() / N
                for m in norms:
                    m.train(train_mode)
            opt.zero_grad()
            loss.backward()
            norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
            max_norm = max(max_norm, float(norm))
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
        net.eval()
        with torch.no_grad():
            out.append(measure(net))
        net.train(train_mode)
    return torch.stack(out), max_norm


def assert_matches_naive(gold: GoldStandard, model, loss_of, measure, make_opt, leave_out, **kw) -> float:
    """Every seed's full and LOO runs against the oracle; returns the largest gradient norm seen."""
    max_norm = 0.0
    for s, seed in enumerate(gold.seeds):
        full, norm = naive_run(model, loss_of, measure, make_opt, seed, None, leave_out, **kw)
        max_norm = max(max_norm, norm)
        assert rel(gold.full[s], full) < F_TOL
        for col, j in enumerate(gold.loo_indices.tolist()):
            loo, norm = naive_run(model, loss_of, measure, make_opt, seed, j, leave_out, **kw)
            max_norm = max(max_norm, norm)
            assert rel(gold.loo[s, ..., col], loo) < F_TOL
            assert rel(gold.loo[s, ..., col] - gold.full[s], loo - full) < D_TOL
    return max_norm


def rel(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max() / b.abs().max())


# -- ResNet-9 --------------------------------------------------------------------------------------
def resnet_problem():
    """Narrow ResNet-9 in float64 on 8x8 images (the last BatchNorm sees 1x1 maps), BatchNorm's running
    statistics made non-trivial by a few train-mode forwards."""
    torch.manual_seed(0)
    model = ResNet9(channels=(8, 16, 32, 64)).double()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8, dtype=torch.float64) * 2 + 0.5)
    model.eval()
    x = torch.randn(N, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (N,))
    xt = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    yt = torch.randint(0, 10, (3,))

    def loss_of(net, idx):
        return F.cross_entropy(net(x[idx]), y[idx], reduction="none")

    def measure(net):
        return F.cross_entropy(net(xt), yt, reduction="none")

    return model, TensorDataset(x, y), TensorDataset(xt, yt), loss_of, measure


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def resnet_loop(**kw) -> FurtherTrainingLoop:
    base = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=B, epochs=EPOCHS, seeds=2, progress=False)
    return FurtherTrainingLoop(**{**base, **kw})


@pytest.mark.parametrize("leave_out", ["subtract", "drop"])
def test_resnet9_eval_mode_vectorised_matches_naive_loop(leave_out):
    model, train, test, loss_of, measure = resnet_problem()
    model.train()  # as Lightning leaves it: further training still runs in eval mode
    before = {n: b.clone() for n, b in model.state_dict().items()}
    loop = resnet_loop(leave_out=leave_out)
    gold = loop.run(model, train, test, LOO)
    assert loop.info["engine"] == "vectorised"
    assert model.training and all(torch.equal(before[n], b) for n, b in model.state_dict().items())
    assert_matches_naive(gold, model, loss_of, measure, sgd, leave_out)


@pytest.mark.parametrize("leave_out", ["subtract", "drop"])
def test_resnet9_train_mode_batch_statistics_on_the_sequential_path(leave_out):
    model, train, test, loss_of, measure = resnet_problem()
    before = {n: b.clone() for n, b in model.state_dict().items()}
    loop = resnet_loop(leave_out=leave_out, train_mode=True, seeds=1)
    with pytest.warns(UserWarning, match="sequential path"):
        gold = loop.run(model, train, test, LOO)
    assert loop.info["engine"] == "sequential"
    assert_matches_naive(gold, model, loss_of, measure, sgd, leave_out, train_mode=True)
    # every run updates its own running statistics: the caller's model is untouched, and a run
    # does not depend on which runs were trained before it
    assert all(torch.equal(before[n], b) for n, b in model.state_dict().items())
    alone = resnet_loop(leave_out=leave_out, train_mode=True, seeds=1, engine="sequential")
    assert torch.equal(alone.run(model, train, test, [17]).loo[..., 0], gold.loo[..., 2])
    # batch statistics do change the numbers (the check above is not vacuous)
    eval_gold = resnet_loop(leave_out=leave_out, seeds=1).run(model, train, test, LOO)
    assert rel(eval_gold.loo, gold.loo) > 1e-3


def test_chunking_follows_the_memory_budget_with_identical_results():
    model, train, test, *_ = resnet_problem()
    loo = [0, 3, 5, 9, 17, 20]
    big = resnet_loop(seeds=1)
    gold = big.run(model, train, test, loo)
    mem = big.info["memory"]
    assert big.info["units"] == 1 and big.info["chunk_size"] == 6 and mem["chunk_source"] == "memory budget"
    assert mem["memory_budget"] >= 7 * mem["bytes_per_run"] and mem["bytes_per_run"] > 8 * 8 * 137_000
    # room for 4 runs: 3 LOO runs and the first unit's full run, 6 LOO runs spread as 3 + 3
    small = resnet_loop(seeds=1, memory_budget=4 * mem["bytes_per_run"] + 1)
    assert rel(small.run(model, train, test, loo).loo, gold.loo) < 1e-12
    assert (small.info["units"], small.info["chunk_size"]) == (2, 3)
    assert small.info["memory"]["runs_per_unit"] * small.info["memory"]["bytes_per_run"] <= 4 * mem["bytes_per_run"] + 1
    # room for 3 runs: 2 LOO runs per unit
    smaller = resnet_loop(seeds=1, memory_budget=3 * mem["bytes_per_run"])
    assert rel(smaller.run(model, train, test, loo).loo, gold.loo) < 1e-12
    assert (smaller.info["units"], smaller.info["chunk_size"]) == (3, 2)


# -- the text classifier ---------------------------------------------------------------------------
def text_problem(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lightning_fimoda.zoo.data.text import PadCollate, TokenizedDataset
    from lightning_fimoda.zoo.models import TextClassifier

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, pad_token_id=0,
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    model = TextClassifier(encoder=str(tmp_path)).double()
    gen = torch.Generator().manual_seed(1)

    def data(n):
        lengths = torch.randint(3, 9, (n,), generator=gen).tolist()
        ids = [torch.randint(1, 40, (k,), generator=gen).tolist() for k in lengths]
        return TokenizedDataset(ids, torch.randint(0, 2, (n,), generator=gen).tolist())

    train, test = data(N), data(3)
    collate = PadCollate(0)

    def forward_loss(net, items):
        batch = collate(items)
        logits = net(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    def loss_of(net, idx):
        return forward_loss(net, [train[int(i)] for i in idx])

    def measure(net):
        return forward_loss(net, [test[i] for i in range(len(test))])

    return model, train, test, loss_of, measure


def test_text_classifier_adamw_clipping_subtract_matches_naive_loop(tmp_path):
    model, train, test, loss_of, measure = text_problem(tmp_path)
    settings = dict(optimizer="adamw", lr=1e-2, weight_decay=0.01, grad_clip=0.05, leave_out="subtract")
    loop = FurtherTrainingLoop(batch_size=B, epochs=EPOCHS, seeds=1, progress=False, **settings)
    gold = loop.run(model, train, test, LOO)
    assert loop.info["engine"] == "vectorised"

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)

    max_norm = assert_matches_naive(gold, model, loss_of, measure, adamw, "subtract", grad_clip=0.05)
    assert max_norm > 0.05  # clipping was active
