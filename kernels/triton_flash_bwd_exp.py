"""A Hopper backward for band specs (no term, causal, window, GQA) and for key padding, documents and a dense
boolean mask on top of them, with its variants as switches.

Not a kernel of its own: ``benchmarks/backward_sweep.py`` checks and times every variant against
``triton_flash``'s general backward and the peers, and ``triton_flash``'s backward runs the variant measured
fastest (``MEASURED_VARIANTS``: causal or no band, head dims 64 and 128, half precision) wherever one was
measured; other specs keep the general backward. Same function as ``triton_flash_bwd.py`` in band mode, from the forward's ``(out, lse)``; three
launches::

    delta = rowsum(dO * O),  lse2 = lse * log2(e)      (triton_flash_bwd's pre-pass; +inf on empty rows)

    dK/dV kernel, one program per [BLOCK_N1] key tile of one (batch, kv head), walking the query tiles of
    its band, transposed so that no accumulator changes layout (s^T, not s, is computed):
        p^T  = exp2(qk_scale * k @ q^T - lse2)         [BLOCK_N1, BLOCK_M1]
        dV  += p^T @ dO
        ds^T = p^T * (v @ dO^T - delta)
        dK  += ds^T @ q                                (times scale once, at the end)

    dQ kernel, one program per [BLOCK_M2] query tile, walking the key tiles of its band (no atomics:
    deterministic):
        p  = exp2(qk_scale * q @ k^T - lse2)
        dQ += (p * (dO @ v^T - delta)) @ k             (times scale once, at the end)

Key padding (lengths or a boolean row), documents and a dense boolean mask walk tile lists instead of the
band's tile range (``block_map.tile_lists`` at each kernel's own tile shape, transposed for the dK/dV kernel):
the partial tiles with the mask arithmetic (``triton_flash_fwd._kept``, the forward's: the band, the terms, the
boolean mask's elements), the full tiles without it (with ``full_run``, the first run of consecutive ones as a
plain range, whose loads pipeline as the band's do), the empty ones never. Packed documents of a few thousand
tokens thus cost what their causal blocks cost, and a window a model hands over as an ``[N, N]`` boolean mask
costs its band's tiles plus the mask loads of the partial ones. An additive mask keeps the general backward
(its values enter the scores, not only which are kept).

The scale is folded with log2(e) into one multiply-add before ``exp2`` (the inputs are not rescaled, so the
result is the same function, not a rounded copy of it). Rows with no visible key have ``lse = -inf``:
``p = 0`` on them, and ``spec.fill``'s gradient is added afterwards as ``triton_flash`` adds it.

What a ``Variant`` changes:

* ``block_m1, block_n1`` (dK/dV kernel) and ``block_m2, block_n2`` (dQ kernel): tile shapes;
  ``num_warps``, ``num_stages``: launch configuration of both.
* ``split``: each tile range is cut into a masked leading edge, a fully visible middle without mask
  arithmetic, and a masked trailing edge (``_q_tile_range`` / ``_kv_tile_range``). Off: one loop, every
  tile masked.
* ``gqa_in_program``: a dK/dV program walks every query head of its kv head's group and sums in registers,
  so dK/dV need no reduction. Off: one program per query head writes float32 dK/dV per query head and
  torch sums each group (more programs, more memory traffic; only differs from on for GQA).
* ``descriptors``: q and dO (dK/dV kernel) and k and v (dQ kernel) are read through device-side tensor
  descriptors (TMA on Hopper; rows past the end read as 0). Off: pointer loads.
* ``prefetch`` (tile lists only): a listed tile's index is loaded one iteration ahead, so that the loads of
  q/dO (dK/dV kernel) or k/v (dQ kernel) do not wait on it inside the iteration. Off: loaded where it is used.
* ``fused``: the dK/dV and dQ kernels as one launch (``_band_bwd_fused``): one grid of the dK/dV programs, then
  the dQ programs, which start on the SMs the dK/dV programs leave at their tail. Off: two launches.
* ``full_run`` (tile lists only): a row's first run of consecutive full tiles is walked as a range, the rest of
  its full tiles through the list (the forward's switch). Off: every full tile through the list.
* ``heads_per_chunk`` (two launches only): each kernel's programs start heaviest tile first over a few heads at a
  time, on a 1-D grid (the forward's switch, ``triton_flash_tma.tile_order``): a dK/dV program's heaviest key tile
  is its first (a causal key tile sees the queries after it), a dQ program's its last. Off: the grid of (tile,
  head), each head's tiles in turn.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .block_map import tile_lists
from .spec import AttentionSpec
from .launch import cdiv
from .layout import sum_groups
from .launch import launch as _launch
from .triton_flash import LISTED_TERM_ARGS, _block, _last_dim_contiguous, _with_empty_rows, listed_term_values
from .triton_flash_bwd import _attn_bwd_preprocess, _q_tile_range
from .triton_flash_fwd import LOG2E, _dot, _kept, _kv_tile_range
from .triton_flash_tma import (DESCRIPTOR_ALIGN, HAS_DESCRIPTORS, MAX_GRID_X, _load_rows, _map_part, list_args,
                               listed, listed_kind, one_sided, tile_order, use_scratch_allocator)
from .triton_flash_tma import Variant as ForwardVariant
from .triton_flash_tma import unsupported_reasons as forward_reasons

#: rows per program of the delta pre-pass
PRE_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run the backward; see the module docs for what each switch does."""

    block_m1: int = 64
    block_n1: int = 128
    block_m2: int = 128
    block_n2: int = 64
    num_warps: int = 8
    num_stages: int = 3
    split: bool = True
    gqa_in_program: bool = True
    descriptors: bool = False
    full_run: bool = True
    prefetch: bool = False
    fused: bool = False
    heads_per_chunk: int = 0

    @property
    def name(self) -> str:
        parts = ["desc" if self.descriptors else "ptr"]
        if not self.split:
            parts.append("nosplit")
        if not self.gqa_in_program:
            parts.append("perhead")
        if not self.full_run:
            parts.append("lists")
        if self.prefetch:
            parts.append("prefetch")
        if self.fused:
            parts.append("fused")
        if self.heads_per_chunk:
            parts.append(f"chunk{self.heads_per_chunk}")
        return (f"{'+'.join(parts)} kv{self.block_m1}x{self.block_n1} q{self.block_m2}x{self.block_n2} "
                f"w{self.num_warps} s{self.num_stages}")


