"""Import optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .exceptions import MissingExtraError

__all__ = ["require"]

EXTRAS = {
    "kronfluence": "kronfluence",
    "trak": "trak",
    "transformers": "text",
    "torchvision": "vision",
}


def require(module: str, feature: str) -> ModuleType:
    """``import module`` or raise :class:`MissingExtraError` saying which extra ``feature`` needs."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRAS.get(top, top)
        raise MissingExtraError(
            f"{feature} needs the optional dependency {top!r}: pip install 'lightning-fimoda[{extra}]' "
            f"(or 'lightning-fimoda[all]'). ({err})"
        ) from err
