"""The two benchmark problems: a fixed model, its data and the settings every library gets.

- ``concrete``: UCI Concrete (927 train × 103 test, 8 features) on the paper's 8-128-128-1 ReLU MLP
  (17.8k parameters), squared error. Data from ``../shared/data/concrete.csv``; a seeded synthetic
  stand-in of the same shape when the file is absent (``Problem.note`` says which).
- ``cifar``: ResNet-9 at reduced width on 2,000 CIFAR-10 training images (``cifar10_subset.npz``),
  softmax cross-entropy, ≥ 200k parameters; a seeded random-image stand-in when the file is absent.

Both models are trained briefly (seeded) so the gradients are those of a fitted model, then frozen in
eval mode. ``damping`` is ``100 · λ_G`` (SPEC §3's default rule for CG/LiSSA, ``λ_G`` the mean squared
per-sample gradient entry over the first 256 training examples), passed explicitly to every library.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask, per_sample_gradients
from lightning_fimoda.zoo.models.mlp import MLP
from lightning_fimoda.zoo.models.resnet import ResNet9

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CNN_CHANNELS = (16, 32, 64, 96)


@dataclass
class Problem:
    """A frozen model with its data. ``loss_kind`` is ``"mse"`` or ``"cross_entropy"``.

    ``train``/``test`` are ``TensorDataset`` of ``(x, y)``; ``damping`` is the absolute ``λ`` shared by
    the influence-function rows; ``settings`` holds the per-method knobs every library receives.
    """

    name: str
    model: nn.Module
    loss_kind: str
    train: TensorDataset
    test: TensorDataset
    damping: float
    lambda_g: float
    note: str
    settings: dict = field(default_factory=dict)

    @property
    def task(self) -> SupervisedTask:
        return SupervisedTask(self.loss_kind)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def with_tests(self, k: int) -> Problem:
        """The same problem on the first ``k`` test examples (for the costliest solvers)."""
        x, y = self.test.tensors
        return replace(self, test=TensorDataset(x[:k], y[:k]))

    def batch_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean per-example loss of a batch as the peers take it (``R`` over the batch; SPEC §3's scale):
        MSE summed over outputs without 1/2 (``SupervisedTask("mse")``), or softmax cross-entropy."""
        if self.loss_kind == "mse":
            return (out - y.reshape(out.shape)).pow(2).sum(-1).mean()
        return F.cross_entropy(out, y)

    def functional_loss(self, params: dict, data: tuple[Tensor, Tensor]) -> Tensor:
        """``loss(params, (x, y))`` in ``torch.func`` style (dattri); single examples get a batch dim."""
        x, y = data
        if x.dim() == self.train.tensors[0].dim() - 1:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        out = torch.func.functional_call(self.model, params, (x,))
        return self.batch_loss(out, y)


def _train(model: nn.Module, loss_fn, data: TensorDataset, steps: int, lr: float, batch: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    x, y = data.tensors
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)


def _finish(name, model, loss_kind, train, test, note, settings) -> Problem:
    """Damping from the per-sample gradients of every training example (in chunks of 256):
    ``λ = 100 · λ_G`` (CG/LiSSA/explicit/Arnoldi), ``0.1 · λ_G`` (EK-FAC), DataInf's ``λ_l`` per layer."""
    problem = Problem(name, model, loss_kind, train, test, 0.0, 0.0, note, settings)
    total, sums = 0.0, None
    for start in range(0, len(train), 256):
        g = per_sample_gradients(model, problem.task, train, torch.arange(start, min(len(train), start + 256)))
        blocks = g.layer_blocks()
        chunk = [b.pow(2).sum().item() for b in blocks.values()]
        sums = chunk if sums is None else [a + b for a, b in zip(sums, chunk)]
        total += g.flat.pow(2).sum().item()
    sizes = [sl.stop - sl.start for sl in g.layer_slices().values()]
    n = len(train)
    problem.lambda_g = total / (n * problem.n_params)
    problem.damping = 100.0 * problem.lambda_g
    settings["ekfac_damping"] = 0.1 * problem.lambda_g
    settings["datainf_lambdas"] = [0.1 * s / (n * size) for s, size in zip(sums, sizes)]
    return problem