def _as_variant(variant: Variant | dict) -> Variant:
    if isinstance(variant, dict):
        unknown = sorted(set(variant) - {f.name for f in dataclasses.fields(Variant)})
        if unknown:
            raise TypeError(f"variant keys {unknown} are not fields of the backward's Variant: use some of "
                            f"{[f.name for f in dataclasses.fields(Variant)]}")
        variant = Variant(**variant)
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a triton_flash_bwd_exp.Variant or a dict of its fields, got "
                        f"{type(variant).__name__}")
    return variant


def candidate_variants(head_dim: int, group_size: int = 1,
                       tiles: list[tuple[int, int, int, int, int, int]] | None = None,
                       chunks: tuple[int, ...] = ()) -> list[Variant]:
    """The variants the sweep and the GPU tests run: ``tiles`` ``(block_m1, block_n1, block_m2, block_n2,
    num_warps, num_stages)``, by default Flex's H100 backward (64x128 key tiles walking 64-row query tiles,
    8 warps, 3 stages at D = 128), the Triton tutorial's (32x128 / 128x32 at 4 warps, 5 stages) and a few
    between; then each switch off once on the first tiles, the two kernels in one launch, descriptors on where
    Triton has them, per-head dK/dV for GQA, and the first tiles in each order of ``chunks``
    (``heads_per_chunk`` values)."""
    if tiles is None and head_dim <= 64:
        tiles = [(64, 128, 128, 64, 8, 3), (64, 128, 64, 128, 4, 3), (32, 128, 128, 32, 4, 5),
                 (64, 64, 64, 64, 4, 3), (128, 128, 128, 128, 8, 2)]
    elif tiles is None:
        tiles = [(64, 128, 128, 64, 8, 3), (64, 128, 64, 128, 8, 3), (32, 128, 128, 32, 4, 5),
                 (64, 64, 64, 64, 4, 3), (64, 128, 128, 64, 8, 2)]
    out = [Variant(*t) for t in tiles]
    first = out[0]
    out.append(dataclasses.replace(first, split=False))
    out.append(dataclasses.replace(first, fused=True))
    if HAS_DESCRIPTORS:
        out += [dataclasses.replace(v, descriptors=True) for v in out[:2]]
    if group_size > 1:
        out.append(dataclasses.replace(first, gqa_in_program=False))
    out += [dataclasses.replace(first, heads_per_chunk=chunk) for chunk in chunks if chunk]
    return out


