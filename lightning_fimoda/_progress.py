"""Feedback on long work: one ``progress`` switch with one default everywhere.

``progress=None`` (the default of ``attribute()``, ``run_estimators`` and ``FiMODACallback``) means *auto*:
progress bars in an interactive terminal, and, when stderr is not a terminal (logs, CI), one line per
stage with the elapsed time and an ETA instead of bars. ``True``: bars always; ``False``: silent.
"""

from __future__ import annotations

import sys
import time

__all__ = ["StageLog", "interactive", "show_bars"]


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

    def finished(self, name: str, seconds: float, note: str = "") -> None:
        """Report that stage ``name`` finished after ``seconds``."""
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        left = self.total - self.done
        eta = f", ETA {elapsed / self.done * left:.0f} s" if left else ""
        extra = f" ({note})" if note else ""
        print(
            f"fimoda: {self.what} {self.done}/{self.total} {name} done in {seconds:.1f} s{extra}; "
            f"elapsed {elapsed:.0f} s{eta}",
            file=sys.stderr,
            flush=True,
        )
