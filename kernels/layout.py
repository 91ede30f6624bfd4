"""Memory layouts of attention tensors: outputs made in the order of the queries' strides, and K/V heads repeated
for (and gradients summed over) their query-head groups where a kernel reads no groups itself.

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
    """An uninitialized tensor of ``shape`` whose dims lie in memory in the order of ``ref``'s strides: a tensor of
    its own (not a view of a buffer laid out otherwise), so that a caller's views of it have it as their base."""
    return torch.empty_strided(tuple(shape), strides_in_layout_of(shape, ref), dtype=dtype or ref.dtype,
                               device=ref.device)


def strides_in_layout_of(shape, ref: torch.Tensor) -> tuple[int, ...]:
    """The strides ``empty_in_layout_of`` gives a tensor of ``shape`` laid out like ``ref``: found once per shape and
    ``ref``'s strides (a training call asks twice per backward, each layer with the same ones)."""
    key = (tuple(shape), ref.stride())
    strides = _LAYOUTS.get(key)
    if strides is None:
        if len(_LAYOUTS) >= _LAYOUTS_KEPT:
            _LAYOUTS.clear()
        strides = _LAYOUTS[key] = _strides_in_order(shape, _order(ref))
    return strides


#: (shape, a reference's strides) -> ``strides_in_layout_of``'s answer; cleared when full (lengths that change every
#: call would otherwise grow it without end)
_LAYOUTS: dict = {}
_LAYOUTS_KEPT = 1024


def _strides_in_order(shape, order) -> tuple[int, ...]:
    """Dense strides of ``shape`` with its dims in memory in ``order`` (outermost first)."""
    strides, step = [0] * len(shape), 1
    for dim in reversed(order):
        strides[dim], step = step, step * shape[dim]
    return tuple(strides)


def in_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with its dims laid out in memory in the order of ``ref``'s strides (a copy only when its strides
    differ: cuDNN reads even a size-1 dim's stride)."""
    if t.stride() == strides_in_layout_of(t.shape, ref):
        return t
    return empty_in_layout_of(t.shape, ref, t.dtype).copy_(t)


def repeat_groups(k: torch.Tensor, v: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[B, Hkv, N, D]`` with each head repeated for its ``group_size`` query heads (query head ``h`` reads
    kv head ``h // group_size``), as a kernel that reads no groups takes them."""
    if group_size == 1:
        return k, v
    return k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)


def sum_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A gradient ``[B, Hq, N, D]`` of ``repeat_groups``' heads summed over each group: ``[B, Hkv, N, D]``."""
    if grad.shape[1] == kv_heads:
        return grad
    return grad.unflatten(1, (kv_heads, grad.shape[1] // kv_heads)).sum(2)
