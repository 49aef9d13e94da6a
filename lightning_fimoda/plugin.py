"""Lightning plugin: a configured ``FiMODACallback`` on every ``Trainer``, with no change to the script.

Registered in the entry-point group ``lightning.pytorch.callbacks_factory`` (see ``pyproject.toml``),
which ``Trainer`` reads when it is created. When the environment variable ``LIGHTNING_FIMODA_CONFIG``
names a YAML file, the factory returns ``[FiMODACallback(...)]`` built from its ``fimoda`` section (or
from the whole file when it has no such section; schema in :mod:`lightning_fimoda.cli`). Without the
variable it returns ``[]`` and imports nothing.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ENV_VAR", "callbacks_factory"]

ENV_VAR = "LIGHTNING_FIMODA_CONFIG"


def callbacks_factory() -> list[Any]:
    """The callbacks to add to a new ``Trainer``: one ``FiMODACallback`` when ``$LIGHTNING_FIMODA_CONFIG`` is set."""
    path = os.environ.get(ENV_VAR, "").strip()
    if not path:
        return []
    from .cli import callback_from_config

    return [callback_from_config(path)]
