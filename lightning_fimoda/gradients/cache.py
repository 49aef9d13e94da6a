"""The gradient cache: keeps the gradient sets that fit the memory budget, streams the others.

Estimators ask :meth:`GradientCache.stream` for a :class:`GradientStream` and consume it in chunks
(see :mod:`~lightning_fimoda.gradients.streaming`). A set whose ``[N, P']`` matrix fits the resident
half of the budget is computed once and served from memory (``"resident"``); a larger one is
recomputed on every pass over it (``"recomputed"``), one chunk at a time. ``cache.info`` records the
resolved budget and, per gradient set, which of the two it was. In a ``torch.distributed`` process
group each rank computes its contiguous shard of a resident set (the rows are then merged, so every rank
holds the whole set) and streams its shard of a recomputed one (:meth:`GradientStream.local`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._data import model_device_dtype
from ..distributed import merge_rows, rank_and_world, shard_range
from ..exceptions import ConfigurationError
from ..functional import FunctionalTask, Params
from ..projection import Projector
from ..task import AttributionTask
from .budget import (
    DEFAULT_MEMORY_BUDGET,
    VMAP_FACTOR,
    chunk_size_for,
    describe_budget,
    itemsize,
    resolve_memory_budget,
)
from .engine import Kind, ParameterLayout, PerSampleGradients, gradient_chunks, per_sample_gradients

__all__ = ["GradientCache", "GradientStream"]


class GradientStream:
    """Re-iterable per-example gradients: each ``for positions, chunk in stream`` is one pass.

    ``positions`` ``[c]`` index rows ``0 .. n-1`` (in ``indices`` order); ``chunk`` is ``[c, P']``
    with ``P' = projection.dim`` when projected, else the selected parameter count. Iterating gives
    every row; :meth:`local` gives this rank's contiguous shard only (all rows with one process), for
    sums split over the ranks of a process group (:mod:`lightning_fimoda.distributed`).

    Attributes:
        n: number of examples; indices: ``[n]`` their dataset indices.
        layout: parameter columns (unprojected streams only, else ``None``).
        storage: ``"resident"`` (served from memory) or ``"recomputed"`` (computed on every pass).
        passes: passes made so far. device, dtype: of the chunks.
        shard: ``(lo, hi)``, this rank's rows; sharded: whether other ranks hold the other rows.
    """

    def __init__(self, indices: Tensor, layout: ParameterLayout, width: int, source: Any, storage: str,
                 projected: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.indices, self.n, self.width = indices, indices.numel(), width
        self.layout = None if projected else layout
        self._layout = layout
        self._source, self.storage, self.passes = source, storage, 0
        self.device, self.dtype = torch.device(device), dtype
        self.shard = shard_range(self.n)
        self.sharded = rank_and_world()[1] > 1

    @property
    def num_params(self) -> int:
        """Columns ``P'`` of every chunk."""
        return self.width

    def layer_slices(self) -> dict[str, slice]:
        """Column range of each layer; a projected stream has no layers."""
        if self.layout is None:
            raise ConfigurationError("A projected gradient stream has no per-layer columns.")
        return self.layout.layer_slices()

    def collect(self) -> Tensor:
        """All rows as one ``[n, P']`` matrix: the stored one when resident, else assembled in one pass
        (each rank computing its shard)."""
        if isinstance(self._source, Tensor):
            return self._source
        out = torch.zeros(self.n, self.width, dtype=self.dtype, device=self.device)
        for pos, chunk in self.local():
            out[pos.to(out.device)] = chunk
        return merge_rows(out) if self.sharded else out

    def held(self) -> GradientStream:
        """This stream with its rows held in memory (one pass to collect them when recomputed)."""
        if isinstance(self._source, Tensor):
            return self
        return GradientStream(self.indices, self._layout, self.width, self.collect(), "resident",
                              self.layout is None, self.device, self.dtype)

    def local(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over this rank's rows ``shard`` only."""
        return self._rows(*self.shard)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self._rows(0, self.n)

    def _rows(self, lo: int, hi: int) -> Iterator[tuple[Tensor, Tensor]]:
        self.passes += 1
        if hi <= lo:
            return iter(())
        if isinstance(self._source, Tensor):
            return iter([(torch.arange(lo, hi), self._source if hi - lo == self.n else self._source[lo:hi])])
        return self._source(lo, hi)


class GradientCache:
    """Computes each gradient set once if it fits the budget, and hands it to every estimator that asks.

    Args:
        memory_budget: bytes of per-sample gradients the cache may hold at once (resident sets plus one
            chunk being computed); ``None``: 25% of the memory available on the model's device,
            resolved at first use (:attr:`memory_budget`, reported in :attr:`info`).
        progress: show a progress bar per pass.

    Keys are (model, task, dataset, indices, kind, parameter selection, projector); entries live as long
    as the cache (one ``attribute()`` call). Gradients at shifted parameters (``at=``) are never kept.
    """

    def __init__(self, memory_budget: int | None = DEFAULT_MEMORY_BUDGET, progress: bool = False) -> None:
        if memory_budget is not None:
            resolve_memory_budget(memory_budget)  # validate now
        self._requested = memory_budget
        self._budget: int | None = None
        self.progress = progress
        self._store: dict[tuple, Tensor | PerSampleGradients] = {}
        self._refs: list[Any] = []  # keeps keyed objects alive so their ids stay unique
        self.computed = 0  # number of gradient sets actually computed and kept (for tests and reports)
        self.info: dict[str, Any] = {"gradient_sets": {}}

    # -- budget ---------------------------------------------------------------------------------
    def resolve(self, device: torch.device | str = "cpu") -> int:
        """The budget in bytes, resolved once (on the first device asked about) and then fixed."""
        if self._budget is None:
            self._budget = resolve_memory_budget(self._requested, device)
            self.info["memory_budget"] = self._budget
            self.info["memory_budget_source"] = describe_budget(self._requested, device)
        return self._budget

    @property
    def memory_budget(self) -> int:
        """The resolved budget in bytes (resolved on CPU if no model has been seen yet)."""
        return self.resolve()

    def resident_bytes(self) -> int:
        """Bytes of gradient sets held now."""
        return sum(_tensor_of(v).numel() * _tensor_of(v).element_size() for v in self._store.values())

    def chunk_budget(self, device: torch.device | str = "cpu") -> int:
        """Bytes for one streamed chunk and its intermediates: half of the budget."""
        return self.resolve(device) // 2

    def chunk_rows(self, num_params: int, element_size: int, device: torch.device | str = "cpu") -> int:
        """Examples per computed chunk; :class:`ConfigurationError` if not even one fits the chunk half."""
        row = num_params * element_size * VMAP_FACTOR
        if row > self.chunk_budget(device):
            raise ConfigurationError(
                f"The memory budget ({_mib(self.resolve(device))}) is too small for one example's gradient of "
                f"{num_params} parameters ({_mib(row)} with vmap's intermediates, half the budget is for one "
                "chunk): raise memory_budget or select fewer parameters (params=)."
            )
        return chunk_size_for(num_params, element_size, self.chunk_budget(device), device)

    def fits(self, rows: int, cols: int, element_size: int, device: torch.device | str = "cpu") -> bool:
        """Whether a ``[rows, cols]`` matrix fits beside the resident sets in the resident half."""
        return self.resident_bytes() + rows * cols * element_size <= self.resolve(device) - self.chunk_budget(device)

    # -- gradient sets --------------------------------------------------------------------------
    def get(
        self, model: nn.Module, task: AttributionTask, dataset: Any, indices: Tensor, *,
        kind: Kind = "loss", params: Sequence[str] | None = None, what: str = "training",
    ) -> PerSampleGradients:
        """The full ``[N, P]`` set (computed once); :class:`ConfigurationError` when it does not fit.

        Use :meth:`stream` for sets that may not fit: it serves this same set when it does.
        """
        key = self._key(model, task, dataset, indices, kind, params, None)
        if key not in self._store:
            device, dtype = model_device_dtype(model)
            num = FunctionalTask(model, task, params).num_params
            if not self.fits(indices.numel(), num, itemsize(dtype), device):
                size = _mib(indices.numel() * num * itemsize(dtype))
                raise ConfigurationError(
                    f"The {what} gradients [{indices.numel()}, {num}] ({size}) "
                    f"do not fit the memory budget ({_mib(self.resolve(device))}, half for resident sets, "
                    f"{_mib(self.resident_bytes())} held): stream them with GradientCache.stream()."
                )
            self._store[key] = self._computed(model, task, dataset, indices, kind, params, what)
            self._kept(key, model, task, dataset, what, kind, "resident", self._store[key].flat)
        return self._store[key]  # type: ignore[return-value]

    def stream(
        self, model: nn.Module, task: AttributionTask, dataset: Any, indices: Tensor, *,
        kind: Kind = "loss", params: Sequence[str] | None = None, projection: Projector | None = None,
        at: Params | None = None, what: str = "training",
    ) -> GradientStream:
        """Gradients of ``dataset[indices]`` as a :class:`GradientStream` (projected when ``projection``).

        Resident when the (projected) ``[N, P']`` set fits beside the resident sets; otherwise every
        pass recomputes it in chunks of :meth:`chunk_budget` bytes (including vmap's intermediates).
        """
        if projection is not None and not isinstance(projection, Projector):
            raise ConfigurationError(f"projection must be a Projector or None, got {type(projection).__name__}.")
        device, dtype = model_device_dtype(model)
        fn = FunctionalTask(model, task, params)
        layout = ParameterLayout(tuple(fn.names), tuple(fn.shapes[n] for n in fn.names))
        width = projection.dim if projection is not None else fn.num_params
        nbytes = itemsize(dtype)
        key = self._key(model, task, dataset, indices, kind, params, projection) if at is None else None
        fits = key is not None and (key in self._store or self.fits(indices.numel(), width, nbytes, device))
        if fits and projection is None:
            flat = self.get(model, task, dataset, indices, kind=kind, params=params, what=what).flat
            return GradientStream(indices, layout, width, flat, "resident", False, device, dtype)

        rows = self.chunk_rows(fn.num_params, nbytes, device)

        def recompute(lo: int, hi: int) -> Iterator[tuple[Tensor, Tensor]]:
            chunks = gradient_chunks(
                model, task, dataset, indices[lo:hi], kind=kind, params=params, at=at, progress=self.progress,
                chunk_size=rows, what=what,
            )
            for pos, chunk in chunks:
                yield pos + lo, (chunk if projection is None else projection.project(chunk))

        projected = projection is not None
        if fits:  # a projected set that fits: computed once (each rank its shard), kept
            if key not in self._store:
                out = GradientStream(indices, layout, width, recompute, "resident", True, device, dtype).collect()
                self._store[key] = out
                self._kept(key, model, task, dataset, what, kind, "resident", out)
            return GradientStream(indices, layout, width, self._store[key], "resident", True, device, dtype)
        self._record(what, kind, "recomputed", indices.numel(), width, projection)
        self.info["gradient_sets"][_set_name(what, kind, projection)]["chunk_rows"] = rows
        return GradientStream(indices, layout, width, recompute, "recomputed", projected, device, dtype)

    def _computed(self, model: nn.Module, task: AttributionTask, dataset: Any, indices: Tensor, kind: Kind,
                  params: Sequence[str] | None, what: str) -> PerSampleGradients:
        """The full ``[N, P]`` set; in a process group each rank computes its shard and the rows are merged."""
        device, dtype = model_device_dtype(model)
        fn = FunctionalTask(model, task, params)
        options = dict(kind=kind, params=params, progress=self.progress, what=what,
                       chunk_size=self.chunk_rows(fn.num_params, itemsize(dtype), device))
        if rank_and_world()[1] == 1:
            return per_sample_gradients(model, task, dataset, indices, **options)
        flat = torch.zeros(indices.numel(), fn.num_params, dtype=dtype, device=device)
        lo, hi = shard_range(indices.numel())
        if hi > lo:
            for pos, rows in gradient_chunks(model, task, dataset, indices[lo:hi], **options):
                start = lo + int(pos[0])
                flat[start : start + rows.shape[0]] = rows
        return PerSampleGradients(flat=merge_rows(flat), names=tuple(fn.names),
                                  shapes=tuple(fn.shapes[n] for n in fn.names), indices=indices)

    def clear(self) -> None:
        self._store.clear()
        self._refs.clear()

    # -- bookkeeping ----------------------------------------------------------------------------
    def _key(self, model, task, dataset, indices, kind, params, projection) -> tuple:
        digest = hashlib.sha1(indices.cpu().numpy().tobytes()).hexdigest()
        proj = None if projection is None else (projection.dim, projection.kind, projection.seed,
                                                projection.rows_per_block())
        return (id(model), id(task), id(dataset), digest, kind, tuple(params) if params else None, proj)

    def _kept(self, key, model, task, dataset, what, kind, storage, tensor: Tensor) -> None:
        self._refs.extend([model, task, dataset])
        self.computed += 1
        self._record(what, kind, storage, tensor.shape[0], tensor.shape[1], key[-1])

    def _record(self, what, kind, storage, n, width, projection) -> None:
        self.info["gradient_sets"][_set_name(what, kind, projection)] = {"storage": storage, "n": int(n), "num_params": int(width)}


def _set_name(what: str, kind: str, projection: Any) -> str:
    return f"{what} {kind}" + ("" if projection is None else " (projected)")


def _tensor_of(value: Tensor | PerSampleGradients) -> Tensor:
    return value.flat if isinstance(value, PerSampleGradients) else value


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
