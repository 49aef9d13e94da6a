"""``fimoda verify RUN_DIR``: check a further-training run directory without running anything.

:func:`verify_run_dir` reads ``config.json`` (its fingerprint must match its recorded id), lists the
units the job consists of (seeds × chunks of ``J``, from the fingerprint and the stored layout),
verifies every unit file's checksum, seed, chunk and job id, and says which units a resume would
recompute (missing or corrupt ones). Nothing is moved or deleted.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..exceptions import MismatchError
from .store import UNIT_GLOB, CorruptUnitError, RunStore, read_unit

__all__ = ["VerifyResult", "add_verify_command", "run_verify", "verify_run_dir"]


@dataclass
class VerifyResult:
    """What :func:`verify_run_dir` found.

    Attributes:
        run_dir: the directory checked.
        config_ok: ``config.json`` exists, parses and matches its fingerprint id; ``config_error`` if not.
        units_expected / units_ok: how many units the job has, and how many verified.
        corrupt: ``{file name: reason}`` of unit files that fail verification.
        missing: ``(seed, chunk)`` of units not (yet) computed.
        stale_tmp: temporary files left by an interrupted write (removed at the next bind).
        unexpected: unit files that belong to no unit of this job.
    """

    run_dir: Path
    config_ok: bool
    config_error: str | None = None
    units_expected: int = 0
    units_ok: int = 0
    corrupt: dict[str, str] = field(default_factory=dict)
    missing: list[tuple[int, int]] = field(default_factory=list)
    stale_tmp: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Config and every present unit verified (missing units are fine: a resume computes them)."""
        return self.config_ok and not self.corrupt and not self.unexpected

    @property
    def to_recompute(self) -> list[tuple[int, int]]:
        """``(seed, chunk)`` of the units a resume would compute: corrupt and missing ones."""
        bad = [tuple(int(v) for v in name.split(".")[0][4:].split("_chunk")) for name in self.corrupt]
        return sorted(set(self.missing) | set(bad))

    def __str__(self) -> str:
        lines = [f"run_dir {self.run_dir}: {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        if not self.config_ok:
            lines.append(f"  config.json: {self.config_error}")
            return "\n".join(lines)
        lines.append(f"  config.json: fingerprint verified; units verified {self.units_ok}/{self.units_expected}")
        lines += [f"  corrupt: {name}: {why}" for name, why in self.corrupt.items()]
        lines += [f"  unexpected unit file: {name}" for name in self.unexpected]
        if self.stale_tmp:
            lines.append(f"  stale temporary files (removed at the next run): {self.stale_tmp}")
        todo = self.to_recompute
        lines.append(
            f"  a resume would compute {len(todo)} unit(s)" + (f": {_units_text(todo)}" if todo else "")
        )
        return "\n".join(lines)


def _units_text(units: list[tuple[int, int]]) -> str:
    text = ", ".join(f"seed {s} chunk {c}" for s, c in units[:10])
    return text + (f" (+{len(units) - 10} more)" if len(units) > 10 else "")


def verify_run_dir(path: str | Path) -> VerifyResult:
    """Verify ``config.json`` and every unit of the further-training run directory ``path``."""
    store = RunStore(path)
    result = VerifyResult(Path(path), config_ok=False)
    result.stale_tmp = sorted(p.name for p in [*store.root.glob("*.tmp"), *store.units.glob("*.tmp")])
    if not store.config_path.exists():
        result.config_error = "missing (this is not a further-training run directory, or it was never bound)"
        return result
    try:
        stored = store.read_config()
        fingerprint, layout = stored["fingerprint"], stored["layout"]
        seeds = [int(s) for s in fingerprint["further_training"]["seeds"]]
        chunks = math.ceil(len(fingerprint["loo_indices"]) / int(layout["chunk_size"]))
    except (MismatchError, KeyError, TypeError, ValueError) as err:
        result.config_error = str(err)
        return result
    result.config_ok = True
    expected = [(s, c) for s in seeds for c in range(chunks)]
    result.units_expected = len(expected)
    names = {store.unit_path(s, c).name: (s, c) for s, c in expected}
    result.unexpected = sorted(p.name for p in store.units.glob(UNIT_GLOB) if p.name not in names)
    for name, (seed, chunk) in names.items():
        unit = store.units / name
        if not unit.exists():
            result.missing.append((seed, chunk))
            continue
        try:
            read_unit(unit, seed, chunk, stored["fingerprint_id"])
            result.units_ok += 1
        except CorruptUnitError as err:
            result.corrupt[name] = str(err)
    return result


def add_verify_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``verify RUN_DIR`` to a CLI's subcommands (``fimoda verify``)."""
    parser = subparsers.add_parser(
        "verify", help="check a gold-standard run_dir: fingerprint, unit checksums, what would be recomputed"
    )
    parser.add_argument("run_dir", help="the FurtherTrainingLoop run_dir to check")
    return parser


def run_verify(args: argparse.Namespace) -> int:
    """Print the verification of ``args.run_dir``; exit status 0 when OK, 1 otherwise."""
    result = verify_run_dir(args.run_dir)
    print(result)
    return 0 if result.ok else 1
