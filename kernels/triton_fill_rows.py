"""The row-wise gradients of rows with no visible key (``fills._row_grads``) in one Triton kernel.

``fills._row_grads`` computes, for each row a kernel left without a key, the gradients of the softmax the original
model computed there: uniform over its keys ``U`` (``P_j = w_j = 1 / |U|`` on ``U``), dropped out with the call's
seed (``z_j``), through a softcap's tanh. In PyTorch that is a few dozen ops per block of such rows, about a
hundred launches on a GPU whatever the number of rows: at small sizes more time than the original's whole
attention (``benchmarks/results/fill_rows.md``). Here the same arithmetic runs in the kernel's own tiles: a
program per block of ``BLOCK_M`` query rows of one query head, which returns at once when none of its rows is
empty (most programs), and otherwise walks every key twice::

    pass 1:  expected_i = sum_j w_ij z_ij (dO_i . v_j)
    pass 2:  P_ij = w_ij z_ij;  dV_j += P_ij dO_i                      (atomic, float32)
             dS_ij = w_ij (z_ij (dO_i . v_j) - expected_i)        [on the band's keys only, GPT-2's fill]
                     * (1 - tanh(s_ij / c)^2)                      [softcap c, s_ij = scale q_i . k_j]
             dQ_i += scale dS_ij k_j;  dK_j += scale dS_ij q_i    (atomic, float32)

Rows that see a key take part as zeros (their q and dO masked to 0, their P to 0), and their dQ is not written.
The weights: ``Fill.FINITE`` and ``Fill.FINITE_ADDED`` are uniform over every key (``w = 1 / Nk``);
``Fill.FINITE_REPLACED_ADDED`` over the union of the row's band and the batch row's kept keys (disjoint on an
empty row), ``|U|`` from the band's ends and the kept count. The dropout multipliers are ``fills._dropout_keep``'s,
bit for bit: splitmix64 of the (batch, head, row, key) index and the seed, kept where its 53 low bits, read as a
fraction, are at least ``p`` (an integer comparison with ``ceil(p 2^53)``). Arithmetic is float32 (products
``ieee``, as the PyTorch path's float32 matmuls).

Not here: float64 inputs (their fills are float64), the gradients of an additive term (``_scatter_rows``), and
calls without a GPU or the interpreter; ``supported`` says which calls this kernel takes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fills import DROPPED_FILLS, _GOLDEN, _MIX1, _MIX2
from .spec import AttentionSpec, Fill, key_padding_keep, kept_scale

#: query rows per program, keys per tile
BLOCK_M, BLOCK_N = 32, 64
_U64 = (1 << 64) - 1


@triton.jit
def _splitmix_keep(row_index, keys, kv_len, seed, threshold, golden, mix1, mix2):
    """1.0 where ``fills._dropout_keep``'s draw for (row, key) is kept, else 0.0: ``[BM, BN]``. The multipliers
    are splitmix64's (``fills._GOLDEN`` ..), as unsigned 64-bit arguments: products wrap as the int64 ones do."""
    x = (row_index[:, None] * kv_len + keys[None, :]).to(tl.uint64)
    x = x * golden + seed
    x = (x ^ (x >> 30)) * mix1
    x = (x ^ (x >> 27)) * mix2
    x = x ^ (x >> 31)
    return tl.where((x & 0x1FFFFFFFFFFFFF) >= threshold, 1.0, 0.0)


