"""Built-in estimators; importing this package registers them.

Modules that wrap optional heavy libraries (kronfluence, traker) import those libraries only when an
estimator is fitted, so registration stays cheap.
"""

from .base import Estimator
from .config import EstimatorConfig
from .datainf import DataInf
from .first_order import GradCos, GradDot
from .influence import InfluenceConfig, InfluenceFunction, SolverDivergenceError
from .kronfluence_adapter import EKFAC, KFAC, DiagonalFisher, KronfluenceIdentity
from .trak_adapter import TRAK

__all__ = [
    "DataInf",
    "DiagonalFisher",
    "EKFAC",
    "Estimator",
    "EstimatorConfig",
    "GradCos",
    "GradDot",
    "InfluenceConfig",
    "InfluenceFunction",
    "KFAC",
    "KronfluenceIdentity",
    "SolverDivergenceError",
    "TRAK",
]
