"""Interleaved timing, peak memory and score agreement for one method across libraries.

Each method row runs ours and every peer that has it in turn, ``repeats`` times (A B C A B C …, so
machine drift hits every library alike); each call is wrapped in
:class:`~lightning_fimoda.profiling.PeakMemory` and timed twice: CPU time of the process
(``process_time``: user + system, all threads) and wall time (``perf_counter``). The ratio is taken on
CPU time: on a shared machine with more runnable jobs than cores, wall time is mostly waiting for a
core (we measured wall = 5–12 × CPU time at a load of 14–17 on 2 cores) and its medians swing by
2× between runs; with one thread per library and no I/O, CPU time is what the wall time would be on
an idle machine. The wall ratio is printed beside it. A peer that cannot express the problem raises
:class:`Unsupported`; the row then carries the reason instead of numbers.
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_fimoda.profiling import PeakMemory

Runner = Callable[[], Tensor]  # returns scores [n_test, n_train] in SPEC §1's sign and orientation


class Unsupported(Exception):
    """The peer cannot express this problem/method; the message is the reason printed in the table."""


@dataclass
class Measured:
    seconds: list[float]  # CPU seconds (process_time)
    peaks: list[int]
    scores: Tensor
    wall: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_wall_s(self) -> float:
        return statistics.median(self.wall)

    @property
    def peak_mib(self) -> float:
        return statistics.median(self.peaks) / 2**20


@dataclass
class Row:
    problem: str
    method: str
    peer: str
    ours: Measured | None = None
    theirs: Measured | None = None
    reason: str = ""
    note: str = ""

    def cells(self) -> list[str]:
        head = [self.problem, self.method, self.peer]
        if self.reason or self.ours is None or self.theirs is None:
            return [*head, "—", "—", "—", "—", "—", "—", self.reason or "not run"]
        ratio = self.theirs.median_s / self.ours.median_s
        wall = self.theirs.median_wall_s / self.ours.median_wall_s
        cos = cosine(self.ours.scores, self.theirs.scores)
        return [*head, f"{ratio:.2f}", f"{self.ours.median_s:.2f}", f"{self.theirs.median_s:.2f}", f"{wall:.2f}",
                f"{self.ours.peak_mib:.0f} / {self.theirs.peak_mib:.0f}", f"{cos:.4f}", self.note]


def cosine(a: Tensor, b: Tensor) -> float:
    """Mean over test instances of the cosine between score rows (SPEC §4's agreement measure)."""
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        raise ValueError(f"score shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item()


def _once(fn: Runner) -> tuple[float, float, int, Tensor]:
    """``(CPU seconds, wall seconds, peak bytes, scores)`` of one call."""
    with PeakMemory("cpu") as meter:
        start, wall = time.process_time(), time.perf_counter()
        scores = fn()
        seconds, wall = time.process_time() - start, time.perf_counter() - wall
    return seconds, wall, meter.peak_bytes, scores.detach().float().cpu()


def measure(problem: str, method: str, ours: Runner, peers: dict[str, Runner], repeats: int,
            notes: dict[str, str]) -> list[Row]:
    """Run ours and each peer interleaved ``repeats`` times; one :class:`Row` per peer."""
    rows = {name: Row(problem, method, name, note=notes.get(name, "")) for name in peers}
    live = dict(peers)
    mine: Measured | None = None
    for _ in range(repeats):
        try:
            s, w, m, sc = _once(ours)
        except Exception as err:  # ours refusing (e.g. an indefinite H + λI in CG) is a result too
            why = f"ours failed: {type(err).__name__}: {str(err)[:110]}"
            return [Row(problem, method, name, reason=why) for name in peers]
        mine = Measured([s], [m], sc, [w]) if mine is None else _append(mine, s, w, m)
        for name, fn in list(live.items()):
            try:
                s, w, m, sc = _once(fn)
            except Unsupported as err:
                rows[name].reason, live = str(err), {k: v for k, v in live.items() if k != name}
                continue
            except Exception as err:  # a peer's own failure is a result too: report it, keep going
                traceback.print_exc()
                rows[name].reason = f"peer failed: {type(err).__name__}: {str(err)[:90]}"
                live = {k: v for k, v in live.items() if k != name}
                continue
            r = rows[name]
            r.theirs = Measured([s], [m], sc, [w]) if r.theirs is None else _append(r.theirs, s, w, m)
    for r in rows.values():
        r.ours = mine
    return list(rows.values())


def _append(meas: Measured, seconds: float, wall: float, peak: int) -> Measured:
    meas.seconds.append(seconds)
    meas.wall.append(wall)
    meas.peaks.append(peak)
    return meas


HEADER = ["problem", "method", "peer", "CPU time peer/ours", "ours CPU s", "peer CPU s", "wall peer/ours",
          "peak MiB ours / peer",
          "cosine", "note / reason"]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)