@triton.jit
def _weights(rows, keys, kept_ptrs, band_lo, band_hi, diag, kv_len, kept_count,
             UNION: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """``(w [BM, BN], band [BM, BN])``: each row's uniform softmax weight of each key, and (``UNION``) whether the
    key is in the row's band (the keys whose scores get a gradient)."""
    in_keys = keys < kv_len
    if UNION:
        d = rows + diag
        start = tl.zeros_like(rows)
        end = tl.zeros_like(rows) + kv_len
        if HAS_LO:
            start = tl.minimum(tl.maximum(d + band_lo, 0), kv_len)
        if HAS_HI:
            end = tl.minimum(tl.maximum(d + band_hi + 1, 0), kv_len)
        end = tl.maximum(start, end)
        band = (keys[None, :] >= start[:, None]) & (keys[None, :] < end[:, None])
        kept = tl.load(kept_ptrs + keys, mask=in_keys, other=0) != 0
        union = band | kept[None, :]
        count = (end - start + kept_count).to(tl.float32)
        w = tl.where(union & in_keys[None, :], 1.0 / count[:, None], 0.0)
        return w, band
    w = tl.where(in_keys[None, :] & (rows[:, None] >= 0), 1.0 / kv_len, 0.0)
    return w, w > 0.0


@triton.jit
def _program_rows(EMPTY, seb, seh, q_heads, group, n_rows, BLOCK_M: tl.constexpr):
    """``(batch row, query head, key head, rows [BM], which are empty [BM])`` of this program: axis 0 a block of
    ``BLOCK_M`` rows (of ``n_rows``), axis 1 a (batch row, query head)."""
    bh = tl.program_id(1)
    b = bh // q_heads
    h = bh % q_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    empty = tl.load(EMPTY + b * seb + h * seh + rows, mask=rows < n_rows, other=0) != 0
    return b, h, h // group, rows, empty


@triton.jit
def _empty_rows_bwd(
    Q, K, V, DO, EMPTY, KEPT, KEPT_COUNT, DQ, DK, DV,
    sqb, sqh, sqm, sdob, sdoh, sdom, skb, skh, skn, svb, svh, svn, seb, seh, sdqb, sdqh, sdqm, sdkb, sdkh, sdkn,
    sdvb, sdvh, sdvn, skeepb,
    q_heads, group, q_len, kv_len, scale, softcap, seed, threshold, inv_keep, band_lo, band_hi, diag, golden, mix1,
    mix2,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCORES: tl.constexpr, UNION: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
):
    b, h, g, rows, empty = _program_rows(EMPTY, seb, seh, q_heads, group, q_len, BLOCK_M)
    if tl.max(empty.to(tl.int32), axis=0) == 0:
        return
    dims = tl.arange(0, HEAD_DIM)
    vdims = tl.arange(0, V_DIM)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + vdims[None, :], mask=empty[:, None], other=0.0)
    do = do.to(tl.float32)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :], mask=empty[:, None], other=0.0)
    q = q.to(tl.float32)
    k_base = K + b * skb + g * skh
    v_base = V + b * svb + g * svh
    kept_ptrs = KEPT + b * skeepb
    kept_count = tl.load(KEPT_COUNT + b)
    row_index = ((b * q_heads + h) * q_len + rows).to(tl.int64)
    seed = seed.to(tl.uint64)
    threshold = threshold.to(tl.uint64)
    # pass 1: sum_j w_j z_j (dO . v_j) per row
    expected = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SCORES:
        for start_n in range(0, kv_len, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            v = tl.load(v_base + keys[:, None] * svn + vdims[None, :], mask=(keys < kv_len)[:, None], other=0.0)
            dov = tl.dot(do, tl.trans(v.to(tl.float32)), input_precision="ieee")
            w, band = _weights(rows, keys, kept_ptrs, band_lo, band_hi, diag, kv_len, kept_count,
                               UNION, HAS_LO, HAS_HI)
            w = tl.where(empty[:, None], w, 0.0)
            if DROPOUT:
                w = w * _splitmix_keep(row_index, keys, kv_len, seed, threshold, golden, mix1, mix2) * inv_keep
            expected += tl.sum(w * dov, axis=1)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        in_keys = keys < kv_len
        v = tl.load(v_base + keys[:, None] * svn + vdims[None, :], mask=in_keys[:, None], other=0.0).to(tl.float32)
        w, band = _weights(rows, keys, kept_ptrs, band_lo, band_hi, diag, kv_len, kept_count, UNION, HAS_LO, HAS_HI)
        w = tl.where(empty[:, None], w, 0.0)
        z = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32)
        if DROPOUT:
            z = _splitmix_keep(row_index, keys, kv_len, seed, threshold, golden, mix1, mix2) * inv_keep
        p = w * z
        dv = tl.dot(tl.trans(p), do, input_precision="ieee")  # [BN, Dv]
        tl.atomic_add(DV + b * sdvb + g * sdvh + keys[:, None] * sdvn + vdims[None, :], dv, mask=in_keys[:, None])
        if SCORES:
            dov = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = w * (z * dov - expected[:, None])
            if UNION:
                ds = tl.where(band, ds, 0.0)
            k = tl.load(k_base + keys[:, None] * skn + dims[None, :], mask=in_keys[:, None], other=0.0)
            k = k.to(tl.float32)
            if SOFTCAP:
                t = tl.dot(q, tl.trans(k), input_precision="ieee") * scale / softcap
                t = 1.0 - 2.0 / (tl.exp(2.0 * t) + 1.0)  # tanh; exp overflows to inf for large t, giving +-1
                ds = ds * (1.0 - t * t)
            ds = tl.where(empty[:, None] & in_keys[None, :], ds, 0.0)
            dq += tl.dot(ds, k, input_precision="ieee")
            dk = tl.dot(tl.trans(ds), q, input_precision="ieee") * scale  # [BN, D]
            tl.atomic_add(DK + b * sdkb + g * sdkh + keys[:, None] * sdkn + dims[None, :], dk, mask=in_keys[:, None])
    if SCORES:
        tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqm + dims[None, :], dq * scale, mask=empty[:, None])


