"""Memory layouts of attention tensors: outputs made in the order of the queries' strides.

A Hugging Face layer hands its queries to attention as a ``[B, H, N, D]`` view of a ``[B, N, H, D]`` tensor and
turns the output back with ``transpose(1, 2).reshape(B, N, H * D)``. An output laid out like the queries makes
that reshape a view; a contiguous ``[B, H, N, D]`` output makes it a copy, which a training step keeps for the
output projection's backward beside the output attention saved: one ``[N, H * D]`` tensor more per layer.
"""

from __future__ import annotations

import torch


def _order(ref: torch.Tensor) -> list[int]:
    """``ref``'s dims from the outermost in memory to the innermost, the last (the head dim) always innermost,
    as the kernels read and write it (ties, as of broadcast dims, keep the dims' order)."""
    return [*sorted(range(ref.dim() - 1), key=lambda dim: ref.stride(dim), reverse=True), ref.dim() - 1]


def empty_in_layout_of(shape, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized tensor of ``shape`` whose dims lie in memory in the order of ``ref``'s strides."""
    order = _order(ref)
    laid = torch.empty([shape[dim] for dim in order], dtype=dtype or ref.dtype, device=ref.device)
    return laid.permute([order.index(dim) for dim in range(len(shape))])


def in_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with its dims laid out in memory in the order of ``ref``'s strides (a copy only when its strides
    differ: cuDNN reads even a size-1 dim's stride)."""
    order = _order(ref)
    strides, step = [0] * t.dim(), 1
    for dim in reversed(order):
        strides[dim], step = step, step * t.shape[dim]
    if list(t.stride()) == strides:
        return t
    return empty_in_layout_of(t.shape, ref, t.dtype).copy_(t)
