"""Flash-attention backward in Triton: dQ, dK, dV for every AttentionSpec term.

With ``P = exp(s - lse)`` recomputed from the forward's log-sum-exp and
``delta = rowsum(dO * O)`` (the preprocess kernel)::

    dV += dropout(P)^T dO
    dP  = dropout(dO V^T)
    dS  = P * (dP - delta) * softcap'(raw score)
    dK += scale * dS^T Q
    dQ += scale * dS K

``_attn_bwd_dkdv``: one program per ``[BLOCK_N]`` key tile of one (batch, kv head);
it loops over the group's query heads and their visible query tiles, so dK/dV
of a GQA kv head are summed in registers (no atomics, no repeated K/V). dQ is
computed by ``_attn_bwd_dq``: one program per query tile looping over its kv
tiles, like the forward (two more matrix products, no atomics, deterministic),
or, as an option, accumulated in the dK/dV kernel with float32 atomics (2-3x
slower on an H200: the atomics contend; benchmarks/results/kernel_configs.md).

Visited tiles follow the forward's rules, transposed for dK/dV: band mode
computes the query-tile range of a key tile from the band, map mode walks the
transposed tile map. Dropout masks are regenerated from the seed by the same
Philox stream as the forward (``_dropout_keep``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_flash_fwd import INTERPRET, LOG2E, _dot, _dropout_keep, _kv_tile_range, _scores


@triton.jit
def _attn_bwd_preprocess(O, DO, LSE, DELTA, LSE2, stride_ob, stride_oh, stride_om, stride_dob, stride_doh,
                         stride_dom, Nq, H, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O); lse in log2 units with rows of no visible key at +inf (so P = 0 there)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < Nq) & (cols[None, :] < DV)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + cols[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + cols[None, :], mask=ok,
                 other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Nq + rows, mask=rows < Nq, other=0.0)
    empty = lse == float("-inf")
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Nq + rows, tl.where(empty, 0.0, delta), mask=rows < Nq)
    tl.store(LSE2 + bh.to(tl.int64) * Nq + rows, tl.where(empty, float("inf"), lse * LOG2E), mask=rows < Nq)


@triton.jit
def _q_tile_range(n0, kv_end, Nq, off, band_lo, band_hi,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Band mode, transposed: query tiles ``[start, full_lo)`` masked, ``[full_lo, full_hi)`` fully visible,
    ``[full_hi, end)`` masked, for keys ``n0 .. n0 + BLOCK_N - 1`` (query i sees key j when
    ``lo <= j - i - off <= hi``)."""
    first_row = 0
    last_row = Nq  # exclusive
    full_first = 0
    full_last = tl.cdiv(Nq, BLOCK_M) * BLOCK_M
    if HAS_HI:
        first_row = tl.maximum(n0 - off - band_hi, 0)
        full_first = tl.maximum(n0 + BLOCK_N - 1 - off - band_hi, 0)
    if HAS_LO:
        last_row = tl.minimum(Nq, tl.maximum(n0 + BLOCK_N - off - band_lo, 0))
        full_last = tl.minimum(full_last, (tl.maximum(n0 - off - band_lo + 1, 0) // BLOCK_M) * BLOCK_M)
    start = (first_row // BLOCK_M) * BLOCK_M
    end = tl.maximum(tl.cdiv(last_row, BLOCK_M) * BLOCK_M, start)
    if n0 >= kv_end:
        end = start
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_first, BLOCK_M) * BLOCK_M, start), end)
    full_hi = tl.minimum(tl.maximum(full_last, full_lo), end)
    if n0 + BLOCK_N > kv_end:  # keys past the end: the whole column needs the bound check
        full_hi = full_lo
    return start, full_lo, full_hi, end