@triton.jit
def _empty_rows_fwd(
    V, EMPTY, KEPT, KEPT_COUNT, OUT,
    svb, svh, svn, seb, seh, sob, soh, som, skeepb,
    q_heads, group, n_rows, first_row, q_len, kv_len, seed, threshold, inv_keep, band_lo, band_hi, diag, golden,
    mix1, mix2,
    V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UNION: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
):
    """The dropped-out uniform rows of a forward: ``out_i = sum_j w_ij z_ij v_j`` on the empty rows of rows
    ``first_row ..`` (a chunk of ``n_rows``), written over ``OUT``'s (a copy of the kernel's output)."""
    b, h, g, local, empty = _program_rows(EMPTY, seb, seh, q_heads, group, n_rows, BLOCK_M)
    if tl.max(empty.to(tl.int32), axis=0) == 0:
        return
    rows = first_row + local
    vdims = tl.arange(0, V_DIM)
    v_base = V + b * svb + g * svh
    kept_ptrs = KEPT + b * skeepb
    kept_count = tl.load(KEPT_COUNT + b)
    row_index = ((b * q_heads + h) * q_len + rows).to(tl.int64)
    seed = seed.to(tl.uint64)
    threshold = threshold.to(tl.uint64)
    acc = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        v = tl.load(v_base + keys[:, None] * svn + vdims[None, :], mask=(keys < kv_len)[:, None], other=0.0)
        w, band = _weights(rows, keys, kept_ptrs, band_lo, band_hi, diag, kv_len, kept_count, UNION, HAS_LO, HAS_HI)
        z = _splitmix_keep(row_index, keys, kv_len, seed, threshold, golden, mix1, mix2) * inv_keep
        p = tl.where(empty[:, None], w * z, 0.0)
        acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
    out_ptrs = OUT + b * sob + h * soh + local[:, None] * som + vdims[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=empty[:, None])


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of ``D`` consecutive elements."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _kept(spec: AttentionSpec, union: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept [B, Nk] int8, its count [B] int32)``: the keys the added padding keeps, for a union fill (else
    placeholders the kernels do not read)."""
    if not union:
        return (torch.zeros(spec.batch, 1, dtype=torch.int8, device=device),
                torch.zeros(spec.batch, dtype=torch.int32, device=device))
    if spec.key_padding is None:
        kept = torch.ones(spec.batch, spec.kv_len, dtype=torch.int8, device=device)
    else:
        kept = key_padding_keep(spec.key_padding, spec.kv_len).expand(spec.batch, spec.kv_len).to(torch.int8)
    kept = kept.contiguous()
    return kept, kept.sum(-1, dtype=torch.int32)


def _dropout_args(spec: AttentionSpec, seed: int | None) -> tuple:
    """The kernels' seed, keep threshold (``ceil(p 2^53)``) and ``1 / (1 - p)`` for a call with dropout (``seed``
    given), else those of none; then splitmix64's multipliers, unsigned."""
    p = spec.dropout_p if seed is not None else 0.0
    return ((seed or 0) & ((1 << 62) - 1), math.ceil(p * 2.0**53), kept_scale(p),
            *(c & _U64 for c in (_GOLDEN, _MIX1, _MIX2)))


