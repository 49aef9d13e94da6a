"""The paper's models and datamodules, for the demo, the shipped configs and experiments.

Not part of the attribution core: nothing in ``lightning_fimoda`` outside this package imports it.
``lightning_fimoda.zoo.models`` holds ``MLP``, ``ResNet9`` (``[vision]`` extra for CIFAR-10 downloads)
and ``TextClassifier`` (``[text]`` extra: Hugging Face ``transformers``);
``lightning_fimoda.zoo.data`` the datamodules (tabular, CIFAR-10, SST-2). Use them as templates for
your own ``LightningModule`` with an ``attribution_task()`` method.
"""
