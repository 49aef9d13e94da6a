"""The paper's settings (SPEC §5), our CPU configurations, and the paper-protocol gold-standard variants.

A *base run* is one CPU configuration ``examples/configs/<name>_cpu.yaml`` run as ``fimoda run`` does:
final training, every estimator on ``m = 100`` scored training instances, and a short gold standard.
A :class:`Variant` is a further gold standard computed afterwards from the base run's final model on
a subset of the same instances — the paper's horizon (500 epochs for Concrete and Energy), its seeds,
either leave-out mechanism and either optimizer — so the estimators run once per dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
ADJUST = "mean"  # the paper's main adjustment (eq. 13); "full" (eq. 17) is reported alongside

PAPER = {
    "concrete": {"title": "Concrete", "final": "SGD lr 0.3, 1000 epochs, batch 128",
                 "further": "SGD lr 3e-2, 500 epochs", "seeds": 100, "m": 100, "tests": "all 103"},
    "energy": {"title": "Energy", "final": "SGD lr 0.3, 1000 epochs, batch 128",
               "further": "SGD lr 3e-2, 500 epochs", "seeds": 100, "m": 100, "tests": "all 77"},
    "heloc": {"title": "FICO HELOC", "final": "SGD lr 1e-3, 1000 epochs, batch 128",
              "further": "SGD lr 1e-4, 200 epochs", "seeds": 100, "m": 100, "tests": "100 of 988"},
    "adult": {"title": "Adult (Folktables stand-in)", "final": "Folktables: SGD lr 1e-3, 100 epochs",
              "further": "Folktables: SGD lr 1e-4, 25 epochs", "seeds": 100, "m": 100, "tests": "100"},
}
FIRST_ORDER = ("grad_dot", "grad_cos", "datainf")
SECOND_ORDER = ("cg", "lissa")
POOR = ("lissa_h", "trak")


@dataclass(frozen=True)
class Variant:
    """One paper-protocol gold standard of dataset ``name`` (from the base run's final model).

    ``m`` / ``tests``: the first ``m`` scored training instances form ``J``; the first ``tests`` test
    instances are measured (``None``: every one). ``every``: epochs between checkpoints.
    """

    key: str
    name: str
    optimizer: str
    lr: float
    leave_out: str
    epochs: int
    every: int
    seeds: int
    m: int
    tests: int | None = None
    note: str = ""
    tag: str = ""  # tells apart two variants of one dataset, optimizer and mechanism

    @property
    def title(self) -> str:
        """The dataset's title, with the tag when there is one (``Energy (m' = 100)``)."""
        return PAPER[self.name]["title"] + (f" ({self.tag})" if self.tag else "")

    @property
    def slug(self) -> str:
        return f"{self.name}_{self.key}"

    def shrunk(self) -> Variant:
        """Tiny settings for ``--quick``."""
        return replace(self, epochs=2, every=1, seeds=4, m=3, tests=5)


_HELOC_NOTE = ("the paper's further-training recipe (200 epochs at lr 1e-4; Adam 1e-6) from our final model, "
               "which is trained at lr 1e-2 for 100 epochs (the paper: 1e-3 for 1000)")
_M100_NOTE = ("the paper's S = 100 seeds and m = 100 LOO instances; seeds 0–19 ran on the MLP kernel's `torch.bmm` "
              "path, seeds 20–99 on its compiled step (the time columns average the two)")
VARIANTS = (  # in the order they run; the ones of a dataset share its base run's final model
    Variant("sgd_drop", "energy", "sgd", 3e-2, "drop", 500, 5, 100, 5),
    Variant("sgd_subtract", "energy", "sgd", 3e-2, "subtract", 500, 5, 40, 5),
    Variant("sgd_drop_m100", "energy", "sgd", 3e-2, "drop", 500, 5, 100, 100, note=_M100_NOTE, tag="m' = 100"),
    Variant("sgd_drop", "concrete", "sgd", 3e-2, "drop", 500, 5, 20, 5),
    Variant("sgd_subtract", "concrete", "sgd", 3e-2, "subtract", 500, 5, 20, 5),
    Variant("sgd_drop_m100", "concrete", "sgd", 3e-2, "drop", 500, 5, 40, 100, tag="m' = 100"),
    Variant("sgd_drop", "heloc", "sgd", 1e-4, "drop", 200, 1, 20, 5, 100, _HELOC_NOTE),
    Variant("sgd_subtract", "heloc", "sgd", 1e-4, "subtract", 200, 1, 20, 5, 100, _HELOC_NOTE),
    Variant("adam_subtract", "energy", "adam", 1e-4, "subtract", 500, 5, 20, 5),
    Variant("adam_subtract", "concrete", "adam", 1e-4, "subtract", 500, 5, 20, 5),
    Variant("adam_subtract", "heloc", "adam", 1e-6, "subtract", 200, 1, 20, 5, 100, _HELOC_NOTE),
)


def seed_ks(seeds: int) -> list[int]:
    """Group sizes for seed averaging: 1, 2, 5, 10, 20, 50, 100 up to ``seeds``, and ``seeds`` (all)."""
    return sorted({k for k in (1, 2, 5, 10, 20, 50, 100) if k <= seeds} | {seeds})


# -- configurations ----------------------------------------------------------------------------------
def load_config(name: str, data_dir: Path, work_dir: Path, quick: bool) -> dict[str, Any]:
    """The CPU configuration of ``name``, with data and outputs redirected (and shrunk for ``quick``)."""
    config = yaml.safe_load((CONFIGS / f"{name}_cpu.yaml").read_text())
    config["data"]["init_args"]["data_dir"] = str(data_dir)
    config["trainer"]["logger"]["init_args"].update(save_dir=str(work_dir), name=name, version="run")
    config["fimoda"]["output_dir"] = str(work_dir / name / "fimoda")
    if quick:
        shrink(config)
    return config


def shrink(config: dict[str, Any]) -> None:
    """Tiny settings for a smoke test: a few epochs, seeds, LOO and test instances."""
    config["trainer"]["max_epochs"] = min(config["trainer"]["max_epochs"], 20)
    config["trainer"]["check_val_every_n_epoch"] = 20
    fimoda = config["fimoda"]
    fimoda.update(num_train=20, num_test=10)
    gold = fimoda["gold"]
    gold.update(seeds=4)
    if gold.get("eval_every", "epoch") == "epoch":
        gold["epochs"] = 3
    else:
        gold.pop("epochs", None)
        gold.update(steps=3 * int(gold["eval_every"]))
    for est in fimoda["estimators"]:
        if isinstance(est, dict) and est.get("name") == "lissa":
            est["depth"] = 20
        if isinstance(est, dict) and est.get("name") == "trak":
            est["proj_dim"] = 256


def fimoda_command(name: str, data_dir: Path) -> str:
    return f"fimoda run examples/configs/{name}_cpu.yaml --data.init_args.data_dir={data_dir}"