def unsupported_reasons(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        spec: AttentionSpec, variant: Variant) -> list[str]:
    """Every reason ``backward`` cannot run ``variant`` on these inputs; empty when it can. The spec's
    (device, band terms, dtypes, head dims, descriptor alignment of q/k/v) are the forward experiment's."""
    # the forward's: a band, with key padding, documents and a boolean mask as tile lists (an additive mask is
    # refused: its values enter the scores)
    reasons = forward_reasons(q, k, v, spec, ForwardVariant(descriptors=variant.descriptors))
    tiles = {name: getattr(variant, name) for name in ("block_m1", "block_n1", "block_m2", "block_n2")}
    bad = [f"{name}={size}" for name, size in tiles.items() if size < 16 or size & (size - 1)]
    if bad:
        reasons.append(f"{', '.join(bad)}: tiles must be powers of two >= 16 (tl.dot tiles)")
    if variant.num_warps not in (1, 2, 4, 8, 16) or variant.num_stages < 1:
        reasons.append(f"num_warps={variant.num_warps}, num_stages={variant.num_stages}: warps must be a power of "
                       "two up to 16 and stages at least 1")
    if variant.heads_per_chunk < 0 or (variant.heads_per_chunk and variant.fused):
        reasons.append(f"heads_per_chunk={variant.heads_per_chunk}: must be 0 (off) or a number of heads, and 0 "
                       "with fused=True (one launch orders its programs itself)")
    elif variant.heads_per_chunk and max(cdiv(spec.kv_len, variant.block_n1), cdiv(spec.q_len, variant.block_m2)
                                         ) * spec.batch * spec.q_heads > MAX_GRID_X:
        reasons.append("heads_per_chunk: more programs than a 1-D grid holds: use heads_per_chunk=0")
    if variant.descriptors and (grad_out.data_ptr() % DESCRIPTOR_ALIGN or any(
            s * grad_out.element_size() % DESCRIPTOR_ALIGN for s in grad_out.stride()[:-1])):
        reasons.append(f"grad_out with strides {tuple(grad_out.stride())} cannot be read through a descriptor "
                       f"(base and strides must be {DESCRIPTOR_ALIGN}-byte aligned): use descriptors=False")
    return reasons


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _dkdv_inner(dk, dv, k, v, q_src, do_src, LSE2, DELTA, row0, stride_qm, stride_dom, lo, hi, idx_ptr, b, cols,
                Nq, Nk, kv_end, qk_scale, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb,
                kvdoc_ptr, stride_kdb, mask_row, stride_mm, stride_mn, D: tl.constexpr, DV: tl.constexpr,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, FROM_LIST: tl.constexpr, HAS_LO: tl.constexpr,
                HAS_HI: tl.constexpr, KP_ROW: tl.constexpr, HAS_DOC: tl.constexpr, MASK_BOOL: tl.constexpr,
                DESC: tl.constexpr, PREFETCH: tl.constexpr):
    """dK, dV of one key tile over query tiles of one query head: rows ``lo, lo + BLOCK_M, ..`` below ``hi``,
    or (``FROM_LIST``) the query tiles listed at ``idx_ptr[lo:hi]``."""
    offs_m = tl.arange(0, BLOCK_M)
    if FROM_LIST and PREFETCH:
        listed_next = tl.load(idx_ptr + lo, mask=lo < hi, other=0)
    for it in tl.range(lo, hi, 1 if FROM_LIST else BLOCK_M):
        if FROM_LIST and PREFETCH:
            m0 = listed_next * BLOCK_M
            listed_next = tl.load(idx_ptr + it + 1, mask=it + 1 < hi, other=0)
        elif FROM_LIST:
            m0 = tl.load(idx_ptr + it) * BLOCK_M
        else:
            m0 = it
        m0 = tl.multiple_of(m0, BLOCK_M)
        rows = m0 + offs_m
        # q/dO rows past Nq read as 0 and their lse2 as +inf: p = 0 there without a mask
        q = _load_rows(q_src, m0, offs_m, Nq, stride_qm, D, DESC, True)  # [BLOCK_M, D]
        lse2 = tl.load(LSE2 + row0 + rows, mask=rows < Nq, other=float("inf"))
        qk_t = _dot(k, tl.trans(q), None, "tf32")  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if MASKED:
            keep = _kept(rows[None, :], cols[:, None], b, Nq, Nk, kv_end, off, band_lo, band_hi, kp_ptr, stride_kpb,
                         qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb, mask_row, stride_mm, stride_mn, HAS_LO, HAS_HI,
                         KP_ROW, HAS_DOC, MASK_BOOL)
            p_t = tl.where(keep, p_t, 0.0)
        do = _load_rows(do_src, m0, offs_m, Nq, stride_dom, DV, DESC, True)  # [BLOCK_M, DV]
        dv = _dot(p_t.to(do.dtype), do, dv, "tf32")
        delta = tl.load(DELTA + row0 + rows, mask=rows < Nq, other=0.0)
        dp_t = _dot(v, tl.trans(do), None, "tf32")  # [BLOCK_N, BLOCK_M]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, "tf32")
    return dk, dv


@triton.jit
def _band_bwd_dkdv(
    Q, K, V, DO, DKEY, DVAL, LSE2, DELTA,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    Nq, Nk, H, GROUP, sm_scale, qk_scale, off, band_lo, band_hi,
    kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    part_cnt, part_idx, full_cnt, full_idx, full_run, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih,
    stride_im,
    D: tl.constexpr, DV: tl.constexpr, HEADS: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    KP_MODE: tl.constexpr, HAS_DOC: tl.constexpr, MASK: tl.constexpr, USE_MAP: tl.constexpr, RUN: tl.constexpr,
    SPLIT: tl.constexpr, DESC: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
):
    n_tile, slot = tile_order(tl.cdiv(Nk, BLOCK_N), CHUNK)  # key tile 0 first: a causal walk's heaviest
    _dkdv_program(
        n_tile, slot,
        Q, K, V, DO, DKEY, DVAL, LSE2, DELTA,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
        Nq, Nk, H, GROUP, sm_scale, qk_scale, off, band_lo, band_hi,
        kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
        mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
        part_cnt, part_idx, full_cnt, full_idx, full_run, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih,
        stride_im,
        D, DV, HEADS, HAS_LO, HAS_HI, KP_MODE, HAS_DOC, MASK, USE_MAP, RUN, SPLIT, DESC, PREFETCH, BLOCK_M, BLOCK_N,
    )


