"""kronfluence's ``identity`` strategy (no curvature) as the Grad-Dot peer.

It runs through our kronfluence adapter class ``KronfluenceIdentity`` (kronfluence's own Analyzer,
factors and pairwise scores; the adapter only supplies the task and maps signs). kronfluence returns
``g_x · g_j`` over its tracked ``nn.Linear``/``nn.Conv2d`` modules, which the adapter divides by ``n``:
Grad-Dot's sign, scale ``1/n`` (cosine ignores it). BatchNorm parameters are not tracked.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from lightning_fimoda import attribute

from .harness import Unsupported
from .problems import Problem


def grad_dot(p: Problem) -> Tensor:
    try:
        from lightning_fimoda.estimators.kronfluence_adapter import KronfluenceIdentity
    except ImportError as err:
        raise Unsupported(f"KronfluenceIdentity not importable: {err}") from err
    est = KronfluenceIdentity(label="kronfluence identity")
    return attribute(p.model, p.task, p.train, p.test, [est])["kronfluence identity"]


RUNNERS: dict[str, Callable[[Problem], Tensor]] = {"grad_dot": grad_dot, "grad_dot (Linear/Conv2d params)": grad_dot}
