"""Memory plan of a curvature product: how many tangents and examples go through the model at once.

A product ``Σ_i H_i V`` over ``k`` stacked tangents (rows of ``V``) and a slice of ``m`` examples holds,
besides the model, about

- ``TANGENT_ROWS · P`` numbers per tangent (its row, the unflattened tangent, the pulled-back sum and
  its flattened copy),
- ``example_factor · a`` bytes per example (the primal forward and backward, with the backend's
  workspace, e.g. im2col buffers of a convolution), and
- ``pair_factor · a`` bytes per (tangent, example) pair: the ``vmap``-ed forward tangents and backward
  cotangents of the example's activations,

``a`` being the bytes autograd saves for one example's forward pass (:func:`activation_bytes`,
measured once with saved-tensor hooks); the factors are the curvature type's
(:class:`~lightning_fimoda.curvature.CurvatureType`). :func:`plan_chunks` splits the tangents into groups
and the batch into slices so that one group on one slice fits the budget, the ``[k, P]`` input and output
rows of the whole product counted first. Measured on CPU, Gauss-Newton (peak RSS / ``a``): a float64
two-layer convolution net (tests/test_lissa_memory.py) 7.3 per example and 3.8 per pair (exact Hessian:
5.1 per pair); ResNet-9 16-32-64-128 in float32 0.74 per pair and example in all (``a`` = 1.26 MiB);
MiniLM's last layer and head (64 tokens) 0.81 (``a`` = 0.69 MiB). The factors take the largest, so the
plan is conservative for float32 networks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ..functional import FunctionalTask, eval_mode

__all__ = ["TANGENT_ROWS", "activation_bytes", "plan_chunks", "slice_batch"]

TANGENT_ROWS = 4  # P-sized buffers per tangent in flight (as VMAP_FACTOR for per-sample gradient rows)
MIN_EXAMPLES = 8  # examples per slice below which fewer tangents per group are taken instead


def activation_bytes(fn: FunctionalTask, batch: Any, batch_len: int) -> int:
    """Bytes autograd saves for one more example in a forward pass of ``fn.outputs`` over the first
    examples of a loaded ``batch`` (so padded inputs, e.g. token sequences, have the batch's length): the
    difference between 2 examples and 1, so the parameters saved once per pass do not count (1 example's
    total when the batch has only one)."""
    saved = []
    for m in (1, 2)[: min(2, batch_len)]:
        total = [0]

        def pack(t: Tensor, total: list[int] = total) -> Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        params = {name: p.detach().requires_grad_(True) for name, p in fn.params.items()}
        with eval_mode(fn.model), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn.outputs(params, slice_batch(batch, 0, m))
        saved.append(total[0])
    return max(1, saved[-1] - saved[0] if len(saved) == 2 else saved[0])


def plan_chunks(
    k: int, batch_len: int, row_bytes: int, example_bytes: int, pair_bytes: int, budget: int
) -> tuple[int, int]:
    """``(tangents per group, examples per slice)`` for ``k`` tangents over a batch of ``batch_len``.

    ``row_bytes``: one ``[P]`` row; ``example_bytes`` / ``pair_bytes``: one example's / one (tangent,
    example) pair's intermediates. The ``2k`` rows of the product's input and output are counted first;
    ``g`` tangents on ``m`` examples then need ``g · TANGENT_ROWS · row_bytes + m · (example_bytes +
    g · pair_bytes)``. All ``k`` tangents go together when ``MIN_EXAMPLES`` examples fit beside them, else
    as many as do; then as many examples as fit. At least 1 and 1.
    """
    room = max(0, budget - 2 * k * row_bytes)
    few = min(batch_len, MIN_EXAMPLES)
    group = max(1, min(k, (room - few * example_bytes) // (TANGENT_ROWS * row_bytes + few * pair_bytes)))
    examples = (room - group * TANGENT_ROWS * row_bytes) // (example_bytes + group * pair_bytes)
    return int(group), int(max(1, min(batch_len, examples)))


def slice_batch(batch: Any, lo: int, hi: int) -> Any:
    """Examples ``lo:hi`` of a collated batch (every tensor leaf sliced along its first dimension)."""
    return tree_map(lambda t: t[lo:hi] if isinstance(t, Tensor) and t.dim() > 0 else t, batch)
