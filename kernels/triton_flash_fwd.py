"""Flash-attention forward in Triton, for every AttentionSpec term.

Algorithm (FlashAttention-2, one program per ``[BLOCK_M]`` query tile of one
(batch, query head); the kv head is ``h // group``, so GQA/MQA read K/V unrepeated)::

    m = -inf, l = 0, acc = 0                         # [BLOCK_M], [BLOCK_M], [BLOCK_M, Dv]
    for each visible kv tile n:
        s     = scores(q @ k_n^T)                    # scale, softcap, bias, mask, -inf where masked
        m_new = max(m, rowmax(s))
        p     = exp2(s - m_new)                      # scores are kept in log2 units
        l     = l * exp2(m - m_new) + rowsum(p)
        acc   = acc * exp2(m - m_new) + dropout(p) @ v_n
        m     = m_new
    out = acc / l,   lse = (m + log2 l) * ln 2      # rows with l == 0 (no visible key): out 0, lse -inf

Which kv tiles are visited, in two modes:

* **band** (no term, causal, window, integer key lengths): the tile range of
  each query tile is computed from the band ``lo <= j - i - offset <= hi``
  and the key length, split into masked edges and a fully visible middle that
  runs with ``MASKED=False`` (no mask arithmetic), as in Triton's fused-attention
  tutorial's constexpr stages.
* **map** (bool key padding, documents, dense masks): a tile map
  (``block_map.py``) lists each query tile's partial and full kv tiles; the
  partial list runs with the mask loads, the full list without.

``_scores`` is shared with the backward (``triton_flash_bwd.py``): it is
orientation-free (query indices ``i`` and key indices ``j`` come already
broadcast as ``[M, 1]``/``[1, N]`` or transposed), so the dK/dV kernel can work
on transposed tiles.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # 1/ln 2
LN2 = tl.constexpr(0.6931471805599453)  # ln 2
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: tile map granularity; kernel tiles divide it. The interpreter uses small tiles so tiny tests cross tiles.
MAP_BLOCK = 32 if INTERPRET else 128
#: the interpreter's tl.dot mishandles bfloat16 operands: it multiplies them in float32 instead
UPCAST_BF16_DOT = tl.constexpr(INTERPRET)


# ----------------------------------------------------------------------------- shared pieces
@triton.jit
def _add_term(s, term, DTYPE: tl.constexpr, HALF: tl.constexpr):
    """``s + term`` at the precision eager adds them: in the half dtype when the term is half (spec.py)."""
    if HALF:
        # round s to half, add exactly in float32, round the sum: what a half add does (and torch does)
        return (s.to(DTYPE).to(tl.float32) + term.to(tl.float32)).to(DTYPE).to(tl.float32)
    return s + term.to(tl.float32)


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    if UPCAST_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _tanh(x):
    # exp overflows to inf for large x, giving exactly +-1
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _visible(i, j, b, Nq, Nk, kv_end, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr,
             stride_kdb, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, KP_ROW: tl.constexpr, HAS_DOC: tl.constexpr):
    """Whether query ``i`` sees key ``j`` (broadcast index shapes, either orientation) under the structural
    terms: a key before ``kv_end`` (integer key lengths), inside the band ``band_lo <= j - i - off <= band_hi``,
    kept by the boolean key-padding row, and in the query's document."""
    keep = j < kv_end
    if HAS_LO:
        keep = keep & (j - i - off >= band_lo)
    if HAS_HI:
        keep = keep & (j - i - off <= band_hi)
    if KP_ROW:
        keep = keep & (tl.load(kp_ptr + b * stride_kpb + j, mask=j < Nk, other=0) != 0)
    if HAS_DOC:
        q_id = tl.load(qdoc_ptr + b * stride_qdb + i, mask=i < Nq, other=-1)
        k_id = tl.load(kvdoc_ptr + b * stride_kdb + j, mask=j < Nk, other=-2)
        keep = keep & (q_id == k_id)
    return keep


@triton.jit
def _kept(i, j, b, Nq, Nk, kv_end, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr,
          stride_kdb, mask_row, stride_mm, stride_mn, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
          KP_ROW: tl.constexpr, HAS_DOC: tl.constexpr, MASK_BOOL: tl.constexpr):
    """``_visible`` and, with ``MASK_BOOL``, the boolean mask's element at (i, j) (``mask_row``: the mask of this
    batch row and head; 64-bit offsets, a mask of 64k x 64k passes 2^31 elements)."""
    keep = _visible(i, j, b, Nq, Nk, kv_end, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb,
                    kvdoc_ptr, stride_kdb, HAS_LO, HAS_HI, KP_ROW, HAS_DOC)
    if MASK_BOOL:
        element = mask_row + i.to(tl.int64) * stride_mm + j.to(tl.int64) * stride_mn
        keep = keep & (tl.load(element, mask=(i < Nq) & (j < Nk), other=0) != 0)
    return keep


