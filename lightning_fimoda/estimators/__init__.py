"""Built-in estimators; importing this package registers them.

Modules that wrap optional heavy libraries (kronfluence, traker) import those libraries only when an
estimator is fitted, so registration stays cheap.
"""

from .base import Estimator
from .first_order import GradCos, GradDot

__all__ = ["Estimator", "GradCos", "GradDot"]
