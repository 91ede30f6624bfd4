"""Split-KV decode attention (flash-decoding) in Triton.

Decode attends a few query rows (one token, or a handful of speculative ones,
``Nq <= 16``) to a long KV cache. The work per (batch, kv head) is one long
matrix-vector product, too little parallelism for the machine, and the cost is
reading K and V once. So the keys are cut into ``S`` splits:

    grid = (m blocks, S splits, B * Hkv)

    for each program (m block, split s, batch b, kv head g):
        rows   = the G = Hq / Hkv query heads of the group times the Nq queries,
                 packed as the M dimension of one tl.dot (padded to >= 16):
                 row r <-> query head g * G + r // Nq, query r % Nq
        q      = Q[rows]                                      # [BLOCK_M, D], loaded once
        for each key tile K_j, V_j of split s:                # K, V read once for all rows
            s_ij = scale * q @ K_j^T                          # [BLOCK_M, BLOCK_N]
            s_ij = softcap * tanh(s_ij / softcap)             # if softcap
            s_ij = s_ij + bias + additive mask                # loaded per tile, broadcast strides
            s_ij = -inf where causal / window / key padding / documents / bool mask hide (i, j)
            online softmax: m, l, acc  (float32)
        O_part[s] = acc / l,  LSE_part[s] = m + log(l)        # natural log, -inf when no key

    merge (second kernel, only when S > 1), per row:
        M   = max_s LSE_part[s]
        out = sum_s exp(LSE_part[s] - M) * O_part[s] / sum_s exp(LSE_part[s] - M)
        lse = M + log(sum_s exp(LSE_part[s] - M))

The splits cover only the keys the causal / window band leaves visible, and
key padding (lengths, or the last kept key of a bool mask, computed on the
device) ends each program's loop early, so padded or windowed caches read only
their live keys. ``S`` is chosen so that ``B * Hkv * S`` programs fill the SMs
in whole waves (FlashAttention's ``num_splits_heuristic``).

Rows with no visible key come out of the kernels as 0 with ``lse = -inf``;
``forward`` then applies the spec's fill (NaN, 0, or the mean of v) with torch.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fills import fill_empty_rows, known_empty_rows
from .launch import cdiv, next_power_of_2
from .launch import launch as _launch
from .registry import Grads, Kernel, get, register
from .spec import AttentionSpec, Fill, key_padding_keep
from .term_cache import Interned, LastCall, TermCache

#: longest query a decode call takes: more rows are a prefill, for the flash kernels
MAX_QUERY_ROWS = 16
#: smallest M of a tensor-core tl.dot
MIN_DOT_ROWS = 16
#: rows of one program; larger groups (e.g. MQA with many heads) use several m blocks
MAX_BLOCK_M = 64
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
#: a split shorter than this many key tiles cannot hide its load latency
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 256
#: resident programs per SM at the default tile sizes (shared memory bound)
PROGRAMS_PER_SM = 2
#: FlashAttention's rule: the fewest splits whose wave efficiency is within 85% of the best
WAVE_EFFICIENCY_SLACK = 0.85
H200_SMS = 132
#: measured device-to-device copy rate of the project's H200 (shared/ANCHORS.md)
HBM_BYTES_PER_S = 4e12
#: cost under the Triton interpreter: slow enough that the planner never picks it on CPU
INTERPRETER_SECONDS = 1e6

# how an additive or boolean term enters the scores (constexpr codes for the kernel)
TERM_NONE = tl.constexpr(0)
TERM_ADD = tl.constexpr(1)  # s + term, in float32
TERM_ADD_HALF = tl.constexpr(2)  # (s.to(half) + term).to(float32), as eager adds a half mask
TERM_KEEP = tl.constexpr(3)  # boolean: True keeps the key


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b``; UPCAST works around the Triton interpreter's wrong bfloat16 tl.dot."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _score_term(s, ptr, row_off, cols, stride_k, load_mask, KIND: tl.constexpr):
    """Add (or apply as keep mask) one ``[BLOCK_M, BLOCK_N]`` tile of a broadcast term."""
    ptrs = ptr + row_off[:, None] + cols[None, :].to(tl.int64) * stride_k
    if KIND == TERM_KEEP:
        keep = tl.load(ptrs, mask=load_mask, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    elif KIND == TERM_ADD_HALF:
        term = tl.load(ptrs, mask=load_mask, other=0.0)
        # as eager adds half tensors: both rounded to half, summed in float32, rounded again
        s_half = s.to(term.dtype).to(tl.float32)
        s = (s_half + term.to(tl.float32)).to(term.dtype).to(tl.float32)
    elif KIND == TERM_ADD:
        term = tl.load(ptrs, mask=load_mask, other=0.0)
        s = s + term.to(tl.float32)
    return s


@triton.jit
def _decode_split_kernel(
    Q, K, V, O, LSE,
    BIAS, MASK, KEEP, KV_END, Q_DOC, KV_DOC,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_os, stride_od,
    stride_lb, stride_lh, stride_ln, stride_ls,
    stride_bb, stride_bh, stride_bn, stride_bk,
    stride_mb, stride_mh, stride_mn, stride_mk,
    stride_keep_b, stride_keep_k,
    stride_qdoc_b, stride_qdoc_n, stride_kvdoc_b, stride_kvdoc_k,
    scale, softcap, band_lo, band_hi, diag_offset,
    key_begin, key_stop, keys_per_split,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, NQ: tl.constexpr,
    HEAD_DIM: tl.constexpr, V_HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    BIAS_KIND: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_KV_END: tl.constexpr, HAS_DOC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // KV_HEADS).to(tl.int64)
    kv_head = (pid_bh % KV_HEADS).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] packed (head in group, query)
    row_valid = rows < GROUP * NQ
    q_idx = rows % NQ
    head = kv_head * GROUP + rows // NQ  # query head of each row
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < V_HEAD_DIM

    q_ptrs = (Q + b * stride_qb + head[:, None] * stride_qh + q_idx[:, None] * stride_qn
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    start = key_begin + pid_split * keys_per_split
    end = tl.minimum(start + keys_per_split, key_stop)
    if HAS_KV_END:
        end = tl.minimum(end, tl.load(KV_END + b))
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    bias_rows = b * stride_bb + head * stride_bh + q_idx * stride_bn  # [BLOCK_M]
    mask_rows = b * stride_mb + head * stride_mh + q_idx * stride_mn
    if HAS_DOC:
        q_doc = tl.load(Q_DOC + b * stride_qdoc_b + q_idx * stride_qdoc_n, mask=row_valid, other=0)
    diag = q_idx + diag_offset  # [BLOCK_M] diagonal key of each row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for k0 in range(start, end, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        col_valid = cols < end
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=col_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = _dot(q, k, DOT_PRECISION, DOT_UPCAST) * scale  # [BLOCK_M, BLOCK_N]
        if HAS_SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both saturations
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        tile_mask = row_valid[:, None] & col_valid[None, :]
        s = _score_term(s, BIAS, bias_rows, cols, stride_bk, tile_mask, BIAS_KIND)
        s = _score_term(s, MASK, mask_rows, cols, stride_mk, tile_mask, MASK_KIND)
        keep = tile_mask
        if HAS_LO:
            keep &= (cols[None, :] - diag[:, None]) >= band_lo
        if HAS_HI:
            keep &= (cols[None, :] - diag[:, None]) <= band_hi
        if HAS_KEEP:
            key_keep = tl.load(KEEP + b * stride_keep_b + cols * stride_keep_k, mask=col_valid, other=0)
            keep &= (key_keep != 0)[None, :]
        if HAS_DOC:
            kv_doc = tl.load(KV_DOC + b * stride_kvdoc_b + cols * stride_kvdoc_k, mask=col_valid, other=0)
            keep &= q_doc[:, None] == kv_doc[None, :]
        s = tl.where(keep, s, float("-inf"))

        # online softmax in natural units: subtracting before exponentiating keeps
        # finite fills such as finfo(float32).min from overflowing
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=col_valid[:, None] & dv_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("-inf"))
    o_ptrs = (O + b * stride_ob + head[:, None] * stride_oh + q_idx[:, None] * stride_on
              + pid_split * stride_os + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_valid[:, None] & dv_valid[None, :])
    l_ptrs = LSE + b * stride_lb + head * stride_lh + q_idx * stride_ln + pid_split * stride_ls
    tl.store(l_ptrs, lse, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    O_PART, LSE_PART, OUT, LSE, n_splits,
    V_HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One row of ``[B, Hq, Nq]``: combine ``O_PART [rows, S, Dv]`` by ``LSE_PART [rows, S]``."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_valid = offs_s < n_splits
    lse_s = tl.load(LSE_PART + row * n_splits + offs_s, mask=s_valid, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # empty splits weigh 0
    denom = tl.sum(w, 0)
    o_ptrs = O_PART + (row * n_splits + offs_s[:, None]) * V_HEAD_DIM + offs_dv[None, :]
    o = tl.load(o_ptrs, mask=s_valid[:, None] & (offs_dv < V_HEAD_DIM)[None, :], other=0.0)  # [BLOCK_S, BLOCK_DV]
    has_key = denom > 0.0
    out = tl.sum(w[:, None] * o, 0) / tl.where(has_key, denom, 1.0)
    tl.store(OUT + row * V_HEAD_DIM + offs_dv, out.to(OUT.dtype.element_ty), mask=offs_dv < V_HEAD_DIM)
    tl.store(LSE + row, tl.where(has_key, m_safe + tl.log(tl.where(has_key, denom, 1.0)), float("-inf")))


# ----------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class DecodeConfig:
    """Tile sizes and split count of one launch (``choose_config`` picks them from the spec)."""

    block_m: int
    block_n: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 3


def key_range(spec: AttentionSpec) -> tuple[int, int]:
    """Keys ``[begin, stop)`` that the causal / window band leaves visible to some query row."""
    lo, hi = spec.band()
    off = spec.diagonal_offset
    begin = 0 if lo is None else max(0, off + lo)
    stop = spec.kv_len if hi is None else min(spec.kv_len, spec.q_len - 1 + off + hi + 1)
    return begin, max(begin, stop)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H200_SMS


def num_splits_for(programs: int, tiles: int, sm_count: int) -> int:
    """Fewest splits whose wave efficiency is within WAVE_EFFICIENCY_SLACK of the best."""
    max_splits = max(1, min(MAX_SPLITS, tiles // MIN_TILES_PER_SPLIT))
    slots = sm_count * PROGRAMS_PER_SM

    def efficiency(splits: int) -> float:
        waves = programs * splits / slots
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, max_splits + 1))
    return next(s for s in range(1, max_splits + 1) if efficiency(s) >= WAVE_EFFICIENCY_SLACK * best)


def choose_config(spec: AttentionSpec, num_splits: int | None = None) -> DecodeConfig:
    """Tile sizes from the head dims, split count from Nk, B * Hkv and the SM count."""
    begin, stop = key_range(spec)
    return _config_for(spec.batch * spec.kv_heads, spec.group_size * spec.q_len, spec.head_dim,
                       spec.v_head_dim, stop - begin, _sm_count(spec.device), num_splits)


@functools.lru_cache(maxsize=1024)
def _config_for(heads: int, rows: int, head_dim: int, v_head_dim: int, keys: int, sm_count: int,
                num_splits: int | None) -> DecodeConfig:
    """``choose_config`` on plain numbers, cached: decode calls it once per generated token."""
    block_m = min(MAX_BLOCK_M, max(MIN_DOT_ROWS, next_power_of_2(rows)))
    wide = max(head_dim, v_head_dim) > 128
    block_n = 32 if wide else 64
    tiles = cdiv(keys, block_n)
    if num_splits is None:
        num_splits = num_splits_for(heads * cdiv(rows, block_m), tiles, sm_count)
    return DecodeConfig(block_m=block_m, block_n=block_n, num_splits=max(1, min(num_splits, max(tiles, 1))),
                        num_warps=4, num_stages=2 if wide else 3)


def _term_kind(term: torch.Tensor | None, dtype: torch.dtype) -> int:
    if term is None:
        return TERM_NONE.value
    if term.dtype == torch.bool:
        return TERM_KEEP.value
    if dtype in (torch.float16, torch.bfloat16) and term.dtype == dtype:
        return TERM_ADD_HALF.value
    return TERM_ADD.value


def _broadcast_term(term: torch.Tensor | None, spec: AttentionSpec, dummy: torch.Tensor):
    """``(tensor, strides [b, h, q, k])`` of a term broadcast to ``[B, Hq, Nq, Nk]`` (0 on broadcast dims)."""
    if term is None:
        return dummy, (0, 0, 0, 0)
    full = term.expand(spec.batch, spec.q_heads, spec.q_len, spec.kv_len)
    if full.dtype == torch.bool:
        full = full.view(torch.uint8)
    return full, full.stride()


#: per key-padding tensor (and Nk): its kernel arguments. The layers of a decode step share one padding tensor
_KEY_PADDING_ARGS = TermCache(8, without_terms=False)


def _key_padding_args(spec: AttentionSpec):
    """``(keep [B, Nk] uint8 or None, keep strides, kv_end [B] int32 or None)``, made once per padding tensor
    (``TermCache``: the layers of a step share it).

    Lengths become a per-batch loop end. A bool mask is loaded per tile, and its
    last kept key (computed on the device, no host sync) ends the loop early, so a
    prefix mask reads exactly as few keys as lengths do.
    """
    kp = spec.key_padding
    if kp is None:
        return None, (0, 0), None
    return _KEY_PADDING_ARGS.get([kp], (spec.kv_len, str(kp.device)), lambda: _make_key_padding_args(spec))


def _make_key_padding_args(spec: AttentionSpec):
    kp = spec.key_padding
    if kp.dtype != torch.bool:
        return None, (0, 0), kp.clamp(0, spec.kv_len).to(torch.int32)
    keep = key_padding_keep(kp, spec.kv_len)
    cols = torch.arange(1, spec.kv_len + 1, device=keep.device, dtype=torch.int32)
    kv_end = (keep.to(torch.int32) * cols).amax(1).to(torch.int32)
    keep_u8 = keep.view(torch.uint8)
    return keep_u8, keep_u8.stride(), kv_end


def _doc_args(spec: AttentionSpec):
    if spec.q_doc is None:
        return None, None, (0, 0, 0, 0)
    q_doc = spec.q_doc.expand(spec.batch, spec.q_len)
    kv_doc = spec.kv_doc.expand(spec.batch, spec.kv_len).to(q_doc.dtype)
    return q_doc, kv_doc, (*q_doc.stride(), *kv_doc.stride())


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, config: DecodeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Nq, Dv], lse [B, Hq, Nq] float32)``; empty rows are 0 / -inf (no fill applied)."""
    batch, q_heads, q_len, dv = spec.batch, spec.q_heads, spec.q_len, spec.v_head_dim
    if q_len == 0 or spec.kv_len == 0 or batch * q_heads == 0:  # no row, or no key: nothing to launch
        return (q.new_zeros((batch, q_heads, q_len, dv)),
                torch.full((batch, q_heads, q_len), float("-inf"), dtype=torch.float32, device=q.device))
    return PreparedDecode(spec, config).launch(q, k, v, spec, _key_padding_args(spec))