def concrete(quick: bool) -> Problem:
    """Concrete MLP (or its synthetic stand-in); ``quick`` keeps 200 train × 20 test examples."""
    path = DATA / "concrete.csv"
    if path.exists():
        from lightning_fimoda.zoo.data import ConcreteDataModule

        dm = ConcreteDataModule(data_dir=DATA)
        dm.setup()
        (xtr, ytr), (xte, yte) = dm.train_dataset.tensors, dm.test_dataset.tensors
        note = f"data: {path.name}"
    else:
        gen = torch.Generator().manual_seed(0)
        xtr, xte = torch.randn(927, 8, generator=gen), torch.randn(103, 8, generator=gen)
        w = torch.randn(8, 1, generator=gen)
        ytr, yte = torch.tanh(xtr @ w) + 0.1 * torch.randn(927, 1, generator=gen), torch.tanh(xte @ w)
        note = "data: seeded synthetic stand-in (927 x 103, 8 features; concrete.csv absent)"
    if quick:
        xtr, ytr, xte, yte = xtr[:200], ytr[:200], xte[:20], yte[:20]
    model = MLP(input_dim=8, num_outputs=1)
    train, test = TensorDataset(xtr, ytr), TensorDataset(xte, yte)
    problem = Problem("concrete", model, "mse", train, test, 0.0, 0.0, note)
    _train(model, problem.batch_loss, train, steps=60 if quick else 600, lr=1e-2, batch=128)
    settings = {"cg_iter": 50, "lissa_depth": 100 if quick else 300, "lissa_batch": 128, "rank": 20 if quick else 50,
                "lissa_scale": 20.0, "proj_dim": 128 if quick else 512, "lissa_full_depth": 30 if quick else 100,
                "tests_for": {"lissa (exact)": 20, "lissa (GN)": 20, "lissa (exact, full batch)": 20},
                # H + 100·λ_G·I is indefinite here (Lanczos: a direction with vᵀ(H + λI)v = -0.157), so
                # LiSSA cannot converge and ours refuses; 1000·λ_G makes it positive definite
                "damping_for": {"lissa (exact)": 1000.0, "lissa (exact, full batch)": 1000.0},
                "explicit_params": ["net.4.weight", "net.4.bias"]}
    return _finish("concrete", model, "mse", train, test, note, settings)


def cifar(quick: bool, n_train: int = 2000, n_test: int = 20) -> Problem:
    """Reduced-width ResNet-9 on CIFAR-10 (``n_train`` × ``n_test``; ``quick``: 200 × 5)."""
    n_train, n_test = (200, 5) if quick else (n_train, n_test)
    path = DATA / "cifar10_subset.npz"
    if path.exists():
        from lightning_fimoda.zoo.data import CIFAR10DataModule

        dm = CIFAR10DataModule(data_dir=DATA, max_train=n_train, max_test=n_test, augment=False)
        dm.setup()
        (xtr, ytr), (xte, yte) = dm.train_dataset.tensors, dm.test_dataset.tensors
        note = f"data: {path.name}"
    else:
        gen = torch.Generator().manual_seed(0)
        xtr, xte = torch.randn(n_train, 3, 32, 32, generator=gen), torch.randn(n_test, 3, 32, 32, generator=gen)
        ytr, yte = torch.randint(0, 10, (n_train,), generator=gen), torch.randint(0, 10, (n_test,), generator=gen)
        note = "data: seeded random-image stand-in (cifar10_subset.npz absent)"
    model = ResNet9(channels=CNN_CHANNELS)
    train, test = TensorDataset(xtr, ytr.long()), TensorDataset(xte, yte.long())
    problem = Problem("cifar", model, "cross_entropy", train, test, 0.0, 0.0, note)
    _train(model, problem.batch_loss, train, steps=5 if quick else 40, lr=1e-3, batch=64)
    settings = {"cg_iter": 10, "lissa_depth": 20 if quick else 50, "lissa_batch": 64, "lissa_full_depth": 10, "rank": 10,
                "lissa_scale": 50.0, "proj_dim": 128 if quick else min(1024, n_train // 2),
                "explicit_params": ["fc.weight"], "ekfac_modules": ["fc"], "ekfac_params": ["fc.weight"],
                "tests_for": {"lissa (exact)": 5, "lissa (GN)": 5, "cg (exact)": 5, "cg (GN)": 5},
                "captum_tracin_max_train": 200,
                "tracked_params": [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]}
    return _finish("cifar", model, "cross_entropy", train, test, note, settings)
