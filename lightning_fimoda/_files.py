"""File helpers: atomic writes (results that survive interruption) and scratch directories for the
external libraries that insist on writing files (kronfluence, traker)."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    Readers see either the old file or the complete new one, never a partial write.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask (e.g. ``0o644``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class WorkDir:
    """A fresh directory per fit, so a library never finds (and silently reuses) earlier results.

    Under ``output_dir`` when given (kept for inspection); otherwise a private temporary directory,
    removed by :meth:`release`, on the next :meth:`new`, or when ``owner`` is garbage-collected.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self._cleanup: weakref.finalize | None = None

    def new(self, owner: object, prefix: str, output_dir: str | os.PathLike | None = None) -> Path:
        self.release()
        if output_dir is not None:
            base = Path(output_dir)
            base.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=base))
        else:
            self.path = Path(tempfile.mkdtemp(prefix=f"fimoda-{prefix}-"))
            self._cleanup = weakref.finalize(owner, shutil.rmtree, self.path, True)
        return self.path

    def exists(self) -> bool:
        return self.path is not None and self.path.exists()

    def release(self) -> None:
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
        self.path = None
