"""Products of a streamed gradient matrix ``G`` ``[N, P']`` with resident operands, one chunk at a time.

Every function makes one pass over a :class:`~lightning_fimoda.gradients.GradientStream` (or any
iterable of ``(positions [c], chunk [c, P'])``), so its peak memory is one chunk plus the resident
operands and the result; the result equals the unchunked expression up to float summation order.
Row ``i`` of ``G`` is ``g_i``; per-layer column ranges come from ``stream.layer_slices()``.
Resident operands are moved to the stream's device (once, at the first chunk), and results live there:
a CUDA stream with CPU operands gives CUDA results.

In a ``torch.distributed`` process group each rank passes over its shard of the rows only
(:meth:`GradientStream.local`); sums over rows are added over the ranks and per-row results merged
(:mod:`lightning_fimoda.distributed`), so every rank returns the same result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..distributed import merge_rows, sum_floats, sum_over_ranks
from ..exceptions import ConfigurationError

__all__ = [
    "streamed_cosines",
    "streamed_fisher_products",
    "streamed_gram",
    "streamed_layer_accumulate",
    "streamed_layer_mean_square",
    "streamed_mean_square",
    "streamed_products",
    "streamed_sq_norms",
    "streamed_transposed_products",
]

Chunks = Iterable[tuple[Tensor, Tensor]]


def _rows(stream: Chunks) -> int:
    n = getattr(stream, "n", None)
    if n is None:
        raise ConfigurationError("A streamed product needs a GradientStream (it knows its number of rows n).")
    return int(n)


def _local(stream: Chunks) -> Iterable[tuple[Tensor, Tensor]]:
    """This rank's chunks: a stream's shard in a process group (every chunk otherwise)."""
    local = getattr(stream, "local", None)
    return local() if local is not None else stream


def _sharded(stream: Chunks) -> bool:
    return bool(getattr(stream, "sharded", False))


def _device(stream: Chunks, operand: Tensor) -> torch.device:
    return getattr(stream, "device", operand.device)


def _resident(operand: Tensor, chunk: Tensor) -> Tensor:
    """``operand`` on the device of the stream's chunks (no copy when it is there already)."""
    return operand if operand.device == chunk.device else operand.to(chunk.device)


def _summed(stream: Chunks, partial: Tensor) -> Tensor:
    """A sum over the stream's rows: the ranks' partial sums added when the stream is sharded."""
    return sum_over_ranks(partial) if _sharded(stream) else partial


def _merged(stream: Chunks, rows: Tensor) -> Tensor:
    """Per-row results: every rank's rows merged when the stream is sharded."""
    return merge_rows(rows) if _sharded(stream) else rows


def streamed_products(stream: Chunks, right: Tensor) -> Tensor:
    """``G @ right``: ``[N, k]`` for ``right`` ``[P', k]`` (e.g. test gradients or solved vectors, transposed)."""
    right = right.to(_device(stream, right))
    out = right.new_zeros(_rows(stream), right.shape[1])
    for pos, chunk in _local(stream):
        right = _resident(right, chunk)
        out = _resident(out, chunk)
        out[pos.to(out.device)] = chunk @ right
    return _merged(stream, out)


def streamed_cosines(stream: Chunks, unit_right: Tensor) -> Tensor:
    """``(g_i · u) / ‖g_i‖`` (0 for a zero ``g_i``): ``[N, k]`` for unit columns ``unit_right`` ``[P', k]``."""
    unit_right = unit_right.to(_device(stream, unit_right))
    out = unit_right.new_zeros(_rows(stream), unit_right.shape[1])
    tiny = torch.finfo(out.dtype).tiny
    for pos, chunk in _local(stream):
        unit_right, out = _resident(unit_right, chunk), _resident(out, chunk)
        dots, norms = chunk @ unit_right, chunk.norm(dim=1)[:, None]
        out[pos.to(out.device)] = torch.where(norms > 0, dots / norms.clamp_min(tiny), torch.zeros_like(dots))
    return _merged(stream, out)


def streamed_transposed_products(stream: Chunks, left: Tensor) -> Tensor:
    """``Gᵀ @ left``: ``[P', k]`` for ``left`` ``[N, k]`` (``left = 1/n``: the mean gradient)."""
    left = left.to(_device(stream, left))
    out = left.new_zeros(stream.width, left.shape[1]) if _sharded(stream) else None
    for pos, chunk in _local(stream):
        left = _resident(left, chunk)
        part = chunk.T @ left[pos.to(left.device)]
        out = part if out is None else out.add_(part)
    return _summed(stream, out)


def streamed_fisher_products(stream: Chunks, vectors: Tensor) -> Tensor:
    """``Σ_i (v·g_i) g_i`` for each row ``v`` of ``vectors`` ``[k, P']``: ``[k, P'] = V Gᵀ G`` (not divided by N)."""
    vectors = vectors.to(_device(stream, vectors))
    out = torch.zeros_like(vectors)
    for _, chunk in _local(stream):
        vectors, out = _resident(vectors, chunk), _resident(out, chunk)
        out.addmm_(vectors @ chunk.T, chunk)
    return _summed(stream, out)


