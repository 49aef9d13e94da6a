"""Resumable run directory: one checksummed file per finished unit of work, written atomically.

Layout of ``run_dir``::

    config.json                          the job's fingerprint (:mod:`.fingerprint`), its id and the
                                         unit layout (engine, chunk size); refuses any other job
    units/seed<S>_chunk<C>.safetensors   one unit: "loo" [C, n_test, k], "full" [C, n_test], and in
                                         its metadata seed, chunk, fingerprint id and a SHA-256 checksum
    units/corrupt/                       units that failed verification (moved aside, recomputed)
    computed.log                         one line per unit computed (seed, chunk, seconds, rank)
    gold_standard.safetensors            the assembled result, once every unit is done
    .lock                                held (``flock``) by the job computing in it; says which process

Binding is atomic: ``config.json`` is written to a temporary file and hard-linked into place, which
fails when it exists, so of two jobs started at once exactly one creates it and the other compares
against it (and is refused with :class:`~lightning_fimoda.exceptions.MismatchError` naming what
differs). While a job runs, its rank 0 holds an exclusive ``flock`` on ``.lock`` (released by the
operating system if the process dies), so a second live job on the same directory is refused with
:class:`~lightning_fimoda.exceptions.RunDirBusyError` before it touches anything. A unit file appears only complete (temporary file + ``os.replace``); a unit whose checksum,
seed, chunk or fingerprint does not match is named, moved to ``units/corrupt/`` and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._files import atomic_write
from ..exceptions import MismatchError, RunDirBusyError
from .fingerprint import differences, fingerprint_id

__all__ = ["CorruptUnitError", "RunStore", "unit_checksum"]

UNIT_GLOB = "seed*_chunk*.safetensors"


class CorruptUnitError(ValueError):
    """A unit file that cannot be trusted (unreadable, wrong checksum, wrong seed/chunk/job)."""


def unit_checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class RunStore:
    """Unit results of one further-training job in ``run_dir``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.root = Path(run_dir)
        self.units = self.root / "units"
        self.config_path = self.root / "config.json"
        self.job_id: str | None = None
        self._lock: Any = None

    def lock(self) -> None:
        """Hold the directory's lock for this process, or raise :class:`RunDirBusyError` naming the holder.

        Without ``fcntl`` (Windows) nothing is locked."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / ".lock", "a+")  # noqa: SIM115 - held open: it is the lock, closed by unlock()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            fh.close()
            raise RunDirBusyError(
                f"run_dir {str(self.root)!r} is in use by another job ({holder}): two jobs would compute "
                "the same units twice. Wait for it to finish, or use another run_dir."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._lock = fh

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (no-op when not held)."""
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def bind(self, fingerprint: dict[str, Any], layout: dict[str, Any]) -> dict[str, Any]:
        """Claim the directory for the job ``fingerprint`` (atomically), or check it is this job's.

        Returns the unit layout to use: ``layout`` for a new directory, the stored one otherwise.
        Raises :class:`MismatchError` naming the differing components, or when unit files exist
        without a ``config.json``; :class:`RunDirBusyError` when another live job holds the directory.
        Then holds its lock (:meth:`unlock` releases it) and cleans temporary files left by killed runs.
        """
        self.units.mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": fingerprint, "fingerprint_id": fingerprint_id(fingerprint), "layout": layout}
        if not self.config_path.exists():
            if any(self.units.glob(UNIT_GLOB)):
                raise MismatchError(
                    f"run_dir {str(self.root)!r} holds unit files but no config.json, so nothing says which "
                    "experiment they belong to. Move the units away (or restore config.json)."
                )
            self._create(record)
        stored = self.read_config()
        diff = differences(stored.get("fingerprint", {}), fingerprint)
        kinds = [f.get("kind", "further-training") for f in (stored.get("fingerprint", {}), fingerprint)]
        if kinds[0] != kinds[1]:  # re-training (kind "retraining") and further training never mix
            raise MismatchError(
                f"run_dir {str(self.root)!r} holds a {kinds[0]} job, not a {kinds[1]} one; use a new run_dir."
            )
        if diff:
            raise MismatchError(
                f"run_dir {str(self.root)!r} holds a further-training job with a different configuration "
                f"(differing: {diff}). Use a new run_dir, or delete this one to start over."
            )
        self.job_id = record["fingerprint_id"]
        self.lock()  # another live run of this job: refused here, before anything is touched
        self.clean_tmp()  # only once the directory is known to be this job's, and no one else writes it
        return dict(stored.get("layout", layout))

    def _create(self, record: dict[str, Any]) -> None:
        """Create ``config.json`` with its full content, failing silently when another job won."""
        text = json.dumps(record, indent=1, sort_keys=True)
        tmp = self.root / f"config.json.{os.getpid()}.tmp"
        tmp.write_text(text)
        try:
            os.link(tmp, self.config_path)  # atomic, and fails when the file exists
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    def read_config(self) -> dict[str, Any]:
        try:
            stored = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as err:
            raise MismatchError(f"{self.config_path} is unreadable ({err}); use a new run_dir.") from err
        if not isinstance(stored, dict) or stored.get("fingerprint_id") != fingerprint_id(
            stored.get("fingerprint", {})
        ):
            raise MismatchError(
                f"{self.config_path} is not a config written by this version of lightning-fimoda or was "
                "edited (its fingerprint id does not match its content); use a new run_dir."
            )
        return stored

    def clean_tmp(self) -> list[Path]:
        """Remove temporary files left by interrupted writes; returns them."""
        stale = [*self.root.glob("*.tmp"), *self.units.glob("*.tmp")]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def unit_path(self, seed: int, chunk: int) -> Path:
        return self.units / f"seed{seed}_chunk{chunk:05d}.safetensors"

    def has(self, seed: int, chunk: int) -> bool:
        return self.unit_path(seed, chunk).exists()

    def save(
        self, seed: int, chunk: int, loo: Tensor, full: Tensor | None, seconds: float, rank: int
    ) -> None:
        """Write one unit atomically with its checksum, then log it as computed."""
        tensors = {"loo": loo.contiguous().cpu()}
        if full is not None:
            tensors["full"] = full.contiguous().cpu()
        meta = {"seed": str(seed), "chunk": str(chunk), "job": str(self.job_id), "sha256": unit_checksum(tensors)}
        self.units.mkdir(parents=True, exist_ok=True)
        atomic_write(self.unit_path(seed, chunk), lambda tmp: save_file(tensors, tmp, metadata=meta))
        with open(self.root / "computed.log", "a") as fh:
            fh.write(f"seed={seed} chunk={chunk} seconds={seconds:.3f} rank={rank}\n")

    def load(self, seed: int, chunk: int) -> tuple[Tensor, Tensor | None]:
        """The unit's tensors, verified; raises :class:`CorruptUnitError` saying why not."""
        tensors = read_unit(self.unit_path(seed, chunk), seed, chunk, self.job_id)
        return tensors["loo"], tensors.get("full")

    def quarantine(self, seed: int, chunk: int) -> Path:
        """Move a bad unit to ``units/corrupt/`` (kept for inspection); returns its new path."""
        target = self.units / "corrupt" / f"{self.unit_path(seed, chunk).name}.{time.time_ns()}"
        target.parent.mkdir(exist_ok=True)
        os.replace(self.unit_path(seed, chunk), target)
        return target

    def computed_log(self) -> list[str]:
        """Lines of ``computed.log`` (one per unit computed, over every attempt)."""
        path = self.root / "computed.log"
        return path.read_text().splitlines() if path.exists() else []


def read_unit(path: Path, seed: int, chunk: int, job_id: str | None) -> dict[str, Tensor]:
    """Load and verify one unit file (checksum, seed, chunk and job id)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file is a corrupt unit
        raise CorruptUnitError(f"unit {path} is unreadable ({type(err).__name__}: {err})") from err
    want = {"seed": str(seed), "chunk": str(chunk)}
    if job_id is not None:
        want["job"] = job_id
    wrong = {k: meta.get(k) for k, v in want.items() if meta.get(k) != v}
    if wrong:
        raise CorruptUnitError(f"unit {path} belongs elsewhere (its metadata says {wrong}, expected {want})")
    if "loo" not in tensors or meta.get("sha256") != unit_checksum(tensors):
        raise CorruptUnitError(f"unit {path} fails its checksum (its content changed after it was written)")
    return tensors