@triton.jit
def _tile_grads(
    q, do, k, v, rows, cols, lse2, delta, b, h, bh, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
    off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, KP_ROW: tl.constexpr,
    HAS_DOC: tl.constexpr, BIAS: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Recompute one ``[BLOCK_M, BLOCK_N]`` tile: the (dropped) probabilities for dV and dS for dQ/dK."""
    qk = _dot(q, tl.trans(k), None, DOT_PREC)
    s, cap_grad = _scores(
        qk, rows[:, None], cols[None, :], b, h, Nq, Nk, kv_end, sm_scale, softcap,
        off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
        bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
        q.dtype, MASKED, HAS_LO, HAS_HI, KP_ROW, HAS_DOC, BIAS, MASK, SOFTCAP,
    )
    p = tl.math.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N]
    dp = _dot(do, tl.trans(v), None, DOT_PREC)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], Nq, Nk, dropout_p)
        p_drop = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_drop = p
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * cap_grad
    return p_drop, ds


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, q_base, do_base, dq_base, stride_qm, stride_dom, stride_dqm,
    lo, hi, idx_ptr, b, h, bh, cols, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
    off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    MAP_M: tl.constexpr, FROM_LIST: tl.constexpr, MASKED: tl.constexpr, STEP: tl.constexpr, SUB: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, KP_ROW: tl.constexpr, HAS_DOC: tl.constexpr,
    BIAS: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if FROM_LIST:  # the next listed tile is loaded one iteration ahead (pipelines)
        tile = tl.load(idx_ptr + lo, mask=lo < hi, other=0) * MAP_M
    for it in range(lo * SUB, hi * SUB, STEP):
        if FROM_LIST:
            m0 = tile + (it % SUB) * BLOCK_M
        else:
            m0 = it
        rows = m0 + offs_m
        q = tl.load(Q + q_base + rows[:, None] * stride_qm + offs_d[None, :],
                    mask=(rows[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
        do = tl.load(DO + do_base + rows[:, None] * stride_dom + offs_dv[None, :],
                     mask=(rows[:, None] < Nq) & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_M, BLOCK_DV]
        lse2 = tl.load(LSE2 + bh.to(tl.int64) * Nq + rows, mask=rows < Nq, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * Nq + rows, mask=rows < Nq, other=0.0)
        p_drop, ds = _tile_grads(
            q, do, k, v, rows, cols, lse2, delta, b, h, bh, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, MASKED, HAS_LO, HAS_HI, KP_ROW, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
        dv = _dot(tl.trans(p_drop.to(do.dtype)), do, dv, DOT_PREC)
        ds = ds.to(q.dtype)
        dk = _dot(tl.trans(ds), q, dk, DOT_PREC)
        if ATOMIC_DQ:
            dq = _dot(ds, k, None, DOT_PREC) * sm_scale  # [BLOCK_M, BLOCK_D]
            tl.atomic_add(DQ + dq_base + rows[:, None] * stride_dqm + offs_d[None, :], dq,
                          mask=(rows[:, None] < Nq) & (offs_d[None, :] < D))
        if FROM_LIST:
            entry = (it + 1) // SUB
            tile = tl.load(idx_ptr + entry, mask=entry < hi, other=0) * MAP_M
    return dk, dv


def _bwd_configs(shapes):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _prune_bwd(configs, named_args, **kwargs):
    """Hopper: wide heads and float32 get the small tiles (shared memory, registers)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    wide = block_d >= 256 or (named_args["Q"].dtype.itemsize == 4 and block_d >= 128)
    kept = [c for c in configs if not (wide and c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] > 64 * 64)]
    return kept or [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


_TUNE_KEY = ["NQ_TUNE", "NK_TUNE", "BLOCK_D", "BLOCK_DV", "USE_MAP", "HAS_LO", "HAS_HI", "KP_MODE", "HAS_DOC",
             "BIAS", "MASK", "SOFTCAP", "DROPOUT"]


@triton.autotune(
    configs=_bwd_configs([(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3)]),
    key=_TUNE_KEY + ["ATOMIC_DQ"],
    prune_configs_by={"early_config_prune": _prune_bwd},
    reset_to_zero=["DQ"],
)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DQ, DKEY, DVAL, LSE2, DELTA,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    Nq, Nk, NQ_TUNE, NK_TUNE, H, GROUP, sm_scale, softcap, seed, dropout_p,
    off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    part_cnt, part_idx, full_cnt, full_idx, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MAP_M: tl.constexpr,
    MAP_N: tl.constexpr, USE_MAP: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    KP_MODE: tl.constexpr, HAS_DOC: tl.constexpr, BIAS: tl.constexpr, MASK: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    HKV = H // GROUP
    b = bhk // HKV
    hk = bhk % HKV
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=(cols[:, None] < Nk) & (offs_d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + offs_dv[None, :],
                mask=(cols[:, None] < Nk) & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
    kv_end = Nk
    if KP_MODE == 1:
        kv_end = tl.minimum(tl.load(kp_ptr + b).to(tl.int32), Nk)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = b * stride_qb + h * stride_qh
        do_base = b * stride_dob + h * stride_doh
        dq_base = b * stride_dqb + h * stride_dqh
        if USE_MAP:
            row = b * stride_cb + h * stride_ch + (n0 // MAP_N) * stride_cm
            lists = b * stride_ib + h * stride_ih + (n0 // MAP_N) * stride_im
            dk, dv = _dkdv_inner(
                dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, q_base, do_base, dq_base, stride_qm, stride_dom, stride_dqm,
                0, tl.load(part_cnt + row), part_idx + lists, b, h, bh, cols, Nq, Nk, kv_end, sm_scale, softcap,
                seed, dropout_p, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr,
                stride_kdb, bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh,
                stride_mm, stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, MAP_M, True, True, 1, MAP_M // BLOCK_M,
                HAS_LO, HAS_HI, KP_MODE == 2, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, ATOMIC_DQ, DOT_PREC,
            )
            dk, dv = _dkdv_inner(
                dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, q_base, do_base, dq_base, stride_qm, stride_dom, stride_dqm,
                0, tl.load(full_cnt + row), full_idx + lists, b, h, bh, cols, Nq, Nk, kv_end, sm_scale, softcap,
                seed, dropout_p, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr,
                stride_kdb, bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh,
                stride_mm, stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, MAP_M, True, False, 1, MAP_M // BLOCK_M,
                HAS_LO, HAS_HI, KP_MODE == 2, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, ATOMIC_DQ, DOT_PREC,
            )
        else:
            start, full_lo, full_hi, end = _q_tile_range(n0, kv_end, Nq, off, band_lo, band_hi, BLOCK_M, BLOCK_N,
                                                         HAS_LO, HAS_HI)
            dk, dv = _dkdv_inner(
                dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, q_base, do_base, dq_base, stride_qm, stride_dom, stride_dqm,
                start, full_lo, part_idx, b, h, bh, cols, Nq, Nk, kv_end, sm_scale, softcap,
                seed, dropout_p, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr,
                stride_kdb, bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh,
                stride_mm, stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, MAP_M, False, True, BLOCK_M, 1,
                HAS_LO, HAS_HI, False, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, ATOMIC_DQ, DOT_PREC,
            )
            dk, dv = _dkdv_inner(
                dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, q_base, do_base, dq_base, stride_qm, stride_dom, stride_dqm,
                full_lo, full_hi, part_idx, b, h, bh, cols, Nq, Nk, kv_end, sm_scale, softcap,
                seed, dropout_p, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr,
                stride_kdb, bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh,
                stride_mm, stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, MAP_M, False, False, BLOCK_M, 1,
                HAS_LO, HAS_HI, False, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, ATOMIC_DQ, DOT_PREC,
            )
            dk, dv = _dkdv_inner(
                dk, dv, k, v, Q, DO, DQ, LSE2, DELTA, q_base, do_base, dq_base, stride_qm, stride_dom, stride_dqm,
                full_hi, end, part_idx, b, h, bh, cols, Nq, Nk, kv_end, sm_scale, softcap,
                seed, dropout_p, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr,
                stride_kdb, bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh,
                stride_mm, stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, MAP_M, False, True, BLOCK_M, 1,
                HAS_LO, HAS_HI, False, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, ATOMIC_DQ, DOT_PREC,
            )
    dk = dk * sm_scale
    ok = cols[:, None] < Nk
    tl.store(DKEY + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DKEY.dtype.element_ty), mask=ok & (offs_d[None, :] < D))
    tl.store(DVAL + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :],
             dv.to(DVAL.dtype.element_ty), mask=ok & (offs_dv[None, :] < DV))


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo, hi, idx_ptr, b, h, bh, rows,
    Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
    off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    MAP_N: tl.constexpr, FROM_LIST: tl.constexpr, MASKED: tl.constexpr, STEP: tl.constexpr, SUB: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, KP_ROW: tl.constexpr, HAS_DOC: tl.constexpr,
    BIAS: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
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
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :],
                    mask=(cols[:, None] < Nk) & (offs_d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :],
                    mask=(cols[:, None] < Nk) & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
        _, ds = _tile_grads(
            q, do, k, v, rows, cols, lse2, delta, b, h, bh, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, MASKED, HAS_LO, HAS_HI, KP_ROW, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC)
        if FROM_LIST:
            entry = (it + 1) // SUB
            tile = tl.load(idx_ptr + entry, mask=entry < hi, other=0) * MAP_N
    return dq


@triton.autotune(
    configs=_bwd_configs([(128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2)]),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_bwd},
)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE2, DELTA,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
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
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=(rows[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_dv[None, :],
                 mask=(rows[:, None] < Nq) & (offs_dv[None, :] < DV), other=0.0)
    lse2 = tl.load(LSE2 + bh.to(tl.int64) * Nq + rows, mask=rows < Nq, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + rows, mask=rows < Nq, other=0.0)
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh
    kv_end = Nk
    if KP_MODE == 1:
        kv_end = tl.minimum(tl.load(kp_ptr + b).to(tl.int32), Nk)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if USE_MAP:
        row = b * stride_cb + h * stride_ch + (m0 // MAP_M) * stride_cm
        lists = b * stride_ib + h * stride_ih + (m0 // MAP_M) * stride_im
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, 0, tl.load(part_cnt + row),
            part_idx + lists, b, h, bh, rows, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MAP_N, True, True, 1, MAP_N // BLOCK_N,
            HAS_LO, HAS_HI, KP_MODE == 2, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, 0, tl.load(full_cnt + row),
            full_idx + lists, b, h, bh, rows, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MAP_N, True, False, 1, MAP_N // BLOCK_N,
            HAS_LO, HAS_HI, KP_MODE == 2, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
    else:
        start, full_lo, full_hi, end = _kv_tile_range(m0, kv_end, off, band_lo, band_hi, BLOCK_M, BLOCK_N,
                                                      HAS_LO, HAS_HI)
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, start, full_lo, part_idx, b, h, bh, rows,
            Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MAP_N, False, True, BLOCK_N, 1,
            HAS_LO, HAS_HI, False, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, full_lo, full_hi, part_idx, b, h, bh,
            rows, Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MAP_N, False, False, BLOCK_N, 1,
            HAS_LO, HAS_HI, False, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, full_hi, end, part_idx, b, h, bh, rows,
            Nq, Nk, kv_end, sm_scale, softcap, seed, dropout_p,
            off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            bias_ptr, stride_bb, stride_bh, stride_bm, stride_bn, mask_ptr, stride_mb, stride_mh, stride_mm,
            stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MAP_N, False, True, BLOCK_N, 1,
            HAS_LO, HAS_HI, False, HAS_DOC, BIAS, MASK, SOFTCAP, DROPOUT, DOT_PREC,
        )
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(rows[:, None] < Nq) & (offs_d[None, :] < D))
