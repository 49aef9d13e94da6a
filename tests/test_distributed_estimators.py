"""Estimators over 2 CPU processes (gloo, torch.multiprocessing): every rank gets the 1-process scores.

Each rank computes the gradients and curvature products of its half of the training examples only
(checked through the dataset items each rank loaded); the sums are added over the ranks. Two memory
budgets: a large one (resident gradients, cached Gauss-Newton Jacobians) and a small one (gradients
recomputed on every pass, matrix-free curvature products). ``ekfac``: kronfluence splits its work over
ranks only under its own CUDA set-up (``LOCAL_RANK``); over gloo on CPU every rank fits the same factors
itself, and the test checks that it still returns the 1-process scores on every rank.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from lightning_fimoda import SupervisedTask, attribute
from lightning_fimoda._files import WorkDir
from lightning_fimoda.distributed import single_process
from lightning_fimoda.pipeline import run_estimators
from lightning_fimoda.score_store import ScoreStore

N_TRAIN, N_TEST = 24, 5
SMALL_BUDGET = 20_000  # bytes: the training gradients [24, 67] float64 (12.9 KB) do not fit its resident half
ESTIMATORS = [
    "grad_dot",
    "grad_cos",
    {"name": "grad_dot", "projection_dim": 16, "label": "grad_dot_projected"},
    "datainf",
    {"name": "cg", "damping": 0.1, "tol": 1e-12},
    {"name": "cg", "damping": 0.1, "tol": 1e-12, "generalized": True, "label": "cg_generalized"},
    {"name": "lissa", "damping": 0.5, "seed": 3, "batch_size": 12, "depth": 100},
    {"name": "arnoldi", "damping": 1e-2, "rank": 20},
    {"name": "explicit", "damping": 1e-2, "hessian": "exact"},
]
LOCAL = ["grad_dot", {"name": "cg", "damping": 0.1, "tol": 1e-12}]
LABELS = ["grad_dot", "grad_cos", "grad_dot_projected", "datainf", "cg", "cg_generalized", "lissa", "arnoldi",
          "explicit"]


class LoggedDataset(Dataset):
    """A tensor dataset that records which items were loaded, and how many loads there were."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.loaded: set[int] = set()
        self.loads = 0

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        self.loaded.add(int(i))
        self.loads += 1
        return self.x[i], self.y[i]


def _problem():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
    x = torch.randn(N_TRAIN + N_TEST, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=gen)
    train, test = LoggedDataset(x[:N_TRAIN], y[:N_TRAIN]), LoggedDataset(x[N_TRAIN:], y[N_TRAIN:])
    return model, SupervisedTask("cross_entropy"), train, test


def _scores(budget: int | None, estimators=ESTIMATORS) -> tuple[dict[str, torch.Tensor], LoggedDataset]:
    model, task, train, test = _problem()
    scores = attribute(model, task, train, test, estimators, memory_budget=budget or 1 << 30)
    return scores, train


def _has_kronfluence() -> bool:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


def _stored_twice(store: ScoreStore) -> tuple[list[bool], torch.Tensor, bool]:
    """Run grad_dot twice with a score store: (reused flags, the second scores, whether the store was written)."""
    model, task, train, test = _problem()
    runs = [run_estimators(model, task, train, test, ["grad_dot"], store=store)[0] for _ in range(2)]
    return [run.reused for run in runs], runs[1].scores, store.directory.exists()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        for budget in (None, SMALL_BUDGET):
            out[budget] = _scores(budget)
        with single_process():  # rank-local work inside a process group: no collectives, all examples
            out["local"] = _scores(SMALL_BUDGET, LOCAL)
        if _has_kronfluence():
            out["ekfac"] = _scores(None, ["ekfac"])
        model, task, train, test = _problem()  # one test example: rank 0's shard of it is empty
        out["one_test"] = attribute(model, task, train, test, LOCAL, test_indices=[2], memory_budget=SMALL_BUDGET)
        out["store"] = _stored_twice(ScoreStore(os.path.join(out_dir, f"store{rank}")))
        if _has_kronfluence():  # the directory kronfluence's own DDP mode shares between ranks
            from lightning_fimoda.estimators._kronfluence_runtime import shared_workdir

            workdir = WorkDir()
            out["workdir"] = (str(shared_workdir(workdir, workdir, "kf", None, True)), workdir._cleanup is not None)
            dist.barrier()
            workdir.release()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("budget", [None, SMALL_BUDGET], ids=["resident", "recomputed"])
def test_two_gloo_ranks_equal_one_process(two_ranks, budget):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        single, train = _scores(budget)
    finally:
        torch.set_num_threads(threads)
    (rank0, train0), (rank1, train1) = two_ranks[0][budget], two_ranks[1][budget]
    if budget is None:  # resident gradients, cached Jacobians: each rank loads exactly its half, once
        assert train0.loaded == set(range(N_TRAIN // 2)) and train1.loaded == set(range(N_TRAIN // 2, N_TRAIN))
    else:  # recomputed passes, matrix-free products (LiSSA's mini-batches are split too, drawn from everywhere)
        assert max(train0.loads, train1.loads) < 0.6 * train.loads, (train0.loads, train1.loads, train.loads)
    for label in LABELS:
        assert torch.equal(rank0[label], rank1[label]), label  # every rank: the same bits
        scale = single[label].abs().max()
        assert torch.allclose(rank0[label], single[label], rtol=1e-9, atol=1e-11 * scale), label


def test_single_process_inside_a_group_uses_every_example(two_ranks):
    single, _ = _scores(SMALL_BUDGET, LOCAL)
    for rank in (0, 1):
        scores, train = two_ranks[rank]["local"]
        assert train.loaded == set(range(N_TRAIN))
        for label in ("grad_dot", "cg"):
            assert torch.allclose(scores[label], single[label], rtol=1e-12, atol=0), label


def test_a_rank_with_an_empty_shard(two_ranks):
    single, _ = _scores(SMALL_BUDGET, LOCAL)
    for rank in (0, 1):
        for label, full in single.items():
            assert torch.allclose(two_ranks[rank]["one_test"][label], full[2:3], rtol=1e-9, atol=0), label


@pytest.mark.skipif(not _has_kronfluence(), reason="kronfluence is not installed")
def test_ekfac_over_gloo_equals_one_process(two_ranks):
    # kronfluence 1.0.1 turns its distributed mode on only with LOCAL_RANK set and CUDA available: on gloo/CPU
    # it is not split (every rank loads every example), but every rank gets the 1-process scores
    single, _ = _scores(None, ["ekfac"])
    for rank in (0, 1):
        scores, train = two_ranks[rank]["ekfac"]
        assert train.loaded == set(range(N_TRAIN))
        assert torch.allclose(scores["ekfac"], single["ekfac"], rtol=1e-10, atol=0)
    (path0, owns0), (path1, owns1) = two_ranks[0]["workdir"], two_ranks[1]["workdir"]
    assert path0 == path1 and owns0 and not owns1  # kronfluence's DDP mode: rank 0's directory, rank 0 removes it


def test_only_rank_zero_writes_the_score_store_and_every_rank_reuses_it(two_ranks):
    (reused0, scores0, wrote0), (reused1, scores1, wrote1) = two_ranks[0]["store"], two_ranks[1]["store"]
    assert wrote0 and not wrote1  # each rank was given its own folder: rank 1 wrote nothing
    assert reused0 == reused1 == [False, True]  # rank 0 read the saved scores and sent them to rank 1
    assert torch.equal(scores0, scores1)