#: prepared calls kept, by shapes and settings (``TritonDecodeKernel.prepare``); the oldest are dropped first
_PREPARED = Interned(64)


class PreparedDecode:
    """``decode_attention`` and ``apply_fill`` for the calls of one spec's shapes: the configuration, the grid,
    the band's loop ends and the launch's static arguments decided once; per call, the outputs are made, the
    terms' arguments taken (key padding's, and whether its rows all see a key, handed on from the last call on
    the very same term tensors: ``LastCall``), and the two kernels launched (``launch``, which
    ``decode_attention`` runs too)."""

    __slots__ = ("config", "grid", "static", "merge", "constexprs", "_last")

    def __init__(self, spec: AttentionSpec, config: DecodeConfig | None = None):
        self.config = config = config or choose_config(spec)
        lo, hi = spec.band()
        begin, stop = key_range(spec)
        keys_per_split = cdiv(cdiv(stop - begin, config.num_splits), config.block_n) * config.block_n
        self.grid = (cdiv(spec.group_size * spec.q_len, config.block_m), config.num_splits,
                     spec.batch * spec.kv_heads)
        self.static = (spec.scale, spec.softcap or 1.0, lo or 0, hi or 0, spec.diagonal_offset, begin, stop,
                       max(keys_per_split, config.block_n))
        self.constexprs = dict(
            KV_HEADS=spec.kv_heads, GROUP=spec.group_size, NQ=spec.q_len, HEAD_DIM=spec.head_dim,
            V_HEAD_DIM=spec.v_head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_D=next_power_of_2(spec.head_dim), BLOCK_DV=next_power_of_2(spec.v_head_dim),
            HAS_SOFTCAP=spec.softcap is not None, HAS_LO=lo is not None, HAS_HI=hi is not None,
            DOT_PRECISION="ieee" if spec.dtype == torch.float32 else "tf32",
            DOT_UPCAST=_interpreting() and spec.dtype == torch.bfloat16,
            num_warps=config.num_warps, num_stages=config.num_stages)
        self.merge = dict(V_HEAD_DIM=spec.v_head_dim, BLOCK_S=next_power_of_2(config.num_splits),
                          BLOCK_DV=next_power_of_2(spec.v_head_dim))
        self._last = LastCall()

    def __call__(self, q, k, v, spec: AttentionSpec) -> torch.Tensor:
        terms = [t for t in (spec.key_padding, spec.bias, spec.mask) if t is not None]
        if terms:
            padding, fills = self._last.get(terms, lambda: self._terms(spec))
        else:  # the band alone (bottom-right with more query rows than keys) may leave a row no key
            padding, fills = (None, (0, 0), None), _may_fill(spec)
        out, lse = self.launch(q, k, v, spec, padding)
        if fills or spec.q_doc is not None:  # documents: rows are found on the device, per call
            return apply_fill(out, lse, v, spec)
        return out

    def launch(self, q, k, v, spec: AttentionSpec, padding: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [B, Hq, Nq, Dv], lse [B, Hq, Nq] float32)``, empty rows 0 / -inf (no fill); ``padding``: the
        key padding's kernel arguments (``_key_padding_args``)."""
        batch, q_heads, q_len, dv = spec.batch, spec.q_heads, spec.q_len, spec.v_head_dim
        splits = self.config.num_splits
        out = q.new_empty((batch, q_heads, q_len, dv))  # [B, Hq, Nq, Dv]
        lse = q.new_empty((batch, q_heads, q_len), dtype=torch.float32)  # [B, Hq, Nq]
        if splits == 1:
            o_dst, lse_dst = out, lse
            o_strides, lse_strides = (*out.stride()[:3], 0, out.stride(3)), (*lse.stride(), 0)
        else:
            o_dst = q.new_empty((batch, q_heads, q_len, splits, dv), dtype=torch.float32)  # [B, Hq, Nq, S, Dv]
            lse_dst = q.new_empty((batch, q_heads, q_len, splits), dtype=torch.float32)  # [B, Hq, Nq, S]
            o_strides, lse_strides = o_dst.stride(), lse_dst.stride()
        keep, keep_strides, kv_end = padding
        dummy = q  # stands in for absent optional tensors: never loaded (their constexpr flags are off)
        bias, bias_strides = _broadcast_term(spec.bias, spec, dummy)
        mask, mask_strides = _broadcast_term(spec.mask, spec, dummy)
        q_doc, kv_doc, doc_strides = _doc_args(spec)
        _launch(
            _decode_split_kernel, self.grid, q, k, v, o_dst, lse_dst,
            bias, mask, dummy if keep is None else keep, dummy if kv_end is None else kv_end,
            dummy if q_doc is None else q_doc, dummy if kv_doc is None else kv_doc,
            *q.stride(), *k.stride(), *v.stride(), *o_strides, *lse_strides,
            *bias_strides, *mask_strides, *keep_strides, *doc_strides, *self.static,
            BIAS_KIND=_term_kind(spec.bias, spec.dtype), MASK_KIND=_term_kind(spec.mask, spec.dtype),
            HAS_KEEP=keep is not None, HAS_KV_END=kv_end is not None, HAS_DOC=q_doc is not None,
            **self.constexprs,
        )
        if splits > 1:
            _launch(_merge_splits_kernel, (batch * q_heads * q_len,), o_dst, lse_dst, out, lse, splits, **self.merge)
        return out, lse

    @staticmethod
    def _terms(spec: AttentionSpec) -> tuple:
        """The key padding's kernel arguments, and whether a row may see no key (``apply_fill``'s question)."""
        return _key_padding_args(spec), _may_fill(spec)


