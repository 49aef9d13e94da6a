"""Built-in estimators; importing this package registers them.

Modules that wrap optional heavy libraries (kronfluence, traker) import those libraries only when an
estimator is fitted, so registration stays cheap.
"""

from .base import Estimator
from .datainf import DataInf
from .first_order import GradCos, GradDot
from .horizon import HorizonInfluence as HorizonInfluence
from .influence import (
    ArnoldiInfluence,
    CGInfluence,
    ExplicitInfluence,
    InfluenceFunction,
    LissaInfluence,
    SolverDivergenceError,
)
from .kronfluence_adapter import EKFAC, KFAC, DiagonalFisher, KronfluenceIdentity
from .trak_adapter import TRAK

__all__ = [
    "ArnoldiInfluence",
    "CGInfluence",
    "DataInf",
    "DiagonalFisher",
    "EKFAC",
    "Estimator",
    "ExplicitInfluence",
    "GradCos",
    "GradDot",
    "InfluenceFunction",
    "KFAC",
    "KronfluenceIdentity",
    "LissaInfluence",
    "SolverDivergenceError",
    "TRAK",
]
