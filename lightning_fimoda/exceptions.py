"""Every error lightning-fimoda raises on purpose, in one place.

Each class also derives from the built-in exception a caller would expect (``ValueError`` for a bad
setting, ``RuntimeError`` for a solver that failed, ...), so ``except ValueError`` keeps working.
Errors from kronfluence, traker or torch are wrapped in one of these with what the user can do.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DivergenceError",
    "FiMODAError",
    "MismatchError",
    "MissingExtraError",
    "NonFiniteError",
    "NotFittedError",
    "PrecisionError",
    "SolverDivergenceError",
]


class FiMODAError(Exception):
    """Base class of lightning-fimoda's own errors."""


class ConfigurationError(FiMODAError, ValueError):
    """A setting, argument or input is invalid; raised before any expensive work."""


class NotFittedError(FiMODAError, RuntimeError):
    """A method that needs ``fit()`` (or ``setup()``) was called before it."""


class DivergenceError(FiMODAError, RuntimeError):
    """An iterative solver diverged; its iterates are discarded, never returned as scores."""


SolverDivergenceError = DivergenceError  # the name used before the exceptions module existed


class MismatchError(FiMODAError, ValueError):
    """Stored work (a run directory, another rank) belongs to a different experiment."""


class RunDirBusyError(FiMODAError, RuntimeError):
    """Another live job holds the run directory (two jobs would compute the same units twice and clean
    up each other's temporary files); the message names its process."""


class PrecisionError(FiMODAError, TypeError):
    """A dtype or device the computation cannot give trustworthy numbers in (half precision, meta)."""


class NonFiniteError(FiMODAError, FloatingPointError):
    """A NaN or infinity in data, weights, measurements or scores; the message says where."""


class MissingExtraError(FiMODAError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""