def _may_fill(spec: AttentionSpec) -> bool:
    """Whether ``apply_fill`` may change some row of this call (False: it returns the output as it is)."""
    can_be_empty = spec.has_boolean_mask or any(t is not None and t.dtype != torch.bool for t in (spec.bias, spec.mask))
    return can_be_empty and spec.fill != Fill.SAFE and known_empty_rows(spec) is not False


def apply_fill(out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Rows with no visible key (``lse == -inf``, out 0) as ``spec.fill`` says (kernels/fills.py)."""
    if not _may_fill(spec):
        return out
    return fill_empty_rows(out, torch.isneginf(lse), v, spec, checked=True)


class TritonDecodeKernel(Kernel):
    """Split-KV (flash-decoding) forward for ``Nq <= 16`` over a long KV cache.

    Supports causal (both alignments), sliding windows, key padding (lengths or
    bool), document ids, additive bias / masks and bool masks with broadcast
    strides, softcap, GQA / MQA, fp16 / bf16 / fp32, head dims 16..256. Decode
    is inference: ``backward`` delegates to the ``reference`` kernel.
    """

    name = "triton_decode"
    devices = ("cuda",)
    exact = True
    summary = "Triton split-KV decode (flash-decoding): Nq <= 16 over a long KV cache, GQA packed per tile"

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.device.type != "cuda" and not _interpreting():
            reasons.append("needs a CUDA device (or TRITON_INTERPRET=1 for testing)")
        if spec.q_len > MAX_QUERY_ROWS:
            reasons.append(f"decode takes at most {MAX_QUERY_ROWS} query rows, got Nq={spec.q_len}")
        if spec.dropout_p > 0.0:
            reasons.append(f"dropout not supported (dropout_p={spec.dropout_p}); decode is inference")
        if spec.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {spec.dtype} not supported: use float16, bfloat16 or float32")
        for name, dim in (("head_dim", spec.head_dim), ("v_head_dim", spec.v_head_dim)):
            if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
                reasons.append(f"{name}={dim} outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
        return reasons

    def memory_bytes(self, spec: AttentionSpec) -> int:
        splits = choose_config(spec).num_splits
        if splits == 1:
            return 0
        rows = spec.batch * spec.q_heads * spec.q_len
        return rows * splits * (spec.v_head_dim + 1) * 4

    def cost(self, spec: AttentionSpec) -> float:
        begin, stop = key_range(spec)
        kv_bytes = spec.batch * spec.kv_heads * (stop - begin) * (spec.head_dim + spec.v_head_dim)
        seconds = kv_bytes * spec.dtype.itemsize / HBM_BYTES_PER_S
        return seconds + (INTERPRETER_SECONDS if spec.device.type != "cuda" else 0.0)

    def forward(self, q, k, v, spec: AttentionSpec, seed: int):
        out, lse = decode_attention(q, k, v, spec)
        return apply_fill(out, lse, v, spec), lse

    def prepare(self, spec: AttentionSpec):
        """``infer`` with what the spec's shapes decide taken once (``PreparedDecode``): a decode step calls each
        layer's site once per token, and choosing the split, the grid and the launch arguments cost as much host
        time as the two launches."""
        if spec.q_len == 0 or spec.kv_len == 0 or spec.batch * spec.q_heads == 0:
            return self.infer
        # shared by every site with these shapes and settings: the layers of a decode step prepare one call
        # (a growing cache makes a new plan per step) and its ``LastCall`` hands the padding's answer from the
        # first layer to the others
        key = (spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len, spec.head_dim, spec.v_head_dim,
               spec.dtype, spec.device, spec.scale, spec.softcap, spec.band(), spec.diagonal_offset, spec.fill,
               *(t is None for t in (spec.key_padding, spec.q_doc, spec.bias, spec.mask)))
        return _PREPARED.get(key, lambda: PreparedDecode(spec))

    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad) -> Grads:
        return get("reference").backward(
            grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad
        )


register(TritonDecodeKernel())