def dropped_rows(out: torch.Tensor, empty: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, first_row: int,
                 seed: int) -> torch.Tensor:
    """``fills._dropped_uniform_rows`` for calls ``supported`` takes (``out`` the kernel's ``[B, Hq, n, Dv]`` for
    query rows ``first_row ..``): a copy of ``out`` in its layout with each empty row's dropped-out uniform
    softmax times v. No host sync."""
    union = spec.fill == Fill.FINITE_REPLACED_ADDED
    kept, kept_count = _kept(spec, union, v.device)
    lo, hi = spec.band() if union else (None, None)
    v = _last_dim_contiguous(v)
    filled = _last_dim_contiguous(torch.empty_like(out).copy_(out))
    n_rows = out.shape[2]
    empty8 = empty.to(torch.int8).expand(spec.batch, spec.q_heads, n_rows).contiguous()
    grid = (triton.cdiv(n_rows, BLOCK_M), spec.batch * spec.q_heads)
    _empty_rows_fwd[grid](
        v, empty8, kept, kept_count, filled,
        v.stride(0), v.stride(1), v.stride(2), empty8.stride(0), empty8.stride(1),
        filled.stride(0), filled.stride(1), filled.stride(2), kept.stride(0),
        spec.q_heads, spec.group_size, n_rows, first_row, spec.q_len, spec.kv_len,
        *_dropout_args(spec, seed)[:3], lo or 0, hi or 0, spec.diagonal_offset, *_dropout_args(spec, seed)[3:],
        V_DIM=spec.v_head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, UNION=union, HAS_LO=lo is not None,
        HAS_HI=hi is not None,
    )
    return filled


def supported(spec: AttentionSpec, q: torch.Tensor, needs_bias_grad: bool, needs_mask_grad: bool) -> bool:
    """Whether this kernel computes ``fills._row_grads`` for the call: half or float32 inputs on a GPU (or under
    the interpreter), head dims that are powers of two of at least 16, no additive term's gradient asked for."""
    from .triton_flash import _interpreting

    if (needs_bias_grad and spec.bias is not None) or (needs_mask_grad and spec.mask is not None):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not (q.is_cuda or _interpreting()):
        return False
    dims_ok = all(d >= 16 and d & (d - 1) == 0 for d in (spec.head_dim, spec.v_head_dim))
    return dims_ok and spec.fill in (Fill.FINITE, Fill.FINITE_ADDED, Fill.FINITE_REPLACED_ADDED)


def row_grads(q, k, v, grad_out, empty, spec: AttentionSpec, seed: int | None):
    """``(dq, dk, dv)`` float32 (dq, dk None for ``Fill.FINITE``, whose scores get nothing): ``fills._row_grads``
    for calls ``supported`` takes, ``seed`` the forward's (None without dropout). No host sync."""
    q, k, v, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, grad_out))
    scores = spec.fill != Fill.FINITE
    device = q.device
    dv = torch.zeros(v.shape, dtype=torch.float32, device=device)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=device)
    union = spec.fill == Fill.FINITE_REPLACED_ADDED
    kept, kept_count = _kept(spec, union, device)
    lo, hi = spec.band() if union else (None, None)
    dropout = seed is not None and spec.dropout_p > 0.0 and spec.fill in DROPPED_FILLS
    seed_arg, threshold, inv_keep, golden, mix1, mix2 = _dropout_args(spec, seed if dropout else None)
    empty8 = empty.to(torch.int8).expand(spec.batch, spec.q_heads, spec.q_len).contiguous()
    grid = (triton.cdiv(spec.q_len, BLOCK_M), spec.batch * spec.q_heads)
    _empty_rows_bwd[grid](
        q, k, v, grad_out, empty8, kept, kept_count, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        empty8.stride(0), empty8.stride(1), dq.stride(0), dq.stride(1), dq.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), kept.stride(0),
        spec.q_heads, spec.group_size, spec.q_len, spec.kv_len, float(spec.scale),
        float(spec.softcap or 1.0), seed_arg, threshold, inv_keep, lo or 0, hi or 0, spec.diagonal_offset, golden,
        mix1, mix2,
        HEAD_DIM=spec.head_dim, V_DIM=spec.v_head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        SCORES=scores, UNION=union, HAS_LO=lo is not None, HAS_HI=hi is not None,
        SOFTCAP=spec.softcap is not None and scores, DROPOUT=dropout,
    )
    return (dq if scores else None), (dk if scores else None), dv

