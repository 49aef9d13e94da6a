"""Content hashes of what decides attribution numbers: a model's architecture and weights, a task, data.

Used by the gold standard's run directories (:mod:`lightning_fimoda.further_training.fingerprint`) and
by the saved estimator scores (:mod:`lightning_fimoda.score_store`), so neither can return numbers of
another experiment. Tensors are hashed as raw bytes on the CPU (device-independent; a fast path for
``TensorDataset`` and its ``Subset``), other values by type and content, classes and functions by their
code: the syntax tree of their source, so docstrings, comments and layout do not count (editing a model's
docstring must not orphan a resumable run) while any change to what the code does does.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._data import _tensor_columns, dataset_length
from .task import AttributionTask

__all__ = ["dataset_digest", "model_architecture", "model_digest", "task_digest"]

_TORCH_MODULES = ("torch.", "lightning.", "pytorch_lightning.")


def model_architecture(model: nn.Module) -> str:
    """Hash of the module tree (reprs, the source of non-torch classes) and of the parameter / buffer
    names, shapes, dtypes and trainability."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}:{module.extra_repr()}:{_class_source(type(module))}".encode())
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind} {name} {tuple(t.shape)} {t.dtype} {t.requires_grad}".encode())
    return h.hexdigest()[:20]


def model_digest(model: nn.Module) -> str:
    """Hash of every weight and buffer (values and dtypes; device-independent)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _feed(h, t)
    return h.hexdigest()[:20]


def task_digest(task: AttributionTask) -> str:
    """Hash of the task: its own ``fingerprint()`` if it has one, else its classes' source and attributes."""
    own = getattr(task, "fingerprint", None)
    h = hashlib.sha256()
    if callable(own):
        h.update(f"{type(task).__qualname__}:{own()!r}".encode())
        return h.hexdigest()[:20]
    for cls in type(task).__mro__:
        if cls is not object:
            h.update(_class_source(cls).encode())
    for key, value in sorted(vars(task).items()):
        h.update(key.encode())
        _feed(h, value)
    return h.hexdigest()[:20]


def dataset_digest(dataset: Any, indices: Tensor | None = None) -> str:
    """Streaming hash of the items ``indices`` (default: all) of a map-style dataset."""
    n = dataset_length(dataset, "dataset")
    idx = torch.arange(n) if indices is None else indices
    h = hashlib.sha256(f"{idx.numel()} items".encode())
    columns = _tensor_columns(dataset, idx)
    if columns is not None:
        for column in columns:
            _feed(h, column)
        return h.hexdigest()[:20]
    for i in idx.tolist():
        _feed(h, dataset[i])
    return h.hexdigest()[:20]


@functools.cache
def _class_source(cls: type) -> str:
    """The class's code (:func:`_code` of its source) or its name, once per class object (its code cannot
    change while it exists; reading and parsing the source was most of a short job's fingerprint time)."""
    if cls.__module__.startswith(_TORCH_MODULES) or cls.__module__ == "builtins":
        return f"{cls.__module__}.{cls.__qualname__}"
    try:
        return f"{cls.__qualname__}:{_code(inspect.getsource(cls))}"
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


def _code(source: str) -> str:
    """``source``'s syntax tree without docstrings (comments and layout are not in it); the source itself
    when it does not parse alone."""
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _feed(h: Any, value: Any, depth: int = 0) -> None:
    """Add ``value``'s type and content to the hash ``h`` (nested containers walked)."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v, depth + 1)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _feed(h, value[k], depth + 1)
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        h.update(repr(value).encode())
    elif callable(value) and hasattr(value, "__code__"):  # functions: by their source
        try:
            h.update(_code(inspect.getsource(value)).encode())
        except (OSError, TypeError):
            h.update(value.__code__.co_code)
    elif hasattr(value, "tobytes"):  # PIL images and the like
        h.update(f"B{type(value).__qualname__}".encode())
        h.update(value.tobytes())
    elif hasattr(value, "__dict__") and depth < 4:
        h.update(_class_source(type(value)).encode())
        _feed(h, dict(vars(value)), depth + 1)
    else:
        h.update(f"{type(value).__qualname__}:{value!r}".encode())
