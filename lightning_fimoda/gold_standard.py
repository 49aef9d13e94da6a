"""``GoldStandard``: the results of leave-one-out further training (SPEC §2) and its adjustments.

Stored are the raw measurements, so every adjustment and any subset of seeds can be derived later:

- ``loo[s, c, t, j] = f(x_t; θ^{−j}_{s,c})`` — after further training without ``z_j`` (seed ``s``,
  checkpoint ``c``), shape ``[S, C, n_test, m]``;
- ``full[s, c, t] = f(x_t; θ^{full}_{s,c})`` — further training on all data, ``[S, C, n_test]``, or
  ``None`` when only the ``mean`` adjustment was requested (the full run is then skipped).

Adjusted per-seed differences (``D`` of SPEC §2, sign: positive = ``z_j`` helps ``f(x)``):

- ``mean``: ``D_s − mean_{j'} D_s = loo_s − mean_{j'} loo_s`` (the full run cancels);
- ``full``: ``loo_s − full_s``.

``scores(adjust)`` averages them over seeds: ``G_t(j, x)`` as ``[C, n_test, m]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._files import atomic_write

__all__ = ["GoldStandard"]

Adjust = Literal["mean", "full"]


@dataclass
class GoldStandard:
    """Leave-one-out further-training measurements and the gold attribution scores derived from them.

    Attributes:
        loo: ``[S, C, n_test, m]`` measurements after LOO further training.
        full: ``[S, C, n_test]`` measurements after full-data further training, or ``None``.
        checkpoints: ``C`` epoch or step numbers at which ``f`` was evaluated.
        checkpoint_unit: ``"epoch"`` or ``"step"``.
        seeds: the ``S`` seeds, in the order of ``loo``'s first axis.
        loo_indices: ``[m]`` training indices left out (the set ``J``).
        test_indices: ``[n_test]`` test indices measured.
        config: the further-training configuration (JSON-serialisable).
    """

    loo: Tensor
    full: Tensor | None
    checkpoints: list[int]
    checkpoint_unit: str
    seeds: list[int]
    loo_indices: Tensor
    test_indices: Tensor
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s, c, t, m = self.loo.shape
        if (s, c, t, m) != (len(self.seeds), len(self.checkpoints), self.test_indices.numel(), self.loo_indices.numel()):
            raise ValueError(
                f"GoldStandard: loo has shape {tuple(self.loo.shape)}, expected "
                f"[{len(self.seeds)} seeds, {len(self.checkpoints)} checkpoints, "
                f"{self.test_indices.numel()} tests, {self.loo_indices.numel()} LOO instances]."
            )
        if self.full is not None and tuple(self.full.shape) != (s, c, t):
            raise ValueError(f"GoldStandard: full has shape {tuple(self.full.shape)}, expected {(s, c, t)}.")

    @property
    def adjustments(self) -> tuple[str, ...]:
        """Adjustments available: ``("mean",)``, plus ``"full"`` when the full run was made."""
        return ("mean", "full") if self.full is not None else ("mean",)

    def _seed_positions(self, seeds: Sequence[int] | None) -> list[int]:
        if seeds is None:
            return list(range(len(self.seeds)))
        missing = [s for s in seeds if s not in self.seeds]
        if missing:
            raise KeyError(f"Seeds {missing} were not run; available: {self.seeds}.")
        if not seeds:
            raise ValueError("seeds must not be empty.")
        return [self.seeds.index(s) for s in seeds]

    def differences(self, adjust: Adjust = "mean", seeds: Sequence[int] | None = None) -> Tensor:
        """Adjusted per-seed differences ``[S', C, n_test, m]`` (before averaging over seeds)."""
        pos = self._seed_positions(seeds)
        loo = self.loo[pos]
        if adjust == "mean":
            return loo - loo.mean(dim=-1, keepdim=True)
        if adjust == "full":
            if self.full is None:
                raise ValueError(
                    "The 'full' adjustment needs the full-data run, which was skipped: run "
                    "FurtherTrainingLoop with adjustments=('mean', 'full')."
                )
            return loo - self.full[pos].unsqueeze(-1)
        raise ValueError(f"adjust must be 'mean' or 'full', got {adjust!r}.")

    def scores(self, adjust: Adjust = "mean", seeds: Sequence[int] | None = None) -> Tensor:
        """Gold attribution scores ``G_t(j, x)`` as ``[C, n_test, m]``, averaged over ``seeds``."""
        return self.differences(adjust, seeds).mean(dim=0)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write to one ``.safetensors`` file (tensors + JSON metadata), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "loo": self.loo.contiguous(),
            "loo_indices": self.loo_indices.contiguous(),
            "test_indices": self.test_indices.contiguous(),
        }
        if self.full is not None:
            tensors["full"] = self.full.contiguous()
        meta = {
            "checkpoints": self.checkpoints,
            "checkpoint_unit": self.checkpoint_unit,
            "seeds": self.seeds,
            "config": self.config,
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"gold_standard": json.dumps(meta)}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GoldStandard:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["gold_standard"])
        tensors = load_file(str(path))
        return cls(
            loo=tensors["loo"],
            full=tensors.get("full"),
            checkpoints=[int(c) for c in meta["checkpoints"]],
            checkpoint_unit=meta["checkpoint_unit"],
            seeds=[int(s) for s in meta["seeds"]],
            loo_indices=tensors["loo_indices"],
            test_indices=tensors["test_indices"],
            config=meta["config"],
        )

    def __repr__(self) -> str:
        s, c, t, m = self.loo.shape
        return (
            f"GoldStandard(seeds={s}, checkpoints={c} ({self.checkpoint_unit}s), n_test={t}, m={m}, "
            f"adjustments={self.adjustments})"
        )

    def equals(self, other: GoldStandard) -> bool:
        """Exact equality of every tensor and field."""
        same_full = (self.full is None and other.full is None) or (
            self.full is not None and other.full is not None and torch.equal(self.full, other.full)
        )
        return (
            torch.equal(self.loo, other.loo)
            and same_full
            and self.checkpoints == other.checkpoints
            and self.checkpoint_unit == other.checkpoint_unit
            and self.seeds == other.seeds
            and torch.equal(self.loo_indices, other.loo_indices)
            and torch.equal(self.test_indices, other.test_indices)
            and self.config == other.config
        )