@triton.jit
def _dkdv_program(
    n_tile, bh,
    Q, K, V, DO, DKEY, DVAL, LSE2, DELTA,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    Nq, Nk, H, GROUP, sm_scale, qk_scale, off, band_lo, band_hi,
    kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    part_cnt, part_idx, full_cnt, full_idx, full_run, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih,
    stride_im,
    D: tl.constexpr, DV: tl.constexpr, HEADS: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    KP_MODE: tl.constexpr, HAS_DOC: tl.constexpr, MASK: tl.constexpr, USE_MAP: tl.constexpr, RUN: tl.constexpr,
    SPLIT: tl.constexpr, DESC: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of key tile ``n_tile`` of output head slot ``bh`` (batch * slots + slot)."""
    n0 = n_tile * BLOCK_N
    slots = H // HEADS  # output heads: kv heads when a program walks a group, else query heads
    b = (bh // slots).to(tl.int64)
    slot = bh % slots
    h0 = slot * HEADS  # first query head of the program
    kvh = h0 // GROUP
    offs_n = tl.arange(0, BLOCK_N)
    cols = n0 + offs_n
    k = _load_rows(K + b * stride_kb + kvh * stride_kh, n0, offs_n, Nk, stride_kn, D, False, True)  # [BLOCK_N, D]
    v = _load_rows(V + b * stride_vb + kvh * stride_vh, n0, offs_n, Nk, stride_vn, DV, False, True)  # [BLOCK_N, DV]
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV], dtype=tl.float32)
    kv_end = Nk
    if KP_MODE == 1:  # integer key lengths
        kv_end = tl.minimum(tl.load(kp_ptr + b).to(tl.int32), Nk)
    start, full_lo, full_hi, end = _q_tile_range(n0, Nk, Nq, off, band_lo, band_hi, BLOCK_M, BLOCK_N, HAS_LO, HAS_HI)
    if not SPLIT:
        full_lo = start
        full_hi = start
    for g in range(HEADS):
        h = h0 + g
        row0 = (b * H + h) * Nq
        mask_row = mask_ptr + b * stride_mb + h.to(tl.int64) * stride_mh
        q_src = Q + b * stride_qb + h * stride_qh
        do_src = DO + b * stride_dob + h * stride_doh
        if DESC:  # TMA loads; rows past Nq read as 0
            q_src = tl.make_tensor_descriptor(q_src, [Nq, D], [stride_qm, 1], [BLOCK_M, D])
            do_src = tl.make_tensor_descriptor(do_src, [Nq, DV], [stride_dom, 1], [BLOCK_M, DV])
        if USE_MAP:  # the key tile's row of the transposed tile map (block_map.TileLists): partial query tiles
            # listed, the first run of full ones as a range of rows, the full ones after it listed
            row = b * stride_cb + h * stride_ch + n_tile * stride_cm
            lists = b * stride_ib + h * stride_ih + n_tile * stride_im
            for part in tl.static_range(3):
                lo, hi = _map_part(part, row, lists, part_cnt, full_cnt, full_idx, full_run, BLOCK_M, RUN)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_src, do_src, LSE2, DELTA, row0, stride_qm, stride_dom, lo, hi,
                    (part_idx if part == 0 else full_idx) + lists,
                    b, cols, Nq, Nk, kv_end, qk_scale, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr,
                    stride_qdb, kvdoc_ptr, stride_kdb, mask_row, stride_mm, stride_mn, D, DV, BLOCK_M, part == 0,
                    part != 1, HAS_LO, HAS_HI, KP_MODE == 2, HAS_DOC, MASK == 3, DESC, PREFETCH)
        else:
            for part in tl.static_range(3):  # masked edge, visible middle, masked edge
                lo = start if part == 0 else (full_lo if part == 1 else full_hi)
                hi = full_lo if part == 0 else (full_hi if part == 1 else end)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_src, do_src, LSE2, DELTA, row0, stride_qm, stride_dom, lo, hi, part_idx, b,
                    cols, Nq, Nk, kv_end, qk_scale, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr,
                    stride_qdb, kvdoc_ptr, stride_kdb, mask_row, stride_mm, stride_mn, D, DV, BLOCK_M, part != 1,
                    False, HAS_LO, HAS_HI, False, False, False, DESC, False)
    ok = cols[:, None] < Nk
    out_k = DKEY + b * stride_dkb + slot * stride_dkh + cols[:, None] * stride_dkn + tl.arange(0, D)[None, :]
    tl.store(out_k, (dk * sm_scale).to(DKEY.dtype.element_ty), mask=ok)
    out_v = DVAL + b * stride_dvb + slot * stride_dvh + cols[:, None] * stride_dvn + tl.arange(0, DV)[None, :]
    tl.store(out_v, dv.to(DVAL.dtype.element_ty), mask=ok)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, lo, hi, idx_ptr, b, rows, Nq, Nk, kv_end,
              qk_scale, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
              mask_row, stride_mm, stride_mn, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, FROM_LIST: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
              KP_ROW: tl.constexpr, HAS_DOC: tl.constexpr, MASK_BOOL: tl.constexpr, DESC: tl.constexpr,
              PREFETCH: tl.constexpr):
    """dQ of one query tile over the key tiles ``lo, lo + BLOCK_N, ..`` below ``hi``, or (``FROM_LIST``) the key
    tiles listed at ``idx_ptr[lo:hi]``."""
    offs_n = tl.arange(0, BLOCK_N)
    if FROM_LIST and PREFETCH:
        listed_next = tl.load(idx_ptr + lo, mask=lo < hi, other=0)
    for it in tl.range(lo, hi, 1 if FROM_LIST else BLOCK_N):
        if FROM_LIST and PREFETCH:
            n0 = listed_next * BLOCK_N
            listed_next = tl.load(idx_ptr + it + 1, mask=it + 1 < hi, other=0)
        elif FROM_LIST:
            n0 = tl.load(idx_ptr + it) * BLOCK_N
        else:
            n0 = it
        n0 = tl.multiple_of(n0, BLOCK_N)
        k = _load_rows(k_src, n0, offs_n, Nk, stride_kn, D, DESC, MASKED)  # [BLOCK_N, D]
        qk = _dot(q, tl.trans(k), None, "tf32")  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            keep = _kept(rows[:, None], (n0 + offs_n)[None, :], b, Nq, Nk, kv_end, off, band_lo, band_hi, kp_ptr,
                         stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb, mask_row, stride_mm, stride_mn,
                         HAS_LO, HAS_HI, KP_ROW, HAS_DOC, MASK_BOOL)
            p = tl.where(keep, p, 0.0)
        v = _load_rows(v_src, n0, offs_n, Nk, stride_vn, DV, DESC, MASKED)  # [BLOCK_N, DV]
        dp = _dot(do, tl.trans(v), None, "tf32")  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, "tf32")
    return dq


@triton.jit
def _band_bwd_dq(
    Q, K, V, DO, DQ, LSE2, DELTA,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    Nq, Nk, H, GROUP, sm_scale, qk_scale, off, band_lo, band_hi,
    kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    part_cnt, part_idx, full_cnt, full_idx, full_run, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih,
    stride_im,
    D: tl.constexpr, DV: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    KP_MODE: tl.constexpr, HAS_DOC: tl.constexpr, MASK: tl.constexpr, USE_MAP: tl.constexpr, RUN: tl.constexpr,
    SPLIT: tl.constexpr, DESC: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid, bh = tile_order(tl.cdiv(Nq, BLOCK_M), CHUNK)  # _dq_program walks from the last (heaviest) query tile
    _dq_program(
        pid, bh,
        Q, K, V, DO, DQ, LSE2, DELTA,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
        Nq, Nk, H, GROUP, sm_scale, qk_scale, off, band_lo, band_hi,
        kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
        mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
        part_cnt, part_idx, full_cnt, full_idx, full_run, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih,
        stride_im,
        D, DV, HAS_LO, HAS_HI, KP_MODE, HAS_DOC, MASK, USE_MAP, RUN, SPLIT, DESC, PREFETCH, BLOCK_M, BLOCK_N,
    )


@triton.jit
def _dq_program(
    pid, bh,
    Q, K, V, DO, DQ, LSE2, DELTA,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    Nq, Nk, H, GROUP, sm_scale, qk_scale, off, band_lo, band_hi,
    kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    part_cnt, part_idx, full_cnt, full_idx, full_run, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih,
    stride_im,
    D: tl.constexpr, DV: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    KP_MODE: tl.constexpr, HAS_DOC: tl.constexpr, MASK: tl.constexpr, USE_MAP: tl.constexpr, RUN: tl.constexpr,
    SPLIT: tl.constexpr, DESC: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of the ``pid``-th query tile from the last (heavy, late causal tiles first: fewer idle SMs at the tail)
    of query head ``bh`` (batch * H + head)."""
    m_tile = tl.cdiv(Nq, BLOCK_M) - 1 - pid
    m0 = m_tile * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    rows = m0 + offs_m
    row0 = (b * H + h) * Nq
    mask_row = mask_ptr + b * stride_mb + h.to(tl.int64) * stride_mh
    q = _load_rows(Q + b * stride_qb + h * stride_qh, m0, offs_m, Nq, stride_qm, D, False, True)  # [BLOCK_M, D]
    do = _load_rows(DO + b * stride_dob + h * stride_doh, m0, offs_m, Nq, stride_dom, DV, False, True)
    lse2 = tl.load(LSE2 + row0 + rows, mask=rows < Nq, other=float("inf"))  # rows past Nq: p = 0
    delta = tl.load(DELTA + row0 + rows, mask=rows < Nq, other=0.0)
    k_src = K + b * stride_kb + kvh * stride_kh
    v_src = V + b * stride_vb + kvh * stride_vh
    if DESC:  # TMA loads; rows past Nk read as 0
        k_src = tl.make_tensor_descriptor(k_src, [Nk, D], [stride_kn, 1], [BLOCK_N, D])
        v_src = tl.make_tensor_descriptor(v_src, [Nk, DV], [stride_vn, 1], [BLOCK_N, DV])
    kv_end = Nk
    if KP_MODE == 1:  # integer key lengths
        kv_end = tl.minimum(tl.load(kp_ptr + b).to(tl.int32), Nk)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if USE_MAP:  # the query tile's row of the tile map: partial key tiles listed, the first run of full ones as a
        # range of columns, the full ones after it listed
        row = b * stride_cb + h * stride_ch + m_tile * stride_cm
        lists = b * stride_ib + h * stride_ih + m_tile * stride_im
        for part in tl.static_range(3):
            lo, hi = _map_part(part, row, lists, part_cnt, full_cnt, full_idx, full_run, BLOCK_N, RUN)
            dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, lo, hi,
                           (part_idx if part == 0 else full_idx) + lists, b, rows, Nq, Nk, kv_end, qk_scale, off,
                           band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
                           mask_row, stride_mm, stride_mn, D, DV, BLOCK_N, part == 0, part != 1, HAS_LO, HAS_HI,
                           KP_MODE == 2, HAS_DOC, MASK == 3, DESC, PREFETCH)
    else:
        start, full_lo, full_hi, end = _kv_tile_range(m0, Nk, off, band_lo, band_hi, BLOCK_M, BLOCK_N, HAS_LO,
                                                      HAS_HI)
        if not SPLIT:
            full_lo = start
            full_hi = start
        for part in tl.static_range(3):  # masked edge, visible middle, masked edge
            lo = start if part == 0 else (full_lo if part == 1 else full_hi)
            hi = full_lo if part == 0 else (full_hi if part == 1 else end)
            dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, lo, hi, part_idx, b, rows,
                           Nq, Nk, kv_end, qk_scale, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr,
                           stride_qdb, kvdoc_ptr, stride_kdb, mask_row, stride_mm, stride_mn, D, DV, BLOCK_N,
                           part != 1, False, HAS_LO, HAS_HI, False, False, False, DESC, False)
    out = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + tl.arange(0, D)[None, :]
    tl.store(out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=(rows < Nq)[:, None])


