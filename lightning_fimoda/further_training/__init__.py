"""Leave-one-out further training: the gold standard of SPEC §2 (see :class:`FurtherTrainingLoop`)."""

from .config import FurtherTrainingConfig
from .loop import CostEstimate, FurtherTrainingLoop
from .plan import TrainingPlan
from .retraining import RetrainingConfig, RetrainingLoop
from .schedule import Schedule, epoch_permutation

__all__ = [
    "CostEstimate",
    "FurtherTrainingConfig",
    "FurtherTrainingLoop",
    "RetrainingConfig",
    "RetrainingLoop",
    "Schedule",
    "TrainingPlan",
    "epoch_permutation",
]
