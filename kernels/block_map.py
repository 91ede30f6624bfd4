"""Tile maps: which ``[block_m, block_n]`` tiles of the score matrix a mask leaves empty, partial or full.

The mask terms say what is visible (``AttentionSpec.keep_tile``); a flash kernel
needs the block structure of that meaning (as FlexAttention's ``BlockMask``):

* **empty** tiles (every score masked) are never visited,
* **partial** tiles are visited with the mask arithmetic (and mask loads),
* **full** tiles (nothing masked) are visited with no mask arithmetic at all.

The map is computed once per call with a few torch reductions over the terms
(no host synchronisation), then compacted into per-row tile lists, the form
the kernels loop over::

    state [Bm, Hm, n_rows, n_cols]  int8: EMPTY 0, PARTIAL 1, FULL 2
    count [Bm, Hm, n_rows]          int32: how many tiles of each kind in the row
    index [Bm, Hm, n_rows, n_cols]  int32: their column indices, ascending, first ``count``
    run   [Bm, Hm, n_rows]          int32: how many of the full tiles, from the first, are consecutive

``run`` lets a kernel walk the full tiles of a band-like row (a window, a causal row, a document's block) as a
range of columns whose loads the compiler can pipeline, and only the full tiles after that run (none for
such rows) and the partial ones through the lists.

``Bm``/``Hm`` are 1 when no term depends on the batch/head (broadcast by stride 0).
The forward walks rows = query tiles; the dK/dV backward walks the transposed
map (rows = key tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import triton_tile_lists
from .spec import AttentionSpec, key_padding_keep
from .term_cache import TermCache

EMPTY, PARTIAL, FULL = 0, 1, 2
#: tile lists of the last few mask tensors seen (a model's layers share one mask)
CACHE_SIZE = 16
#: a dense mask's per-tile any / all is reduced once at this grain (rows x columns) and pooled to each kernel's
#: tiles, when they are multiples of it: a training step's three maps of a new mask (the forward's 128 x 128,
#: the backward kernels' 64 x 128 and 128 x 64) cost one scan of the mask, not three. CUDA kernels' tiles are
#: 64 or more; the interpreter's, 16 or more.
GRAIN = {"cuda": 64}
DEFAULT_GRAIN = 16


@dataclass(frozen=True)
class TileLists:
    """Per-row lists of partial and full tiles (see the module docstring)."""

    partial_count: torch.Tensor  # [Bm, Hm, n_rows] int32
    partial_index: torch.Tensor  # [Bm, Hm, n_rows, n_cols] int32
    full_count: torch.Tensor
    full_index: torch.Tensor
    full_run: torch.Tensor  # [Bm, Hm, n_rows] int32

    @staticmethod
    def from_state(state: torch.Tensor) -> TileLists:
        def compact(kind):
            hit = state == kind
            # a stable sort of "not hit" puts the hit columns first, in ascending order
            index = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            return hit.sum(-1, dtype=torch.int32).contiguous(), index.contiguous()

        full_count, full_index = compact(FULL)
        # the full tiles k = 0, 1, .. of a row are consecutive while index[k] == index[0] + k; the listed
        # indices ascend, so index[k] - k never decreases: once past index[0] it stays past
        k = torch.arange(full_index.shape[-1], device=state.device, dtype=torch.int32)
        run = ((full_index - k == full_index[..., :1]) & (k < full_count[..., None])).sum(-1, dtype=torch.int32)
        return TileLists(*compact(PARTIAL), full_count, full_index, run.contiguous())

    def strides(self) -> tuple[int, int, int, int, int, int]:
        """(count b, h, row; index b, h, row) strides, 0 on broadcast dims."""
        cnt, idx = self.partial_count, self.partial_index
        cs = [0 if cnt.shape[d] == 1 else cnt.stride(d) for d in range(3)]
        is_ = [0 if idx.shape[d] == 1 else idx.stride(d) for d in range(3)]
        return (*cs, *is_)


def tile_lists(spec: AttentionSpec, block_m: int, block_n: int, transposed: bool = False) -> TileLists:
    """Tile lists of the spec (rows = query tiles; key tiles when ``transposed``), cached per mask tensor.

    Building them takes some 50 small torch launches, more host time than the
    kernel itself at moderate sizes. A cache hit needs the very same tensor
    objects at the same version counter (``term_cache``), so an in-place change
    of a mask, or a new mask at a recycled address, rebuilds.
    """
    terms = (spec.key_padding, spec.q_doc, spec.kv_doc, spec.mask)
    tensors = [t for t in terms if t is not None]
    # which terms are present keys the entry too: one tensor handed over as key padding for one call and as a mask
    # for another (a [B, Nk] row with Nq = B) makes other lists in each role
    static = (spec.batch, spec.q_heads, spec.q_len, spec.kv_len, spec.band(), spec.diagonal_offset, str(spec.device),
              block_m, block_n, transposed, *(t is None for t in terms))
    return _CACHE.get(tensors, static, lambda: _build(spec, block_m, block_n, transposed))


#: device types whose tile lists one Triton kernel builds (``triton_tile_lists``): one launch where the PyTorch
#: build takes some fifty (``benchmarks/results/tile_lists_build.md``), and whose dense masks' tiles another
#: reduces in one read (``triton_tile_lists.mask_any_all``). The tests add ``"cpu"`` under the interpreter to
#: check them against ``TileLists.from_state`` and ``_mask_tiles_torch``
KERNEL_DEVICES = {"cuda"}


def _build(spec: AttentionSpec, block_m: int, block_n: int, transposed: bool) -> TileLists:
    if spec.device.type in KERNEL_DEVICES and triton_tile_lists.supported(spec):
        extra = None if spec.mask is None else _state(*_mask_any_all(spec.mask, block_m, block_n))
        return TileLists(*triton_tile_lists.build(spec, block_m, block_n, transposed, extra))
    state = tile_state(spec, block_m, block_n)
    return TileLists.from_state(state.transpose(-1, -2) if transposed else state)


#: the tile lists are small: a band's alone are kept too
_CACHE = TermCache(CACHE_SIZE, without_terms=True)
#: a dense mask's any / all at ``GRAIN`` tiles, by mask tensor and version
_GRAINS = TermCache(CACHE_SIZE, without_terms=False)


def needs_tile_map(spec: AttentionSpec) -> bool:
    """Terms whose structure is data (not a band): bool key padding, documents, dense masks."""
    bool_padding = spec.key_padding is not None and spec.key_padding.dtype == torch.bool
    return bool_padding or spec.q_doc is not None or spec.mask is not None


def tile_state(spec: AttentionSpec, block_m: int, block_n: int) -> torch.Tensor:
    """``[Bm, Hm, ceil(Nq/block_m), ceil(Nk/block_n)]`` int8 tile states of all boolean terms.

    Additive masks count too: a tile that is ``-inf`` everywhere is empty, one
    that is 0 everywhere is full (it needs no load).
    """
    n_q, n_k, device = spec.q_len, spec.kv_len, spec.device
    n_qt, n_kt = -(-n_q // block_m), -(-n_k // block_n)
    state = _band_state(spec, block_m, block_n, n_qt, n_kt)  # [1, 1, n_qt, n_kt]
    if spec.key_padding is not None:
        keep = key_padding_keep(spec.key_padding, n_k).to(device)  # [B, Nk]
        any_, all_ = _tile_any_all(keep[:, None, None, :], block_m, block_n)
        state = torch.minimum(state, _state(any_, all_))
    if spec.q_doc is not None:
        state = torch.minimum(state, _document_state(spec, block_m, block_n))
    if spec.mask is not None:
        state = torch.minimum(state, _state(*_mask_any_all(spec.mask, block_m, block_n)))
    b_m = 1 if state.shape[0] == 1 else spec.batch
    h_m = 1 if state.shape[1] == 1 else spec.q_heads
    return state.expand(b_m, h_m, n_qt, n_kt).contiguous()


def _mask_any_all(mask: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile (any score kept, every score kept) of a dense mask, pooled from its ``GRAIN`` tiles (reduced
    once per mask tensor and version) where the tiles are multiples of the grain."""
    grain = GRAIN.get(mask.device.type, DEFAULT_GRAIN)
    if block_m % grain or block_n % grain:
        return _mask_tiles(mask, block_m, block_n)
    fine = _GRAINS.get([mask], (grain, str(mask.device)), lambda: _mask_tiles(mask, grain, grain))
    return _pool(fine[0], block_m // grain, block_n // grain, 0), _pool(fine[1], block_m // grain,
                                                                         block_n // grain, 1)


def _mask_tiles(mask: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile (any score kept, every score kept and free) of a dense mask: one Triton launch on the devices of
    ``KERNEL_DEVICES`` (tiles of powers of 2, at most ``MAX_MAPS`` batch x head maps), else PyTorch's
    reductions."""
    while mask.dim() < 4:
        mask = mask[None]
    if (mask.device.type in KERNEL_DEVICES and _power_of_2(block_m) and _power_of_2(block_n)
            and mask.shape[0] * mask.shape[1] <= triton_tile_lists.MAX_MAPS):
        return triton_tile_lists.mask_any_all(mask, block_m, block_n)
    return _mask_tiles_torch(mask, block_m, block_n)


def _power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _mask_tiles_torch(mask: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_mask_tiles`` of a 4-D mask by PyTorch's reductions (any device)."""
    if mask.dtype == torch.bool:
        return _tile_any_all(mask, block_m, block_n)
    return _pool(mask != float("-inf"), block_m, block_n, 0), _pool(mask == 0, block_m, block_n, 1)


def _pool(tiles: torch.Tensor, rows: int, cols: int, pad_value: int) -> torch.Tensor:
    """Groups of ``rows x cols`` entries of a bool ``[b, h, n_rows or 1, n_cols or 1]`` tensor (a mask, or a map
    of tiles) reduced to one: any with ``pad_value`` 0, all with 1 (the padding past the end changes neither);
    broadcast dims stay 1. A boolean tensor is read through a ``uint8`` view, not copied."""
    x = tiles.view(torch.uint8)
    b, h, n_r, n_c = x.shape
    tr, tc = (1 if n_r == 1 else rows), (1 if n_c == 1 else cols)
    pad_r, pad_c = -n_r % tr, -n_c % tc
    if pad_r or pad_c:
        x = F.pad(x, (0, pad_c, 0, pad_r), value=pad_value)
    x = x.reshape(b, h, x.shape[2] // tr, tr, x.shape[3] // tc, tc)
    op = torch.amax if pad_value == 0 else torch.amin
    return op(op(x, dim=5), dim=3).bool()


def _state(any_: torch.Tensor, all_: torch.Tensor) -> torch.Tensor:
    return torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)


def _band_state(spec: AttentionSpec, block_m: int, block_n: int, n_qt: int, n_kt: int) -> torch.Tensor:
    """States from the causal/window band and the key bound, by interval arithmetic per tile."""
    device = spec.device
    q_first = torch.arange(n_qt, device=device) * block_m
    q_last = torch.clamp(q_first + block_m, max=spec.q_len) - 1
    k_first = torch.arange(n_kt, device=device) * block_n
    k_end = k_first + block_n  # exclusive, may pass Nk
    k_last = torch.clamp(k_end, max=spec.kv_len) - 1
    inside = (k_end <= spec.kv_len)[None, :]  # [1, n_kt]
    lo, hi = spec.band()
    off = spec.diagonal_offset
    # j - i - off over the tile spans [rel_min, rel_max] and takes every integer between
    rel_min = k_first[None, :] - (q_last[:, None] + off)  # [n_qt, n_kt]
    rel_max = k_last[None, :] - (q_first[:, None] + off)
    empty = torch.zeros_like(rel_min, dtype=torch.bool)
    full = inside.expand_as(empty)
    if lo is not None:
        empty = empty | (rel_max < lo)
        full = full & (rel_min >= lo)
    if hi is not None:
        empty = empty | (rel_min > hi)
        full = full & (rel_max <= hi)
    return _state(~empty, full)[None, None]


def _document_state(spec: AttentionSpec, block_m: int, block_n: int) -> torch.Tensor:
    """Documents: a tile is empty when the id ranges of its rows and columns are disjoint,
    full when both hold one and the same id."""
    q_min, q_max = _tile_min_max(spec.q_doc, block_m)  # [Bd, n_qt]
    k_min, k_max = _tile_min_max(spec.kv_doc, block_n)  # [Bd, n_kt]
    empty = (q_max[:, :, None] < k_min[:, None, :]) | (k_max[:, None, :] < q_min[:, :, None])
    full = (q_min == q_max)[:, :, None] & (k_min == k_max)[:, None, :] & (q_min[:, :, None] == k_min[:, None, :])
    return _state(~empty, full)[:, None]


def _tile_min_max(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = ids.shape[1]
    pad = -n % block
    # repeating the last id leaves every tile's range unchanged
    padded = F.pad(ids[:, None].to(torch.int64), (0, pad), mode="replicate")[:, 0] if pad else ids.to(torch.int64)
    tiles = padded.reshape(ids.shape[0], -1, block)
    return tiles.amin(-1), tiles.amax(-1)


def _tile_any_all(x: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile any / all of a bool ``[b, h, Nq or 1, Nk or 1]`` tensor; broadcast dims stay 1."""
    return _pool(x, block_m, block_n, 0), _pool(x, block_m, block_n, 1)