@triton.jit
def _band_bwd_fused(
    Q, K, V, DO, DQ, DKEY, DVAL, LSE2, DELTA,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    Nq, Nk, H, GROUP, sm_scale, qk_scale, off, band_lo, band_hi,
    kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    kv_part_cnt, kv_part_idx, kv_full_cnt, kv_full_idx, kv_full_run, kv_stride_cb, kv_stride_ch, kv_stride_cm,
    kv_stride_ib, kv_stride_ih, kv_stride_im,
    q_part_cnt, q_part_idx, q_full_cnt, q_full_idx, q_full_run, q_stride_cb, q_stride_ch, q_stride_cm,
    q_stride_ib, q_stride_ih, q_stride_im,
    kv_programs, kv_tiles, q_tiles,
    D: tl.constexpr, DV: tl.constexpr, HEADS: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
    KP_MODE: tl.constexpr, HAS_DOC: tl.constexpr, MASK: tl.constexpr, USE_MAP: tl.constexpr, RUN: tl.constexpr,
    SPLIT: tl.constexpr, DESC: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M1: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    """Both kernels in one grid: the first ``kv_programs`` programs are dK/dV programs (key tile fastest, so
    neighbours share a head's q and dO), the rest dQ programs; the dQ programs fill the SMs the dK/dV programs
    leave at their tail, with no launch between them."""
    pid = tl.program_id(0)
    if pid < kv_programs:
        _dkdv_program(
            pid % kv_tiles, pid // kv_tiles,
            Q, K, V, DO, DKEY, DVAL, LSE2, DELTA,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
            stride_dvn, Nq, Nk, H, GROUP, sm_scale, qk_scale, off, band_lo, band_hi,
            kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
            kv_part_cnt, kv_part_idx, kv_full_cnt, kv_full_idx, kv_full_run, kv_stride_cb, kv_stride_ch,
            kv_stride_cm, kv_stride_ib, kv_stride_ih, kv_stride_im,
            D, DV, HEADS, HAS_LO, HAS_HI, KP_MODE, HAS_DOC, MASK, USE_MAP, RUN, SPLIT, DESC, PREFETCH, BLOCK_M1,
            BLOCK_N1,
        )
    else:
        rest = pid - kv_programs
        _dq_program(
            rest % q_tiles, rest // q_tiles,
            Q, K, V, DO, DQ, LSE2, DELTA,
            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
            stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
            Nq, Nk, H, GROUP, sm_scale, qk_scale, off, band_lo, band_hi,
            kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
            mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
            q_part_cnt, q_part_idx, q_full_cnt, q_full_idx, q_full_run, q_stride_cb, q_stride_ch, q_stride_cm,
            q_stride_ib, q_stride_ih, q_stride_im,
            D, DV, HAS_LO, HAS_HI, KP_MODE, HAS_DOC, MASK, USE_MAP, RUN, SPLIT, DESC, PREFETCH, BLOCK_M2, BLOCK_N2,
        )


# ----------------------------------------------------------------------------- launcher
def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, spec: AttentionSpec, *, variant: Variant | dict
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` shaped and typed as q, k, v, for q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D/Dv]``,
    out and grad_out ``[B, Hq, Nq, Dv]`` in any strides, and ``lse [B, Hq, Nq]`` float32 (natural log,
    ``-inf`` on rows with no visible key) as ``triton_flash``'s forward returns them.

    Raises ValueError listing every reason when the spec or the variant cannot run here
    (``unsupported_reasons``)."""
    variant = _as_variant(variant)
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    reasons = unsupported_reasons(grad_out, q, k, v, spec, variant)
    if reasons:
        raise ValueError(f"{variant.name} cannot run this spec: " + "; ".join(reasons))
    return run_backward(grad_out, q, k, v, out, lse, spec, variant)


#: the measured fastest variant by (head dim, causal), for ``triton_flash``'s backward: H200, bf16, B*N = 16k,
#: N 4k and 16k, forward + backward (benchmarks/results/backward_sweep.md). 128: kv64x128 q128x64 w8 s3
#: everywhere (0.72-0.79x cuDNN, 0.98-1.03x Flex; triton_flash's own backward 0.53-0.70x cuDNN); 64 causal:
#: kv64x128 q64x128 w4 s3 (1.08-1.10x Flex); 64 without a band: kv64x64 q64x64 w4 s3 (1.07-1.13x Flex)
MEASURED_VARIANTS = {
    (128, True): Variant(),
    (128, False): Variant(),
    (64, True): Variant(block_m1=64, block_n1=128, block_m2=64, block_n2=128, num_warps=4),
    (64, False): Variant(block_m1=64, block_n1=64, block_m2=64, block_n2=64, num_warps=4),
}

#: what key padding and documents (as tile lists) change in their band's measured variant, by head dim: measured
#: at 128 only (D 64 keeps its band's variant until measured)
LISTED = {128: dict(full_run=False, prefetch=True, fused=True)}


#: ``heads_per_chunk`` of a causal row by head dim (the forward's ``one_sided``), H200, bf16, 16k tokens,
#: forward + backward (benchmarks/results/backward_sweep.md): D 128 N 4k 2.700 -> 2.592 ms (0.99x -> 1.03x Flex;
#: 8 and 16 heads 2.62 ms), GQA 32/8 5.369 -> 5.074 ms (1.02x -> 1.08x), single timings (the forward's interleaved
#: A/B read 2% where its sweep read 5-10%: chunk_ab.md); kernels.py at 6ca1929: D 128 N 4k causal 1.00x Flex, from
#: 0.97x. A window of 1024 at 8k: no change (its tiles do equal work), so windows keep the grid's order; D 64 is not
#: measured
CAUSAL_HEADS_PER_CHUNK = {128: 4}


def measured_variant(spec: AttentionSpec) -> Variant | None:
    """The measured variant for this spec, or None where none was measured: head dims 64 and 128,
    float16/bfloat16; other head dims and float32 are not measured yet. Windows (causal or two-sided), key
    padding, documents and a boolean mask take their band's variant: the same loops over a narrower tile range
    or over listed tiles (window 1024 at 8k/32k, forward + backward: 1.33x/1.31x the general backward's speed,
    from 0.73x to 0.98x Flex; the same window as a dense boolean mask from 0.73x to 0.86-0.88x Flex;
    ``benchmarks/results/kernels.md``). Tile lists walk a row's first run of full tiles as a range (``full_run``):
    faster than the lists alone in every tile-list case, forward + backward (documents 4-64, key padding, window +
    documents, a dense mask; ``benchmarks/results/tile_lists.md``). That was before ``prefetch`` and ``fused``:
    with them, documents and key padding at D 128 take the lists alone (``LISTED``: documents 4/16/64 at 16k, forward +
    backward 1.03x/1.00x/1.00x Flex, from 0.98x/0.95x/0.94x; key padding 1.09x from 1.01x;
    ``benchmarks/results/backward_sweep_documents.md``, ``kernels.md``). A dense boolean mask keeps the full run in
    two launches: the window 1024 at 8k as a boolean mask fell from 0.94x to 0.76x Flex with ``LISTED``."""
    if spec.dtype not in (torch.float16, torch.bfloat16) or spec.v_head_dim != spec.head_dim:
        return None
    variant = MEASURED_VARIANTS.get((spec.head_dim, spec.causal))
    if variant is not None and spec.head_dim in LISTED and listed(spec) and listed_kind(spec) != "mask":
        return dataclasses.replace(variant, **LISTED[spec.head_dim])
    if variant is not None and spec.head_dim in CAUSAL_HEADS_PER_CHUNK and one_sided(spec):
        return dataclasses.replace(variant, heads_per_chunk=CAUSAL_HEADS_PER_CHUNK[spec.head_dim])
    return variant


def run_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, spec: AttentionSpec, variant: Variant
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``backward`` on inputs its caller has already checked (``unsupported_reasons`` empty, last dims
    contiguous)."""
    b, hq, hkv, nq, nk = spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len
    if nq == 0 or nk == 0 or b * hq == 0:
        grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
        return _with_empty_rows(grads, q, k, v, grad_out, lse, spec)[:3]
    lse = lse.float().contiguous()
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    _launch(
        _attn_bwd_preprocess, (cdiv(nq, PRE_BLOCK), b * hq),
        out, grad_out, lse, delta, lse2, *out.stride()[:3], *grad_out.stride()[:3], nq, hq,
        DV=spec.v_head_dim, BLOCK_DV=_block(spec.v_head_dim), BLOCK_M=PRE_BLOCK,
    )
    if variant.descriptors and q.is_cuda:
        use_scratch_allocator()
    lo, hi = spec.band()
    band = dict(Nq=nq, Nk=nk, H=hq, GROUP=spec.group_size, sm_scale=spec.scale,
                qk_scale=spec.scale * LOG2E.value, off=spec.diagonal_offset, band_lo=0 if lo is None else lo,
                band_hi=0 if hi is None else hi, D=spec.head_dim, DV=spec.v_head_dim, HAS_LO=lo is not None,
                HAS_HI=hi is not None, SPLIT=variant.split, RUN=variant.full_run, DESC=variant.descriptors,
                PREFETCH=variant.prefetch,
                num_warps=variant.num_warps, num_stages=variant.num_stages)
    band.update(zip(LISTED_TERM_ARGS, listed_term_values(spec, q.dtype, q)))
    # key padding, documents, a boolean mask: tile lists at each kernel's own tiles (cached per term tensors
    # across layers)
    use_map = listed(spec)
    kv_lists = tile_lists(spec, variant.block_m1, variant.block_n1, transposed=True) if use_map else None
    q_lists = tile_lists(spec, variant.block_m2, variant.block_n2) if use_map else None
    heads = spec.group_size if variant.gqa_in_program else 1
    if heads == spec.group_size:  # one program per kv head: dK/dV written in place
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:  # one program per query head: float32 [B, Hq, Nk, D] summed over each group below
        dk = k.new_empty((b, hq, nk, spec.head_dim), dtype=torch.float32)
        dv = v.new_empty((b, hq, nk, spec.v_head_dim), dtype=torch.float32)
    dq = torch.empty_like(q)
    kv_tiles, q_tiles = cdiv(nk, variant.block_n1), cdiv(nq, variant.block_m2)
    if variant.fused:
        kv_programs = kv_tiles * (b * hq // heads)
        _launch(
            _band_bwd_fused, (kv_programs + q_tiles * b * hq,),
            q, k, v, grad_out, dq, dk, dv, lse2, delta, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *grad_out.stride()[:3], *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], **band,
            **{f"kv_{key}": value for key, value in list_args(kv_lists, lse).items() if key != "USE_MAP"},
            **{f"q_{key}": value for key, value in list_args(q_lists, lse).items() if key != "USE_MAP"},
            USE_MAP=use_map, kv_programs=kv_programs, kv_tiles=kv_tiles, q_tiles=q_tiles, HEADS=heads,
            BLOCK_M1=variant.block_m1, BLOCK_N1=variant.block_n1, BLOCK_M2=variant.block_m2,
            BLOCK_N2=variant.block_n2,
        )
    else:
        chunk = variant.heads_per_chunk
        _launch(
            _band_bwd_dkdv, (kv_tiles * (b * hq // heads),) if chunk else (kv_tiles, b * hq // heads),
            q, k, v, grad_out, dk, dv, lse2, delta, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *grad_out.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], **band, **list_args(kv_lists, lse),
            HEADS=heads, BLOCK_M=variant.block_m1, BLOCK_N=variant.block_n1, CHUNK=chunk,
        )
        _launch(
            _band_bwd_dq, (q_tiles * b * hq,) if chunk else (q_tiles, b * hq),
            q, k, v, grad_out, dq, lse2, delta, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *grad_out.stride()[:3], *dq.stride()[:3], **band, **list_args(q_lists, lse),
            BLOCK_M=variant.block_m2, BLOCK_N=variant.block_n2, CHUNK=chunk,
        )
    if heads != spec.group_size:
        dk, dv = sum_groups(dk, hkv).to(k.dtype), sum_groups(dv, hkv).to(v.dtype)
    return _with_empty_rows((dq, dk, dv), q, k, v, grad_out, lse, spec)[:3]

