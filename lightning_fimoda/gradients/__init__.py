"""Per-sample gradients within a memory budget: the engine, the cache, streaming products.

See :mod:`.engine` (``vmap(grad)`` in chunks), :mod:`.budget` (how big a chunk and the resident sets
may be), :mod:`.cache` (:class:`GradientCache`, :class:`GradientStream`) and :mod:`.streaming` (the
products estimators compute over a stream with one chunk in memory at a time).
"""

from .budget import DEFAULT_MEMORY_BUDGET, available_memory, chunk_size_for, resolve_memory_budget
from .cache import GradientCache, GradientStream
from .engine import ParameterLayout, PerSampleGradients, gradient_chunks, per_sample_gradients
from .streaming import *  # noqa: F403 - the streamed products, listed in streaming.__all__
from .streaming import __all__ as _streaming

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "GradientCache",
    "GradientStream",
    "ParameterLayout",
    "PerSampleGradients",
    "available_memory",
    "chunk_size_for",
    "gradient_chunks",
    "per_sample_gradients",
    "resolve_memory_budget",
    *_streaming,
]
