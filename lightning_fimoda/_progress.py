"""Feedback on long work: one ``progress`` switch with one default everywhere.

``progress=None`` (the default of ``attribute()``, ``run_estimators`` and ``FiMODACallback``) means *auto*:
progress bars in an interactive terminal, and, when stderr is not a terminal (logs, CI), one line per
stage with the elapsed time and an ETA instead of bars. ``True``: bars always; ``False``: silent.

Long jobs counted in work items (the further-training loop's run-steps) take their ETA from a
:class:`WorkClock`, shown by a :class:`ClockBar`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["ClockBar", "StageLog", "WorkClock", "interactive", "show_bars"]


def interactive() -> bool:
    """Whether stderr is an interactive terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def show_bars(progress: bool | None) -> bool:
    """Progress bars for ``progress``: explicit ``True``/``False``, or ``None`` = only in a terminal."""
    return interactive() if progress is None else bool(progress)


class StageLog:
    """One stderr line per finished stage with elapsed time and an ETA (active for ``progress=None``
    outside a terminal). The ETA assumes the remaining stages take the mean time of the finished ones."""

    def __init__(self, total: int, progress: bool | None, what: str = "stage") -> None:
        self.total, self.what = total, what
        self.enabled = progress is None and not interactive()
        self.done = 0
        self.start = time.perf_counter()

    def finished(self, name: str, seconds: float, note: str = "", eta: float | None = None) -> None:
        """Report that stage ``name`` finished after ``seconds``; ``eta``: the caller's own estimate of
        the remaining seconds (default: the mean time of the finished stages times those left)."""
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        left = self.total - self.done
        eta = (elapsed / self.done * left) if eta is None else eta
        eta = f", ETA {eta:.0f} s" if left else ""
        extra = f" ({note})" if note else ""
        print(
            f"fimoda: {self.what} {self.done}/{self.total} {name} done in {seconds:.1f} s{extra}; "
            f"elapsed {elapsed:.0f} s{eta}",
            file=sys.stderr,
            flush=True,
        )


class WorkClock:
    """Rate and ETA of a job of equal-cost work items, with the first item's warm-up left out.

    Call :meth:`advance` after each piece of work. The rate is the work done since the *end of the
    first piece* over the time since then: the first piece also pays one-off costs (tracing,
    allocation, caches), and a plain work/elapsed rate would carry them into every later estimate.
    ``None`` until a second piece has been done. ``timer``: seconds, monotonic (tests pass a fake).
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.timer = timer
        self.start = timer()
        self.work = 0
        self._mark: tuple[float, int] | None = None

    def advance(self, n: int) -> None:
        self.work += n
        if self._mark is None:
            self._mark = (self.timer(), self.work)

    def elapsed(self) -> float:
        return self.timer() - self.start

    def rate(self) -> float | None:
        """Work items per second since the first piece (``None``: not measurable yet)."""
        if self._mark is None or self.work == self._mark[1]:
            return None
        seconds = self.timer() - self._mark[0]
        return (self.work - self._mark[1]) / seconds if seconds > 0 else None

    def eta(self, remaining: int) -> float | None:
        """Seconds for ``remaining`` more work items at :meth:`rate`."""
        rate = self.rate()
        return remaining / rate if rate else None


class ClockBar(tqdm):
    """A tqdm bar whose rate, and so its ETA, comes from a :class:`WorkClock` once it has one
    (tqdm's own smoothed rate before that); ``update(n)`` also advances the clock."""

    def __init__(self, *args: Any, clock: WorkClock, **kwargs: Any) -> None:
        self.clock = clock  # set first: tqdm's __init__ may already render
        super().__init__(*args, **kwargs)

    def update(self, n: int = 1) -> bool | None:
        self.clock.advance(n)
        return super().update(n)

    @property
    def format_dict(self) -> dict[str, Any]:
        values = super().format_dict
        rate = self.clock.rate()
        if rate:
            values["rate"] = rate
        return values
