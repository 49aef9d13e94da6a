"""Leave-one-out further training: the gold standard of SPEC §2 (see :class:`FurtherTrainingLoop`)."""

from .loop import CostEstimate, FurtherTrainingLoop
from .optimizers import OptimizerConfig
from .spec import TrainingSpec, epoch_permutation

__all__ = ["CostEstimate", "FurtherTrainingLoop", "OptimizerConfig", "TrainingSpec", "epoch_permutation"]
