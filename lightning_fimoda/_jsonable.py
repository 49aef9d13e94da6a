"""Plain-JSON values for reports and stores, and the library versions a report records."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from torch import Tensor

__all__ = ["jsonable", "library_versions"]

_VERSIONED = ("torch", "lightning", "torchmetrics", "numpy", "lightning-fimoda", "kronfluence", "traker")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that produce the numbers."""
    out = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples → lists, tensors → numbers/lists, other objects → ``repr``)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return repr(value)
