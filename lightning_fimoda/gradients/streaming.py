"""Products of a streamed gradient matrix ``G`` ``[N, P']`` with resident operands, one chunk at a time.

Every function makes one pass over a :class:`~lightning_fimoda.gradients.GradientStream` (or any
iterable of ``(positions [c], chunk [c, P'])``), so its peak memory is one chunk plus the resident
operands and the result; the result equals the unchunked expression up to float summation order.
Row ``i`` of ``G`` is ``g_i``; per-layer column ranges come from ``stream.layer_slices()``.
Resident operands are moved to the stream's device (once, at the first chunk), and results live there:
a CUDA stream with CPU operands gives CUDA results.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..exceptions import ConfigurationError

__all__ = [
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


def _resident(operand: Tensor, chunk: Tensor) -> Tensor:
    """``operand`` on the device of the stream's chunks (no copy when it is there already)."""
    return operand if operand.device == chunk.device else operand.to(chunk.device)


def streamed_products(stream: Chunks, right: Tensor) -> Tensor:
    """``G @ right``: ``[N, k]`` for ``right`` ``[P', k]`` (e.g. test gradients or solved vectors, transposed)."""
    n, out = _rows(stream), None
    for pos, chunk in stream:
        right = _resident(right, chunk)
        if out is None:
            out = torch.empty(n, right.shape[1], dtype=right.dtype, device=chunk.device)
        out[pos.to(out.device)] = chunk @ right
    return out


def streamed_transposed_products(stream: Chunks, left: Tensor) -> Tensor:
    """``Gᵀ @ left``: ``[P', k]`` for ``left`` ``[N, k]`` (``left = 1/n``: the mean gradient)."""
    out = None
    for pos, chunk in stream:
        left = _resident(left, chunk)
        part = chunk.T @ left[pos.to(left.device)]
        out = part if out is None else out.add_(part)
    return out


def streamed_fisher_products(stream: Chunks, vectors: Tensor) -> Tensor:
    """``Σ_i (v·g_i) g_i`` for each row ``v`` of ``vectors`` ``[k, P']``: ``[k, P'] = V Gᵀ G`` (not divided by N)."""
    out = None
    for _, chunk in stream:
        vectors = _resident(vectors, chunk)
        out = torch.zeros_like(vectors) if out is None else out
        out.addmm_(vectors @ chunk.T, chunk)
    return out


def streamed_sq_norms(stream: Chunks) -> Tensor:
    """``‖g_i‖²`` for every row: ``[N]``."""
    out = None
    for pos, chunk in stream:
        if out is None:
            out = torch.empty(_rows(stream), dtype=chunk.dtype, device=chunk.device)
        out[pos.to(out.device)] = chunk.pow(2).sum(dim=1)
    return out


def streamed_mean_square(stream: Chunks) -> float:
    """``mean_{i,p} g_{ip}²``, the mean squared entry (``λ_G`` of SPEC §3)."""
    total, count = 0.0, 0
    for _, chunk in stream:
        total += chunk.pow(2).sum().item()
        count += chunk.numel()
    return total / count


def streamed_layer_mean_square(stream: Chunks, slices: Mapping[str, slice] | None = None) -> dict[str, float]:
    """``mean_i mean(g_{il}²)`` per layer ``l`` (``slices``: default ``stream.layer_slices()``)."""
    slices = slices if slices is not None else stream.layer_slices()  # type: ignore[attr-defined]
    sums = dict.fromkeys(slices, 0.0)
    rows = 0
    for _, chunk in stream:
        rows += chunk.shape[0]
        for name, sl in slices.items():
            sums[name] += chunk[:, sl].pow(2).sum().item()
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
    out = None
    for _, chunk in stream:
        left = _resident(left, chunk)
        out = torch.zeros_like(left) if out is None else out
        for name, sl in slices.items():
            g = chunk[:, sl]
            coef = (left[:, sl] @ g.T) * _damped_weights(g, damping[name])  # [a, c]
            out[:, sl].addmm_(coef, g)
    return out


def streamed_gram(
    stream: Chunks, left: Tensor, right: Tensor, damping: Mapping[str, float]
) -> dict[str, Tensor]:
    """Per layer ``l``: ``Σ_i (G_x,l g_ilᵀ) w_il (g_il G_J,lᵀ)``, ``{l: [a, b]}`` for ``left`` ``[a, P]``, ``right`` ``[b, P]``.

    The DataInf double sum ``(G_x G_iᵀ) diag(w) (G_i G_Jᵀ)`` of one layer, ``w_il`` as in
    :func:`streamed_layer_accumulate`.
    """
    slices = _layer_items(stream, damping)
    out = None
    for _, chunk in stream:
        left, right = _resident(left, chunk), _resident(right, chunk)
        out = {name: left.new_zeros(left.shape[0], right.shape[0]) for name in slices} if out is None else out
        for name, sl in slices.items():
            g = chunk[:, sl]
            coef = (left[:, sl] @ g.T) * _damped_weights(g, damping[name])  # [a, c]
            out[name].addmm_(coef, g @ right[:, sl].T)
    return out
