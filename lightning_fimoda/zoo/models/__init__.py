"""The paper's models as LightningModules with its training hyperparameters as defaults.

Each provides ``attribution_task()``, so ``attribute(model, model.attribution_task(), ...)`` and
``FiMODACallback`` need nothing else.
"""

from .mlp import MLP, PAPER_LEARNING_RATES
from .resnet import ResNet9
from .text import TextClassificationTask, TextClassifier

__all__ = ["MLP", "PAPER_LEARNING_RATES", "ResNet9", "TextClassificationTask", "TextClassifier"]