@triton.jit
def _element(ptr, b, h, i, j, stride_b, stride_h, stride_m, stride_n):
    """``ptr``'s elements at (b, h, i, j) with 64-bit offsets: a mask or bias of B x H x N x N elements passes 2^31
    at 46k x 46k per head, or sooner over batch rows and heads (3 x 16 x 8k x 8k)."""
    head = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    return ptr + head + i.to(tl.int64) * stride_m + j.to(tl.int64) * stride_n


@triton.jit
def _scores(
    qk, i, j, b, h, Nq, Nk, kv_end, sm_scale, softcap,
    off, band_lo, band_hi, kp_ptr, stride_kpb,
    qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    DTYPE: tl.constexpr, MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    KP_ROW: tl.constexpr, HAS_DOC: tl.constexpr, BIAS: tl.constexpr, MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Scores of one tile in log2 units, ``-inf`` where masked, and d(capped)/d(raw) for the backward.

    ``BIAS``/``MASK``: 0 none, 1 float32-added, 2 added in ``DTYPE`` (half); ``MASK`` 3 is boolean.
    """
    in_bounds = (i < Nq) & (j < Nk)
    cap_grad = 1.0
    if not SOFTCAP and BIAS == 0 and MASK != 1 and MASK != 2:
        # nothing is added in natural units: one multiply by a scalar folded once per tile
        s = qk * (sm_scale * LOG2E)
    else:
        if SOFTCAP:
            t = _tanh(qk * (sm_scale / softcap))
            s = t * softcap
            cap_grad = 1.0 - t * t
        else:
            s = qk * sm_scale
        if BIAS != 0:
            bias = tl.load(_element(bias_ptr, b, h, i, j, stride_bb, stride_bh, stride_bm, stride_bn),
                           mask=in_bounds, other=0.0)
            s = _add_term(s, bias, DTYPE, BIAS == 2)
        if MASK == 1 or MASK == 2:
            if MASKED:
                add = tl.load(_element(mask_ptr, b, h, i, j, stride_mb, stride_mh, stride_mm, stride_mn),
                              mask=in_bounds, other=0.0)
                s = _add_term(s, add, DTYPE, MASK == 2)
            elif MASK == 2:
                # a full tile of an additive half mask is all zeros, but eager still rounds s to half
                s = s.to(DTYPE).to(tl.float32)
        s = s * LOG2E
    if MASKED:
        keep = _visible(i, j, b, Nq, Nk, kv_end, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb,
                        kvdoc_ptr, stride_kdb, HAS_LO, HAS_HI, KP_ROW, HAS_DOC)
        if MASK == 3:
            keep = keep & (tl.load(_element(mask_ptr, b, h, i, j, stride_mb, stride_mh, stride_mm, stride_mn),
                                   mask=in_bounds, other=0) != 0)
        s = tl.where(keep, s, float("-inf"))
    return s, cap_grad


@triton.jit
def _dropout_keep(seed, bh, i, j, Nq, Nk, dropout_p):
    """Philox keep mask of the tile, a pure function of (seed, b, h, i, j): the backward regenerates it."""
    offsets = (bh.to(tl.int64) * Nq + i) * Nk + j
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _kv_tile_range(m0, kv_end, off, band_lo, band_hi,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Band mode: kv tiles ``[start, full_lo)`` masked, ``[full_lo, full_hi)`` fully visible, ``[full_hi, end)``
    masked, for query rows ``m0 .. m0 + BLOCK_M - 1`` (all bounds multiples of BLOCK_N)."""
    first_key = 0
    last_key = kv_end  # exclusive
    full_first = 0
    full_last = (kv_end // BLOCK_N) * BLOCK_N
    if HAS_LO:
        first_key = tl.maximum(m0 + off + band_lo, 0)
        full_first = tl.maximum(m0 + BLOCK_M - 1 + off + band_lo, 0)
    if HAS_HI:
        last_key = tl.minimum(last_key, tl.maximum(m0 + BLOCK_M + off + band_hi, 0))
        full_last = tl.minimum(full_last, (tl.maximum(m0 + off + band_hi + 1, 0) // BLOCK_N) * BLOCK_N)
    start = (first_key // BLOCK_N) * BLOCK_N
    end = tl.maximum(tl.cdiv(last_key, BLOCK_N) * BLOCK_N, start)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_first, BLOCK_N) * BLOCK_N, start), end)
    full_hi = tl.minimum(tl.maximum(full_last, full_lo), end)
    return start, full_lo, full_hi, end


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
    lo, hi, idx_ptr,
    b, h, bh, offs_m, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
    off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MAP_N: tl.constexpr, FROM_LIST: tl.constexpr, MASKED: tl.constexpr,
    STEP: tl.constexpr, SUB: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, KP_ROW: tl.constexpr, HAS_DOC: tl.constexpr,
    BIAS: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Online-softmax over kv tiles ``lo..hi`` (positions, or list entries when ``FROM_LIST``)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if FROM_LIST:  # the next listed tile is loaded one iteration ahead (pipelines)
        tile = tl.load(idx_ptr + lo, mask=lo < hi, other=0) * MAP_N
    for it in range(lo * SUB, hi * SUB, STEP):
        if FROM_LIST:
            n0 = tile + (it % SUB) * BLOCK_N
        else:
            n0 = it
        cols = n0 + offs_n
        kT_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]  # [BLOCK_D, BLOCK_N]
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :]  # [BLOCK_N, BLOCK_DV]
        if MASKED or D != BLOCK_D:
            kT = tl.load(kT_ptrs, mask=(cols[None, :] < Nk) & (offs_d[:, None] < D), other=0.0)
        else:
            kT = tl.load(kT_ptrs)
        qk = _dot(q, kT, None, DOT_PREC)  # [BLOCK_M, BLOCK_N]
        s, _ = _scores(
            qk, offs_m[:, None], cols[None, :], b, h, Nq, Nk, kv_end, sm_scale, softcap,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn,
            mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
            q.dtype, MASKED, HAS_LO, HAS_HI, KP_ROW, HAS_DOC, BIAS, MASK, SOFTCAP,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or BIAS != 0:
            # a row masked so far has m = -inf: subtract 0 instead, so exp2 gives 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every score of an unmasked tile without a bias (which may hold -inf) is finite
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], cols[None, :], Nq, Nk, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None]
        if MASKED or DV != BLOCK_DV:
            v = tl.load(v_ptrs, mask=(cols[:, None] < Nk) & (offs_dv[None, :] < DV), other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = _dot(p.to(v.dtype), v, acc, DOT_PREC)
        m_i = m_new
        if FROM_LIST:
            entry = (it + 1) // SUB
            tile = tl.load(idx_ptr + entry, mask=entry < hi, other=0) * MAP_N
    return acc, l_i, m_i


def _fwd_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    shapes = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _prune_fwd(configs, named_args, **kwargs):
    """Hopper: keep the register/shared-memory budget for wide heads and float32."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    wide = block_d >= 256 or (named_args["Q"].dtype.itemsize == 4 and block_d >= 128)
    kept = [c for c in configs if not (wide and c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] > 128 * 64)]
    if wide:
        kept = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=min(c.num_stages, 2)) for c in kept]
    return kept or configs[-1:]


@triton.autotune(
    configs=_fwd_configs(),
    key=["NQ_TUNE", "NK_TUNE", "BLOCK_D", "BLOCK_DV", "USE_MAP", "HAS_LO", "HAS_HI", "KP_MODE", "HAS_DOC", "BIAS",
         "MASK", "SOFTCAP", "DROPOUT"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    Nq, Nk, NQ_TUNE, NK_TUNE, H, GROUP, sm_scale, softcap, seed, dropout_p,
    off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    part_cnt, part_idx, full_cnt, full_idx, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MAP_M: tl.constexpr,
    MAP_N: tl.constexpr, USE_MAP: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    KP_MODE: tl.constexpr, HAS_DOC: tl.constexpr, BIAS: tl.constexpr, MASK: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # heavy (late, causal) query tiles first: fewer idle SMs at the tail
    pid_m = tl.cdiv(Nq, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh
    kv_end = Nk
    if KP_MODE == 1:  # integer lengths
        kv_end = tl.minimum(tl.load(kp_ptr + b).to(tl.int32), Nk)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if USE_MAP:
        row = b * stride_cb + h * stride_ch + (m0 // MAP_M) * stride_cm
        lists = b * stride_ib + h * stride_ih + (m0 // MAP_M) * stride_im
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, 0, tl.load(part_cnt + row), part_idx + lists,
            b, h, bh, offs_m, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MAP_N, True, True, 1, MAP_N // BLOCK_N,
            HAS_LO, HAS_HI, KP_MODE == 2, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, 0, tl.load(full_cnt + row), full_idx + lists,
            b, h, bh, offs_m, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MAP_N, True, False, 1, MAP_N // BLOCK_N,
            HAS_LO, HAS_HI, KP_MODE == 2, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
    else:
        start, full_lo, full_hi, end = _kv_tile_range(m0, kv_end, off, band_lo, band_hi, BLOCK_M, BLOCK_N,
                                                      HAS_LO, HAS_HI)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start, full_lo, part_idx,
            b, h, bh, offs_m, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MAP_N, False, True, BLOCK_N, 1,
            HAS_LO, HAS_HI, False, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full_lo, full_hi, part_idx,
            b, h, bh, offs_m, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MAP_N, False, False, BLOCK_N, 1,
            HAS_LO, HAS_HI, False, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full_hi, end, part_idx,
            b, h, bh, offs_m, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MAP_N, False, True, BLOCK_N, 1,
            HAS_LO, HAS_HI, False, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < DV))
    tl.store(LSE + bh.to(tl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)
