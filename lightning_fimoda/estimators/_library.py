"""Calling optional third-party attribution libraries (kronfluence, traker): imports that name the
extra to install, and their errors wrapped in ours with what the user can do."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch

from .._optional import require
from ..exceptions import ConfigurationError, FiMODAError, NonFiniteError

__all__ = ["library_errors", "library_module"]

_NON_FINITE_HINTS = ("nan", "inf", "non-finite", "not finite", "ill-conditioned", "singular", "converge")


def library_module(module: str, label: str) -> ModuleType:
    """``import module`` (e.g. ``"kronfluence.analyzer"``) or a :class:`MissingExtraError` for ``label``."""
    return require(module, f"the {label!r} estimator")


@contextlib.contextmanager
def library_errors(label: str, library: str) -> Iterator[None]:
    """Re-raise any error of ``library`` as :class:`NonFiniteError` (NaN / infinite / singular numbers)
    or :class:`ConfigurationError`, naming the estimator and what to try; our own errors pass."""
    try:
        yield
    except FiMODAError:
        raise
    except Exception as err:  # noqa: BLE001 - wrapped with context, original chained
        text = f"{type(err).__name__}: {err}".strip()
        if isinstance(err, (torch.linalg.LinAlgError, FloatingPointError)) or any(
            hint in text.lower() for hint in _NON_FINITE_HINTS
        ):
            raise NonFiniteError(
                f"{label}: {library} failed on non-finite or singular numbers ({text[:300]}). Check that the "
                "training data, the test data and the model weights are finite (torch.isfinite), or raise damping."
            ) from err
        raise ConfigurationError(
            f"{label}: {library} failed ({text[:300]}). Check the task's methods on a batch of the dataset, "
            "the parameter selection (params=) and the estimator's settings; or use a native estimator."
        ) from err
