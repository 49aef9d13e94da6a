"""lightning-fimoda: final-model-only data attribution for PyTorch Lightning.

Sign convention (SPEC §1): a score ``τ(j, x)`` estimates ``f(x; θ without z_j) − f(x; θ)``;
positive = the training example helps (leaving it out would raise the test loss).
"""

from .attribute import attribute
from .callback import FiMODACallback
from .estimators.base import Estimator
from .evaluation.report import AttributionReport
from .functional import FunctionalTask
from .further_training import CostEstimate, FurtherTrainingLoop, RetrainingLoop
from .gold_standard import GoldStandard
from .gradients import GradientCache, PerSampleGradients, per_sample_gradients
from .registry import available_estimators, build_estimator, register_estimator
from .task import AttributionTask, SupervisedTask

__version__ = "0.1.0"

__all__ = [
    "AttributionReport",
    "AttributionTask",
    "CostEstimate",
    "Estimator",
    "FiMODACallback",
    "FunctionalTask",
    "FurtherTrainingLoop",
    "GoldStandard",
    "GradientCache",
    "PerSampleGradients",
    "RetrainingLoop",
    "SupervisedTask",
    "attribute",
    "available_estimators",
    "build_estimator",
    "per_sample_gradients",
    "register_estimator",
]
