"""Quick start: attribute a trained model's test predictions to its training examples.

Trains a small MLP on scikit-learn's diabetes data (embedded, no download), then asks, for a few test
patients, which training patients their predictions are most sensitive to (SPEC §1 sign: positive =
helpful, i.e. leaving the example out would raise the test loss).

    make demo        # or: .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fimoda import SupervisedTask, attribute


def diabetes() -> tuple[TensorDataset, TensorDataset]:
    x, y = load_diabetes(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.1, random_state=0)
    mu, sd, y_mu, y_sd = x_tr.mean(0), x_tr.std(0), y_tr.mean(), y_tr.std()
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (
        TensorDataset(as_t((x_tr - mu) / sd), as_t((y_tr - y_mu) / y_sd)),
        TensorDataset(as_t((x_te - mu) / sd), as_t((y_te - y_mu) / y_sd)),
    )


def main() -> None:
    torch.manual_seed(0)
    train, test = diabetes()
    model = nn.Sequential(nn.Linear(10, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    task = SupervisedTask("mse")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    for _ in range(200):
        for batch in loader:
            opt.zero_grad()
            task.per_example_loss(model, batch).mean().backward()
            opt.step()

    scores = attribute(model, task, train, test, ["grad_dot", "grad_cos"], test_indices=range(3))
    for label, s in scores.items():
        print(f"\n{label}: scores {tuple(s.shape)} (test x train)")
        for t in range(s.shape[0]):
            helpful = s[t].topk(3).indices.tolist()
            harmful = (-s[t]).topk(3).indices.tolist()
            print(f"  test {t}: most helpful train {helpful}, most harmful train {harmful}")


if __name__ == "__main__":
    main()
