"""Resumable run directory: one file per finished unit of work, written atomically.

Layout of ``run_dir``::

    config.json                      the job's configuration and fingerprints (refuses a different one)
    units/seed<S>_chunk<C>.safetensors   measurements of one unit: "loo" [C, n_test, k], "full" [C, n_test]
    computed.log                     one line per unit computed (seed, chunk, seconds, rank)
    gold_standard.safetensors        the assembled result, once every unit is done

A unit file appears only complete (temporary file + ``os.replace``), so a run killed at any moment
leaves only whole units behind, and re-running the same configuration skips them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from .._files import atomic_write

__all__ = ["RunStore"]


class RunStore:
    """Unit results of one further-training job in ``run_dir``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.root = Path(run_dir)
        self.units = self.root / "units"

    def bind(self, config: dict[str, Any], write: bool = True) -> None:
        """Claim the directory for ``config`` (write it, or check it against the stored one).

        Raises ``ValueError`` naming the differing keys when the directory holds another job.
        """
        path = self.root / "config.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored != json.loads(json.dumps(config)):
                keys = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
                raise ValueError(
                    f"run_dir {str(self.root)!r} holds a further-training job with a different configuration "
                    f"(differing: {keys}). Use a new run_dir, or delete this one to start over."
                )
            return
        if write:
            self.units.mkdir(parents=True, exist_ok=True)
            atomic_write(
                path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1, sort_keys=True))
            )

    def unit_path(self, seed: int, chunk: int) -> Path:
        return self.units / f"seed{seed}_chunk{chunk:05d}.safetensors"

    def has(self, seed: int, chunk: int) -> bool:
        return self.unit_path(seed, chunk).exists()

    def save(
        self, seed: int, chunk: int, loo: Tensor, full: Tensor | None, seconds: float, rank: int
    ) -> None:
        """Write one unit atomically, then log it as computed."""
        tensors = {"loo": loo.contiguous().cpu()}
        if full is not None:
            tensors["full"] = full.contiguous().cpu()
        self.units.mkdir(parents=True, exist_ok=True)
        atomic_write(self.unit_path(seed, chunk), lambda tmp: save_file(tensors, tmp))
        with open(self.root / "computed.log", "a") as fh:
            fh.write(f"seed={seed} chunk={chunk} seconds={seconds:.3f} rank={rank}\n")

    def load(self, seed: int, chunk: int) -> tuple[Tensor, Tensor | None]:
        tensors = load_file(str(self.unit_path(seed, chunk)))
        return tensors["loo"], tensors.get("full")

    def computed_log(self) -> list[str]:
        """Lines of ``computed.log`` (one per unit computed, over every attempt)."""
        path = self.root / "computed.log"
        return path.read_text().splitlines() if path.exists() else []