def streamed_sq_norms(stream: Chunks) -> Tensor:
    """``‖g_i‖²`` for every row: ``[N]``."""
    out = None
    for pos, chunk in _local(stream):
        if out is None:
            out = chunk.new_zeros(_rows(stream))
        out[pos.to(out.device)] = chunk.pow(2).sum(dim=1)
    if out is None and _sharded(stream):
        out = torch.zeros(_rows(stream), dtype=stream.dtype, device=stream.device)
    return _merged(stream, out)


def streamed_mean_square(stream: Chunks) -> float:
    """``mean_{i,p} g_{ip}²``, the mean squared entry (``λ_G`` of SPEC §3)."""
    total, count = 0.0, 0
    for _, chunk in _local(stream):
        total += chunk.pow(2).sum().item()
        count += chunk.numel()
    if _sharded(stream):
        total, count = sum_floats([total, count], stream.device)
    return total / count


def streamed_layer_mean_square(stream: Chunks, slices: Mapping[str, slice] | None = None) -> dict[str, float]:
    """``mean_i mean(g_{il}²)`` per layer ``l`` (``slices``: default ``stream.layer_slices()``)."""
    slices = slices if slices is not None else stream.layer_slices()  # type: ignore[attr-defined]
    sums = dict.fromkeys(slices, 0.0)
    rows = 0
    for _, chunk in _local(stream):
        rows += chunk.shape[0]
        for name, sl in slices.items():
            sums[name] += chunk[:, sl].pow(2).sum().item()
    if _sharded(stream):
        *totals, rows = sum_floats([*sums.values(), rows], stream.device)
        sums = dict(zip(sums, totals))
    return {name: sums[name] / (rows * (sl.stop - sl.start)) for name, sl in slices.items()}


def _damped_weights(block: Tensor, damping: float) -> Tensor:
    """``w_i = 1 / (λ + ‖g_i‖²)`` for the rows of one layer's chunk ``[c, P_l]``: ``[c]``."""
    return 1.0 / (damping + block.pow(2).sum(dim=1))


def _layer_items(stream: Chunks, damping: Mapping[str, float]) -> dict[str, slice]:
    slices = stream.layer_slices()  # type: ignore[attr-defined]
    missing = set(slices) - set(damping)
    if missing:
        raise ConfigurationError(f"No damping given for layer(s) {sorted(missing)}.")
    return slices


def streamed_layer_accumulate(stream: Chunks, left: Tensor, damping: Mapping[str, float]) -> Tensor:
    """Per layer ``l``: ``Σ_i w_il (a_l·g_il) g_il`` for each row ``a`` of ``left`` ``[a, P]``: ``[a, P]``.

    ``w_il = 1 / (λ_l + ‖g_il‖²)`` with ``λ_l = damping[l]`` (DataInf, SPEC §3). With ``left`` the
    test gradients this gives DataInf's test-side correction; with the scored training gradients, its
    training-side one.
    """
    slices = _layer_items(stream, damping)
    left = left.to(_device(stream, left))
    out = torch.zeros_like(left)
    for _, chunk in _local(stream):
        left, out = _resident(left, chunk), _resident(out, chunk)
        for name, sl in slices.items():
            g = chunk[:, sl]
            coef = (left[:, sl] @ g.T) * _damped_weights(g, damping[name])  # [a, c]
            out[:, sl].addmm_(coef, g)
    return _summed(stream, out)


def streamed_gram(
    stream: Chunks, left: Tensor, right: Tensor, damping: Mapping[str, float]
) -> dict[str, Tensor]:
    """Per layer ``l``: ``Σ_i (G_x,l g_ilᵀ) w_il (g_il G_J,lᵀ)``, ``{l: [a, b]}`` for ``left`` ``[a, P]``, ``right`` ``[b, P]``.

    The DataInf double sum ``(G_x G_iᵀ) diag(w) (G_i G_Jᵀ)`` of one layer, ``w_il`` as in
    :func:`streamed_layer_accumulate`.
    """
    slices = _layer_items(stream, damping)
    left, right = left.to(_device(stream, left)), right.to(_device(stream, right))
    out = {name: left.new_zeros(left.shape[0], right.shape[0]) for name in slices}
    for _, chunk in _local(stream):
        left, right = _resident(left, chunk), _resident(right, chunk)
        for name, sl in slices.items():
            g = chunk[:, sl]
            coef = (left[:, sl] @ g.T) * _damped_weights(g, damping[name])  # [a, c]
            out[name] = _resident(out[name], chunk).addmm_(coef, g @ right[:, sl].T)
    return {name: _summed(stream, part) for name, part in out.items()}
