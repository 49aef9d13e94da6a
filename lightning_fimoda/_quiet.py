"""Run third-party attribution libraries under our own logging settings.

kronfluence and traker issue Python warnings (mostly deprecation notices about their own use of
torch) and configure logging globally (traker calls ``logging.basicConfig()``).
:func:`library_output` wraps their calls so that

- their warnings are re-issued on our logger ``lightning_fimoda.<source>``: ``FutureWarning`` /
  ``DeprecationWarning`` about the library's internals at DEBUG, every other warning at WARNING.
  Users see them through standard logging (Python's last-resort handler prints warnings to stderr),
  tests stay quiet (pytest captures log records);
- handlers that the library adds to the root logger are removed again afterwards.

:func:`quiet_attribution` wraps a whole attribution (callback, CLI): Lightning's "💡 Tip" lines are
dropped and third-party ``FutureWarning`` / ``DeprecationWarning`` are ignored; lightning-fimoda's own
warnings still show.

Their progress bars are the callers' business: each estimator passes its ``progress`` argument to
the library's own switch, or patches the bar where there is none.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["library_output", "logger", "quiet_attribution"]

_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def logger(source: str) -> logging.Logger:
    """Our logger for messages about the third-party library ``source``."""
    return logging.getLogger(f"lightning_fimoda.{source}")


@contextlib.contextmanager
def library_output(source: str) -> Iterator[logging.Logger]:
    """Capture warnings raised by a third-party library and re-issue them on our logger.

    Yields the logger (``lightning_fimoda.<source>``) for the caller's own messages.
    """
    log = logger(source)
    root = logging.getLogger()
    root_handlers = list(root.handlers)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield log
    finally:
        for handler in list(root.handlers):
            if handler not in root_handlers:
                root.removeHandler(handler)
        seen: set[tuple[str, str]] = set()
        for w in caught:
            key = (w.category.__name__, str(w.message))
            if key in seen:
                continue
            seen.add(key)
            internal = issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))
            level = logging.DEBUG if internal else logging.WARNING
            log.log(level, "%s from %s: %s (%s:%s)", w.category.__name__, source, w.message, w.filename, w.lineno)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


@contextlib.contextmanager
def quiet_attribution() -> Iterator[None]:
    """Drop Lightning's tips and third-party ``FutureWarning`` / ``DeprecationWarning`` inside the block."""
    tips = _NoTips()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    for log in loggers:
        log.addFilter(tips)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category)
                warnings.filterwarnings("default", category=category, module=r"lightning_fimoda")
            yield
    finally:
        for log in loggers:
            log.removeFilter(tips)
