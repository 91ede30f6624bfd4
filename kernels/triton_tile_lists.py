"""A call's tile lists (``block_map.TileLists``) built by one Triton kernel.

``block_map.tile_state`` and ``TileLists.from_state`` build the lists with some fifty small torch launches: the
band's interval arithmetic, a pooling of the key padding and of the document ids per tile, then a stable sort per
kind of tile. On a GPU that is about half a millisecond of host time per map, and a training step of a padded or
packed batch builds two (the forward's, and the backward's transposed one): more than the kernels' own time at
moderate sizes (``benchmarks/results/tile_lists_build.md``). The padding and document tensors are new each batch,
so the cache per tensor (``block_map._CACHE``) saves this only across the layers of one step.

Here one program per row of the map (a query tile; a key tile when transposed) classifies every column tile from
the terms directly and writes the row's lists::

    pass 1:  the row's counts of partial and full tiles, and its first full tile
    pass 2:  each partial (full) tile's position = the tiles of its kind before it; the other tiles follow in
             ascending order, as the stable sort of ``TileLists.from_state`` places them; ``run`` counts the full
             tiles at position p in column first + p

The states are ``block_map.tile_state``'s, term by term: the band (causal, window, the key bound) by interval
arithmetic, boolean key padding or lengths by any / all over the tile's keys, documents by the id ranges of the
tile's rows and columns; a dense mask's states (pooled from its cached grain, ``block_map._mask_any_all``) come in as
a tensor. That grain, each ``grain x grain`` tile's any / all of the mask, is the second kernel here
(``mask_any_all``): one read of the mask, where PyTorch's reductions took 9 ms at 16k x 16k and 36 ms at 32k x 32k on
an H200 for what reads 0.3 GiB and 1 GiB. So the lists are the same tensors, bit for bit, where ``from_state`` writes them (the tests
compare every field, the order past ``count`` included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, next_power_of_2
from .spec import AttentionSpec

#: column tiles a program classifies at once: its loads are ``CHUNK x block`` ids or keep flags
MAX_CHUNK_ELEMENTS = 4096
_BIG = tl.constexpr(2**62)


def supported(spec: AttentionSpec) -> bool:
    """Calls with rows and columns to map (a GPU's, or any device's under the interpreter: the tests')."""
    return spec.q_len > 0 and spec.kv_len > 0


@triton.jit
def _chunk_state(cols, row, b, h, keep_ptr, stride_kb, qdoc_ptr, stride_qb, kdoc_ptr, stride_db,
                 extra_ptr, stride_eb, stride_eh, stride_em, stride_en, n_q, n_k, n_cols, lo, hi, off,
                 HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, KEEP: tl.constexpr, DOCS: tl.constexpr,
                 EXTRA: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 states (0 empty, 1 partial, 2 full) of the map's tiles (row, cols), and which cols exist."""
    valid = cols < n_cols
    zero = cols * 0
    if TRANSPOSED:
        qt = cols
        kt = zero + row
    else:
        qt = zero + row
        kt = cols
    q_first = qt * BLOCK_M
    q_last = tl.minimum(q_first + BLOCK_M, n_q) - 1
    k_first = kt * BLOCK_N
    k_end = k_first + BLOCK_N
    k_last = tl.minimum(k_end, n_k) - 1
    # j - i - off over the tile takes every integer in [rel_min, rel_max]
    rel_min = k_first - (q_last + off)
    rel_max = k_last - (q_first + off)
    empty = cols < 0
    full = k_end <= n_k
    if HAS_LO:
        empty = empty | (rel_max < lo)
        full = full & (rel_min >= lo)
    if HAS_HI:
        empty = empty | (rel_min > hi)
        full = full & (rel_max <= hi)
    state = tl.where(full, 2, tl.where(empty, 0, 1))
    if KEEP != 0:
        keys = k_first[:, None] + tl.arange(0, BLOCK_N)[None, :]
        inside = (keys < n_k) & valid[:, None]
        if KEEP == 1:  # a boolean keep mask [B, Nk], read as bytes
            kept = tl.load(keep_ptr + b * stride_kb + keys, mask=inside, other=0) != 0
        else:  # lengths [B]: the first length keys are kept
            kept = keys < tl.load(keep_ptr + b * stride_kb)
        any_ = tl.max(tl.where(inside & kept, 1, 0), 1)
        all_ = tl.min(tl.where(inside & (kept == 0), 0, 1), 1)  # keys past the end leave "all" as it is
        state = tl.minimum(state, tl.where(all_ != 0, 2, tl.where(any_ != 0, 1, 0)))
    if DOCS:
        rows = q_first[:, None] + tl.arange(0, BLOCK_M)[None, :]
        rin = (rows < n_q) & valid[:, None]
        ids = tl.load(qdoc_ptr + b * stride_qb + rows, mask=rin, other=0).to(tl.int64)
        q_min = tl.min(tl.where(rin, ids, _BIG), 1)
        q_max = tl.max(tl.where(rin, ids, -_BIG), 1)
        keys = k_first[:, None] + tl.arange(0, BLOCK_N)[None, :]
        kin = (keys < n_k) & valid[:, None]
        ids = tl.load(kdoc_ptr + b * stride_db + keys, mask=kin, other=0).to(tl.int64)
        k_min = tl.min(tl.where(kin, ids, _BIG), 1)
        k_max = tl.max(tl.where(kin, ids, -_BIG), 1)
        d_empty = (q_max < k_min) | (k_max < q_min)
        d_full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        state = tl.minimum(state, tl.where(d_full, 2, tl.where(d_empty, 0, 1)))
    if EXTRA:
        extra = tl.load(extra_ptr + b * stride_eb + h * stride_eh + qt * stride_em + kt * stride_en,
                        mask=valid, other=0)
        state = tl.minimum(state, extra.to(tl.int32))
    return state, valid


@triton.jit
def _tile_lists_kernel(
    out_ptr, keep_ptr, stride_kb, qdoc_ptr, stride_qb, kdoc_ptr, stride_db,
    extra_ptr, stride_eb, stride_eh, stride_em, stride_en,
    n_q, n_k, n_rows, n_cols, lo, hi, off,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, KEEP: tl.constexpr, DOCS: tl.constexpr, EXTRA: tl.constexpr,
    TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    n_h = tl.num_programs(1)
    g = (b * n_h + h) * n_rows + row  # the row's place among all rows of the map
    n_all = tl.num_programs(2) * n_h * n_rows
    lane = tl.arange(0, CHUNK)
    # the buffer: partial count, full count, full run [n_all] each, then partial index, full index [n_all, n_cols]
    part_index = out_ptr + 3 * n_all + g.to(tl.int64) * n_cols
    full_index = out_ptr + 3 * n_all + (n_all + g).to(tl.int64) * n_cols

    n_part = tl.sum(lane * 0, 0)
    n_full = n_part
    first_full = n_part + n_cols
    part_seen = n_part
    full_seen = n_part
    run = n_part
    for counting in tl.static_range(1, -1, -1):  # the counts first, then the lists that need them
        for c0 in range(0, n_cols, CHUNK):
            cols = c0 + lane
            state, valid = _chunk_state(cols, row, b, h, keep_ptr, stride_kb, qdoc_ptr, stride_qb, kdoc_ptr,
                                        stride_db, extra_ptr, stride_eb, stride_eh, stride_em, stride_en,
                                        n_q, n_k, n_cols, lo, hi, off, HAS_LO, HAS_HI, KEEP, DOCS, EXTRA,
                                        TRANSPOSED, BLOCK_M, BLOCK_N)
            part = ((state == 1) & valid).to(tl.int32)
            full = ((state == 2) & valid).to(tl.int32)
            if counting:
                n_part += tl.sum(part, 0)
                n_full += tl.sum(full, 0)
                first_full = tl.minimum(first_full, tl.min(tl.where(full != 0, cols, n_cols), 0))
            else:
                # partial tiles first, in ascending order, then the others (a stable sort of "not partial")
                miss = ((state != 1) & valid).to(tl.int32)
                pos = tl.where(part != 0, part_seen + tl.cumsum(part, 0) - 1,
                               n_part + (c0 - part_seen) + tl.cumsum(miss, 0) - 1)
                tl.store(part_index + pos, cols, mask=valid)
                part_seen += tl.sum(part, 0)
                miss = ((state != 2) & valid).to(tl.int32)
                pos = tl.where(full != 0, full_seen + tl.cumsum(full, 0) - 1,
                               n_full + (c0 - full_seen) + tl.cumsum(miss, 0) - 1)
                tl.store(full_index + pos, cols, mask=valid)
                run += tl.sum(tl.where((full != 0) & (cols - pos == first_full), 1, 0), 0)
                full_seen += tl.sum(full, 0)
    tl.store(out_ptr + g, n_part)
    tl.store(out_ptr + n_all + g, n_full)
    tl.store(out_ptr + 2 * n_all + g, run)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B, N] with its last dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def build(spec: AttentionSpec, block_m: int, block_n: int, transposed: bool,
          extra: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``(partial_count, partial_index, full_count, full_index, full_run)`` of the spec's band, key padding and
    documents at ``block_m x block_n`` tiles (rows = key tiles when ``transposed``), combined with ``extra``: int8
    states ``[Bx, Hx, n_qt or 1, n_kt or 1]`` of more terms (a dense mask's), untransposed. Shapes as
    ``TileLists``: ``[Bm, Hm, n_rows]`` and ``[Bm, Hm, n_rows, n_cols]``, every one contiguous."""
    n_q, n_k, device = spec.q_len, spec.kv_len, spec.device
    n_qt, n_kt = -(-n_q // block_m), -(-n_k // block_n)
    n_rows, n_cols = (n_kt, n_qt) if transposed else (n_qt, n_kt)
    batched = []
    keep, keep_mode, stride_kb = spec.key_padding, 0, 0
    if keep is not None:
        # a boolean mask [B, Nk] read as bytes along contiguous keys (mode 1), or lengths [B] (mode 2)
        keep, keep_mode = (_rows(keep).view(torch.uint8), 1) if keep.dtype == torch.bool else (keep, 2)
        stride_kb = keep.stride(0) if keep.shape[0] > 1 else 0
        batched.append(keep.shape[0])
    q_doc, kv_doc = spec.q_doc, spec.kv_doc
    if q_doc is not None:
        q_doc, kv_doc = _rows(q_doc), _rows(kv_doc)
        batched += [q_doc.shape[0], kv_doc.shape[0]]
    e_strides = (0, 0, 0, 0)
    if extra is not None:
        batched.append(extra.shape[0])
        e_strides = tuple(0 if extra.shape[d] == 1 else extra.stride(d) for d in range(4))
    b_m = spec.batch if any(n > 1 for n in batched) else 1
    h_m = spec.q_heads if extra is not None and extra.shape[1] > 1 else 1
    n_all = b_m * h_m * n_rows
    out = torch.empty(n_all * (3 + 2 * n_cols), dtype=torch.int32, device=device)
    lo, hi = spec.band()
    block = max(block_m, block_n)
    chunk = max(16, min(next_power_of_2(n_cols), next_power_of_2(max(1, MAX_CHUNK_ELEMENTS // block))))
    dummy = out
    launch(_tile_lists_kernel, (n_rows, h_m, b_m),
           out, dummy if keep is None else keep, stride_kb,
           dummy if q_doc is None else q_doc, 0 if q_doc is None or q_doc.shape[0] == 1 else q_doc.stride(0),
           dummy if kv_doc is None else kv_doc, 0 if kv_doc is None or kv_doc.shape[0] == 1 else kv_doc.stride(0),
           dummy if extra is None else extra, *e_strides,
           n_q, n_k, n_rows, n_cols, 0 if lo is None else lo, 0 if hi is None else hi, spec.diagonal_offset,
           HAS_LO=lo is not None, HAS_HI=hi is not None, KEEP=keep_mode, DOCS=q_doc is not None,
           EXTRA=extra is not None, TRANSPOSED=transposed, BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=chunk,
           num_warps=4)
    counts = out[: 3 * n_all].view(3, b_m, h_m, n_rows)
    index = out[3 * n_all:].view(2, b_m, h_m, n_rows, n_cols)
    return counts[0], index[0], counts[1], index[1], counts[2]


#: mask elements one program of ``mask_any_all`` reads: its tile rows times a few tiles' columns
GRAIN_ELEMENTS = 16384
#: batch x head maps ``mask_any_all`` takes: its grid's third dim (CUDA allows 65535); more go to PyTorch
MAX_MAPS = 65535


@triton.jit
def _mask_any_all_kernel(mask_ptr, any_ptr, all_ptr, s_b, s_h, s_r, s_c, n_h, n_r, n_c, n_rt, n_ct,
                         TR: tl.constexpr, TC: tl.constexpr, COLS: tl.constexpr, ADDITIVE: tl.constexpr):
    """One program: tile row ``program_id(0)``, tile columns ``COLS * program_id(1)`` on, of map ``(b, h)``.
    A boolean mask (read as bytes) keeps a score where nonzero; an additive one where not ``-inf``, and needs no
    load where 0. Entries past the mask's end leave both "any" and "all" as they are."""
    tr = tl.program_id(0)
    tc0 = tl.program_id(1) * COLS
    bh = tl.program_id(2)
    b = (bh // n_h).to(tl.int64)
    h = (bh % n_h).to(tl.int64)
    rows = tr * TR + tl.arange(0, TR)
    cols = tc0 * TC + tl.arange(0, COLS * TC)
    inside = (rows[:, None] < n_r) & (cols[None, :] < n_c)
    at = mask_ptr + b * s_b + h * s_h + rows[:, None].to(tl.int64) * s_r + cols[None, :].to(tl.int64) * s_c
    if ADDITIVE:
        x = tl.load(at, mask=inside, other=0.0)
        kept = x != float("-inf")
        free = x == 0.0
    else:
        x = tl.load(at, mask=inside, other=0)
        kept = x != 0
        free = kept
    any_ = tl.reshape(tl.where(inside & kept, 1, 0), (TR, COLS, TC))
    all_ = tl.reshape(tl.where(inside & (free == 0), 0, 1), (TR, COLS, TC))
    any_ = tl.max(tl.max(any_, 2), 0)
    all_ = tl.min(tl.min(all_, 2), 0)
    tiles = tc0 + tl.arange(0, COLS)
    out = ((b * n_h + h) * n_rt + tr) * n_ct + tiles
    tl.store(any_ptr + out, any_.to(tl.uint8), mask=tiles < n_ct)
    tl.store(all_ptr + out, all_.to(tl.uint8), mask=tiles < n_ct)


def mask_any_all(mask: torch.Tensor, tile_r: int, tile_c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ``tile_r x tile_c`` tile of a 4-D mask ``[b, h, n_r or 1, n_c or 1]`` (any strides): (some score kept,
    every score kept and free of any addition), bool ``[b, h, ceil(n_r / tile_r) or 1, ceil(n_c / tile_c) or
    1]``: ``block_map._mask_tiles_torch``'s result, in one launch. A boolean mask keeps where True; an additive
    one where not ``-inf``, and is free where 0. Tile sizes are powers of 2; a dim of size 1 stays 1."""
    b, h, n_r, n_c = mask.shape
    tr, tc = (1 if n_r == 1 else tile_r), (1 if n_c == 1 else tile_c)
    n_rt, n_ct = -(-n_r // tr), -(-n_c // tc)
    cols = max(1, min(next_power_of_2(n_ct), GRAIN_ELEMENTS // (tr * tc)))
    additive = mask.dtype != torch.bool
    x = mask if additive else mask.view(torch.uint8)
    strides = [0 if mask.shape[d] == 1 else x.stride(d) for d in range(4)]
    found = torch.empty(2, b, h, n_rt, n_ct, dtype=torch.uint8, device=mask.device)
    launch(_mask_any_all_kernel, (n_rt, -(-n_ct // cols), b * h), x, found[0], found[1], *strides,
           h, n_r, n_c, n_rt, n_ct, TR=tr, TC=tc, COLS=cols, ADDITIVE=additive, num_warps=4)
    return found[0].view(torch.bool), found[1].view(torch.bool)

