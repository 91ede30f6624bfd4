"""An experimental Hopper forward for band specs (no term, causal, window, GQA), with its variants as switches.

Not registered as a kernel of its own: ``benchmarks/forward_sweep.py`` checks and times every variant
against ``triton_flash`` and the peers, and ``triton_flash``'s forward runs the variants measured faster
(``measured_variant``: band specs at head dims 64 and 128 in half precision on the GPU they were measured
on).

Key padding (lengths or a boolean row), documents and a dense boolean mask on top of the band walk tile lists
(``block_map.tile_lists`` at the kernel's tiles) instead of the band's tile range, as the band backward does:
the partial tiles with the mask arithmetic (``triton_flash_fwd._kept``: the band, the key padding, the
documents, the mask's elements), the full tiles without it, the empty ones never. A row's first run of
consecutive full tiles (all of them in a band-like row: a window, a causal row, a document's block) is walked
as a range of columns, whose loads the compiler pipelines as in band mode; through a list it cannot (the next
tile's address waits on a load).

Same algorithm and result as ``triton_flash_fwd.py`` in band mode (FlashAttention-2, scores in log2
units, ``(out, lse)`` with ``out = 0, lse = -inf`` on rows that see no key, then ``spec.fill``); what a
``Variant`` changes is how the tiles move:

* ``descriptors``: K and V (and Q and O when a program holds one head) are read through device-side
  tensor descriptors (``tl.make_tensor_descriptor``: TMA loads on Hopper, rows past the end read as 0,
  stores clipped). Each program builds its own, so any ``[B, H, N, D]`` strides with a contiguous last
  dim work (HF's transposed views of ``[B, N, H, D]``), given 16-byte aligned bases and strides. Triton
  writes the descriptors to a global scratch buffer it asks ``triton.set_allocator``'s function for.
  Off: pointer loads, masked only on the band's edge tiles.
* ``warp_specialize``: the kv loops are ``tl.range(..., warp_specialize=True)``: producer warps issue
  the loads while consumer warps compute. On Hopper Triton does this only for descriptor loads and at
  least 4 warps.
* ``pack_gqa``: one program holds the ``G = Hq / Hkv`` query heads of a kv head for ``BLOCK_M / G``
  query positions; its ``BLOCK_M`` rows are (position, head) pairs, position-major::

      row r  ->  position m0 + r // G,  query head h0 + r % G

  so each K/V tile is read once per group instead of once per query head. ``G`` must be a power of two
  that divides ``BLOCK_M``, and with tile lists the group's heads must share them (no mask per head).
* ``full_run`` (tile lists only): a row's first run of consecutive full tiles is walked as a range of
  columns, the rest of its full tiles through the list. Off: every full tile through the list.
* ``lazy_rescale``: on fully visible tiles, a row's running maximum ``m`` (and with it ``acc`` and ``l``) is
  moved only when some row of the program has grown by more than ``RESCALE_SLACK`` (8, in log2 units) since
  it last moved, so most tiles skip the ``acc * alpha`` rescale; ``p = exp2(s - m)`` then stays below 2^8
  (FlashAttention-4's conditional rescaling). The result is the same up to rounding: ``acc`` and ``l`` are
  always relative to the ``m`` they were built at, and ``lse = m + log2 l`` holds for any such ``m``. Measured
  5-17% slower on an H200 (``benchmarks/results/forward_sweep_lazy.md``): the branch's condition is a reduction
  across the program's warps on every tile, dearer than the multiply it skips. In no measured table.
* ``heads_per_chunk``: the order in which the query tiles start. Off (0): a grid of (query tile, head), so the
  tiles of head 0 start (heaviest first), then those of head 1, ..: on a causal row the heavy tiles of the last
  heads start last and run alone at the tail. On (``C``): a 1-D grid walked ``C`` heads at a time, the heaviest
  tile of each of them, then the next heaviest of each, .. (``tile_order``): the programs at the tail are the
  light ones, and the heads running at once stay few enough that their K/V stay in L2.
* ``block_m``, ``block_n``, ``num_warps``, ``num_stages``: the tile shape and launch configuration.

Per kv tile (``s`` in log2 units, ``qk_scale = scale * log2(e)`` folded into one multiply)::

    s = qk_scale * q @ k^T            (-inf outside the band, on edge tiles only)
    m_new = max(m, rowmax(s));  p = exp2(s - m_new);  alpha = exp2(m - m_new)
    acc = acc * alpha + p @ v
    l = l * alpha + rowsum(p);  m = m_new          (after the second dot: fewer live registers across it)

The kv tiles of a query tile are split as in ``triton_flash_fwd._kv_tile_range``: a masked leading edge,
a fully visible middle without mask arithmetic, a masked trailing edge.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import triton
import triton.language as tl

from .block_map import TileLists, tile_lists
from .spec import AttentionSpec
from .launch import cdiv
from .launch import launch as _launch
from .fills import fill_empty_rows, known_empty_rows
from .layout import strides_in_layout_of
from .term_cache import Interned, LastCall
from .triton_flash import MAP_ARGS, MAX_GRID_Y, _interpreting, _last_dim_contiguous, listed_term_values, map_values
from .triton_flash_fwd import LN2, LOG2E, _dot, _kept, _kv_tile_range

#: what this Triton offers (written for 3.6; each feature has a path without it)
HAS_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
HAS_WARP_SPECIALIZE = "warp_specialize" in inspect.signature(tl.range.__init__).parameters
DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 128, 256)
#: a descriptor's base address and every stride but the last must be multiples of 16 bytes (TMA)
DESCRIPTOR_ALIGN = 16
#: log2 units by which a row's running maximum may lag its true maximum in a ``lazy_rescale`` variant (p <= 2^8)
RESCALE_SLACK = tl.constexpr(8.0)
#: programs a 1-D grid may hold (CUDA's limit on its first dim)
MAX_GRID_X = 2**31 - 1


def listed(spec: AttentionSpec) -> bool:
    """Whether the spec has terms the band kernels walk as tile lists: key padding (lengths or a boolean row),
    documents, a dense boolean mask."""
    return spec.key_padding is not None or spec.q_doc is not None or (
        spec.mask is not None and spec.mask.dtype == torch.bool)


def other_terms(spec: AttentionSpec) -> list[str]:
    """The spec's terms the band kernels cannot run: all but a band (causal, window) and the ``listed`` ones (an
    additive mask, a bias, softcap). Read off the spec without building another (this runs on every call)."""
    bool_mask = spec.mask is not None and spec.mask.dtype == torch.bool
    return [t for t in spec.mask_terms
            if t not in ("causal", "window", "key_padding", "document") and not (t == "dense" and bool_mask)]


def per_head_lists(spec: AttentionSpec) -> bool:
    """Whether the spec's tile lists differ between query heads (a dense mask with a head dim)."""
    return spec.mask is not None and spec.mask.dim() >= 3 and spec.mask.shape[-3] > 1


def list_args(lists: TileLists | None, dummy: torch.Tensor) -> dict:
    """``triton_flash``'s tile-list arguments, less its map granularity, with the full runs: the band kernels'
    lists are at their own tiles."""
    return dict(zip(LIST_ARGS, list_values(lists, dummy)), USE_MAP=lists is not None)


#: names of ``list_values``' values, in order: the band kernels' tile-list arguments
LIST_ARGS = (*MAP_ARGS[:4], "full_run", *MAP_ARGS[4:])


def list_values(lists: TileLists | None, dummy: torch.Tensor) -> tuple:
    """The band kernels' tile-list arguments (``LIST_ARGS``); ``dummy`` stands in for them where there are none."""
    values = map_values(lists, dummy)
    return (*values[:4], dummy if lists is None else lists.full_run, *values[4:])


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run the kernel; see the module docs for what each switch does."""

    descriptors: bool = False
    warp_specialize: bool = False
    pack_gqa: bool = False
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    full_run: bool = True
    lazy_rescale: bool = False
    heads_per_chunk: int = 0

    @property
    def name(self) -> str:
        parts = ["desc" if self.descriptors else "ptr"]
        if self.warp_specialize:
            parts.append("ws")
        if self.pack_gqa:
            parts.append("pack")
        if not self.full_run:
            parts.append("lists")
        if self.lazy_rescale:
            parts.append("lazy")
        if self.heads_per_chunk:
            parts.append(f"chunk{self.heads_per_chunk}")
        return "+".join(parts) + f" {self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


def as_variant(variant: Variant | dict) -> Variant:
    """A ``Variant`` from itself or from a dict of its fields."""
    if isinstance(variant, Variant):
        return variant
    if not isinstance(variant, dict):
        raise TypeError(f"variant must be a Variant or a dict of its fields, got {type(variant).__name__}")
    fields = {f.name for f in dataclasses.fields(Variant)}
    unknown = sorted(set(variant) - fields)
    if unknown:
        raise TypeError(f"variant keys {unknown} are not Variant fields: use some of {sorted(fields)}")
    return Variant(**variant)


def candidate_variants(head_dim: int, group_size: int = 1,
                       tiles: list[tuple[int, int, int, int]] | None = None, lazy: bool = False,
                       chunks: tuple[int, ...] = (0,)) -> list[Variant]:
    """The variants the sweep and the GPU tests run: each switch on and off (packing only for GQA; the lazy
    rescale with ``lazy``; each order of ``chunks``, ``heads_per_chunk`` values) over ``tiles`` ``(block_m, block_n, num_warps, num_stages)``, by default the ones for
    ``head_dim`` on a
    Hopper SM: 8 warps only on 128-row tiles, so each warp group still owns 64 rows (one wgmma's
    height). Among them are FlexAttention's H100 defaults (128x128, 4 warps at D = 64; 128x64, 8 warps
    at D = 128) and the best tiles of ``triton_flash`` in ``benchmarks/results/kernel_configs.md``."""
    if tiles is None and head_dim <= 64:
        tiles = [(128, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)]
    elif tiles is None:
        tiles = [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3)]
    out = []
    for bm, bn, w, s in tiles:
        for rescale in (False, True) if lazy else (False,):
            for chunk in chunks:
                out.append(Variant(False, False, False, bm, bn, w, s, lazy_rescale=rescale, heads_per_chunk=chunk))
                if HAS_DESCRIPTORS:
                    out.append(Variant(True, False, False, bm, bn, w, s, lazy_rescale=rescale,
                                       heads_per_chunk=chunk))
    if group_size > 1 and not group_size & (group_size - 1):
        # descriptors with packed heads on 128x128 tiles, 8 warps, 2 stages crash ptxas (-11, triton 3.6, sm_90)
        out += [dataclasses.replace(v, pack_gqa=True) for v in out if v.block_m % group_size == 0
                and not (v.descriptors and (v.block_m, v.block_n, v.num_warps, v.num_stages) == (128, 128, 8, 2))]
    return out


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                        variant: Variant) -> list[str]:
    """Every reason ``forward`` cannot run ``variant`` on these inputs; empty when it can."""
    return spec_reasons(spec, variant) + tensor_reasons(q, k, v, variant)


def spec_reasons(spec: AttentionSpec, variant: Variant) -> list[str]:
    """The reasons ``unsupported_reasons`` finds in the spec and the variant alone: the same for every call of one
    call plan (its shapes, dtypes and kinds of terms)."""
    reasons = []
    if spec.device.type != "cuda" and not _interpreting():
        reasons.append("needs a CUDA device (or TRITON_INTERPRET=1 for testing)")
    others = other_terms(spec)
    if others or spec.dropout_p > 0.0:
        reasons.append(f"terms {others + (['dropout'] if spec.dropout_p > 0 else [])} not supported: this "
                       "forward runs a band (causal, window) and key padding, documents or a boolean mask as tile "
                       "lists; use triton_flash")
    if spec.dtype not in DTYPES:
        reasons.append(f"dtype {spec.dtype} not supported: float16 or bfloat16")
    for name, d in (("head_dim", spec.head_dim), ("v_head_dim", spec.v_head_dim)):
        if d not in HEAD_DIMS:
            reasons.append(f"{name}={d} not supported: one of {HEAD_DIMS}")
    if not spec.scale > 0:
        reasons.append(f"scale={spec.scale} not supported: the row maximum is taken before scaling, so it "
                       "must be positive")
    for name, size in (("block_m", variant.block_m), ("block_n", variant.block_n)):
        if size < 16 or size & (size - 1):
            reasons.append(f"{name}={size} must be a power of two >= 16 (tl.dot tiles)")
    if variant.num_warps not in (1, 2, 4, 8, 16):
        reasons.append(f"num_warps={variant.num_warps} must be a power of two up to 16")
    if variant.num_stages < 1:
        reasons.append(f"num_stages={variant.num_stages} must be at least 1")
    group = spec.group_size
    if variant.pack_gqa and group > 1 and (group & (group - 1) or variant.block_m % group):
        reasons.append(f"pack_gqa needs the group size ({group} query heads per kv head) to be a power of two "
                       f"dividing block_m={variant.block_m}: use pack_gqa=False")
    if variant.pack_gqa and group > 1 and per_head_lists(spec):
        reasons.append("pack_gqa needs tile lists shared by the query heads of a group, and this mask differs per "
                       "head: use pack_gqa=False")
    pack = group if variant.pack_gqa else 1
    if variant.heads_per_chunk < 0:
        reasons.append(f"heads_per_chunk={variant.heads_per_chunk} must be 0 (off) or a number of heads")
    elif variant.heads_per_chunk:
        programs = cdiv(spec.q_len, variant.block_m // pack) * (spec.batch * spec.q_heads // pack)
        if programs > MAX_GRID_X:
            reasons.append(f"heads_per_chunk: {programs} programs exceed the 1-D grid limit {MAX_GRID_X}: use "
                           "heads_per_chunk=0")
    elif spec.batch * spec.q_heads // pack > MAX_GRID_Y:
        reasons.append(f"batch * q_heads / packed heads = {spec.batch * spec.q_heads // pack} exceeds the grid "
                       f"limit {MAX_GRID_Y}")
    if variant.warp_specialize:
        if spec.device.type == "cuda":
            # measured on an H200 (triton 3.6): every warp-specialized variant of this kernel stops in
            # Triton's pass manager ("PassManager::run failed"): it compiles kernels of one loop only, and there
            # gives wrong results with per-head descriptors (benchmarks/results/forward_schedule.md); the
            # interpreter ignores the switch
            reasons.append("warp_specialize: this kernel does not compile with it (triton's pass manager fails on "
                           "sm_90 with triton 3.6): use warp_specialize=False")
        if not HAS_WARP_SPECIALIZE:
            reasons.append(f"warp_specialize needs tl.range(warp_specialize=...), not in triton {triton.__version__}")
        if not variant.descriptors:
            reasons.append("warp_specialize needs descriptors=True (Hopper specializes descriptor loads only)")
        if variant.num_warps < 4:
            reasons.append(f"warp_specialize needs num_warps >= 4, got {variant.num_warps}")
    if variant.descriptors and not HAS_DESCRIPTORS:
        reasons.append(f"descriptors need tl.make_tensor_descriptor and triton.set_allocator, not in triton "
                       f"{triton.__version__}")
    return reasons


def tensor_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: Variant) -> list[str]:
    """The reasons ``unsupported_reasons`` finds in the tensors of one call: their addresses and strides, which a
    variant reading them through descriptors needs aligned."""
    reasons = []
    if variant.descriptors and HAS_DESCRIPTORS:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(-1) != 1 or t.data_ptr() % DESCRIPTOR_ALIGN or any(
                    s * t.element_size() % DESCRIPTOR_ALIGN for s in t.stride()[:-1]):
                reasons.append(f"{name} with strides {tuple(t.stride())} at address {t.data_ptr():#x} cannot be "
                               f"read through a descriptor (base and strides must be {DESCRIPTOR_ALIGN}-byte "
                               "aligned, last dim contiguous): use descriptors=False or a contiguous copy")
    return reasons


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _load_rows(src, n0, rows, n_rows, stride, COLS: tl.constexpr, DESC: tl.constexpr, MASKED: tl.constexpr):
    """Rows ``n0 + rows`` of one head's ``[n_rows, COLS]`` matrix: a descriptor block (0 past the end) or a
    pointer load masked on edge tiles only."""
    # one return at the end: the compiler still generates code after a return in a constexpr branch (the
    # interpreter does not), and pointer arithmetic on a descriptor does not compile
    if DESC:
        block = src.load([n0, 0])
    else:
        ptrs = src + (n0 + rows)[:, None] * stride + tl.arange(0, COLS)[None, :]
        if MASKED:
            block = tl.load(ptrs, mask=(n0 + rows)[:, None] < n_rows, other=0.0)
        else:
            block = tl.load(ptrs)
    return block


@triton.jit
def tile_order(n_tiles, CHUNK: tl.constexpr):
    """``(tile, head slot)`` of this program: the grid's own ``(program_id(0), program_id(1))`` with ``CHUNK``
    0; else, on a 1-D grid of ``n_tiles`` times the head slots, tile 0 of ``CHUNK`` head slots in turn, then their
    tile 1, .., then the next ``CHUNK`` (fewer in the last chunk). Tile 0 is the heaviest one of a causal walk
    (the caller orders them)."""
    if CHUNK == 0:
        tile = tl.program_id(0)
        slot = tl.program_id(1)
    else:
        pid = tl.program_id(0)
        slots = tl.num_programs(0) // n_tiles
        chunk = pid // (CHUNK * n_tiles)
        within = pid - chunk * (CHUNK * n_tiles)
        heads = tl.minimum(slots - chunk * CHUNK, CHUNK)
        tile = within // heads
        slot = chunk * CHUNK + within % heads
    return tile, slot


@triton.jit
def _map_part(part: tl.constexpr, row, lists, part_cnt, full_cnt, full_idx, full_run, BLOCK: tl.constexpr,
              RUN: tl.constexpr):
    """``(lo, hi)`` of part ``part`` of a tile-map row (``block_map.TileLists``): 0, the partial tiles' list
    entries; 1, the row's first run of consecutive full tiles as positions (a plain range, step ``BLOCK``); 2, the
    list entries of the full tiles after that run (none in a band-like row). Without ``RUN`` (a variant's
    ``full_run`` off) part 1 is empty and part 2 lists every full tile."""
    run = tl.load(full_run + row) if RUN else 0
    first = tl.load(full_idx + lists, mask=run > 0, other=0) * BLOCK if RUN else 0
    lo = 0 if part == 0 else (first if part == 1 else run)
    hi = tl.load(part_cnt + row) if part == 0 else (first + run * BLOCK if part == 1 else tl.load(full_cnt + row))
    return lo, hi


@triton.jit
def _band_inner(
    acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, lo, hi, idx_ptr, pos, b, Nq, Nk, kv_end, qk_scale, off,
    band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb, mask_row, stride_mm, stride_mn,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, FROM_LIST: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, KP_ROW: tl.constexpr, HAS_DOC: tl.constexpr,
    MASK_BOOL: tl.constexpr, DESC: tl.constexpr, WARP_SPEC: tl.constexpr, LAZY: tl.constexpr,
):
    """Online softmax over the kv tiles starting at ``lo, lo + BLOCK_N, ..`` below ``hi``, or (``FROM_LIST``) the
    kv tiles listed at ``idx_ptr[lo:hi]``."""
    offs_n = tl.arange(0, BLOCK_N)
    for it in tl.range(lo, hi, 1 if FROM_LIST else BLOCK_N, warp_specialize=WARP_SPEC):
        if FROM_LIST:
            n0 = tl.load(idx_ptr + it) * BLOCK_N
        else:
            n0 = it
        n0 = tl.multiple_of(n0, BLOCK_N)
        k = _load_rows(k_src, n0, offs_n, Nk, stride_kn, D, DESC, MASKED)  # [BLOCK_N, D]
        qk = _dot(q, tl.trans(k), None, "tf32")  # [BLOCK_M, BLOCK_N]
        if MASKED:
            keep = _kept(pos[:, None], (n0 + offs_n)[None, :], b, Nq, Nk, kv_end, off, band_lo, band_hi, kp_ptr,
                         stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb, mask_row, stride_mm, stride_mn,
                         HAS_LO, HAS_HI, KP_ROW, HAS_DOC, MASK_BOOL)
            s = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with nothing visible so far has m = -inf: subtract 0 instead, so exp2 gives 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        elif LAZY:
            # the running maximum moves only when some row's grew by more than RESCALE_SLACK: p stays below
            # 2^RESCALE_SLACK, and most tiles skip the rescale of acc and l (a branch uniform over the program)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if tl.max(m_new - m_i, 0) > RESCALE_SLACK:  # m = -inf (no key yet) counts as grown
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            p = tl.math.exp2(qk * qk_scale - m_i[:, None])
        else:
            # every score is finite; scale > 0, so the row maximum can be scaled after the reduction
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        l_ij = tl.sum(p, 1)
        if LAZY and not MASKED:
            v = _load_rows(v_src, n0, offs_n, Nk, stride_vn, DV, DESC, MASKED)  # [BLOCK_N, DV]
            acc = _dot(p.to(v.dtype), v, acc, "tf32")
            l_i = l_i + l_ij
        else:
            alpha = tl.math.exp2(m_i - m_use)
            acc = acc * alpha[:, None]
            v = _load_rows(v_src, n0, offs_n, Nk, stride_vn, DV, DESC, MASKED)  # [BLOCK_N, DV]
            acc = _dot(p.to(v.dtype), v, acc, "tf32")
            l_i = l_i * alpha + l_ij
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _band_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    Nq, Nk, H, GROUP, qk_scale, off, band_lo, band_hi,
    kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    part_cnt, part_idx, full_cnt, full_idx, full_run, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih,
    stride_im,
    D: tl.constexpr, DV: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, KP_MODE: tl.constexpr,
    HAS_DOC: tl.constexpr, MASK: tl.constexpr, USE_MAP: tl.constexpr, RUN: tl.constexpr, PACK: tl.constexpr,
    DESC: tl.constexpr, WARP_SPEC: tl.constexpr, LAZY: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // PACK  # query positions per program
    # heavy (late, causal) query tiles first: fewer idle SMs at the tail
    n_tiles = tl.cdiv(Nq, BLOCK_Q)
    tile, slot = tile_order(n_tiles, CHUNK)
    pid_m = n_tiles - 1 - tile
    slots = H // PACK
    b = (slot // slots).to(tl.int64)
    h0 = (slot % slots) * PACK  # first query head of the program
    kvh = h0 // GROUP
    m0 = pid_m * BLOCK_Q
    rows = tl.arange(0, BLOCK_M)
    pos = m0 + rows // PACK  # [BLOCK_M] query position of each row
    head = h0 + rows % PACK  # [BLOCK_M] query head of each row
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    row_ok = pos < Nq

    if DESC and PACK == 1:
        q_desc = tl.make_tensor_descriptor(Q + b * stride_qb + h0 * stride_qh, [Nq, D], [stride_qm, 1], [BLOCK_M, D])
        q = q_desc.load([m0, 0])  # [BLOCK_M, D]
    else:
        q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + pos[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    k_head = K + b * stride_kb + kvh * stride_kh
    v_head = V + b * stride_vb + kvh * stride_vh
    if DESC:
        k_src = tl.make_tensor_descriptor(k_head, [Nk, D], [stride_kn, 1], [BLOCK_N, D])
        v_src = tl.make_tensor_descriptor(v_head, [Nk, DV], [stride_vn, 1], [BLOCK_N, DV])
    else:
        k_src = k_head
        v_src = v_head

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    kv_end = Nk
    if KP_MODE == 1:  # integer key lengths
        kv_end = tl.minimum(tl.load(kp_ptr + b).to(tl.int32), Nk)
    # the mask of this batch row and first head: a mask with a head dim is never packed (per_head_lists)
    mask_row = mask_ptr + b * stride_mb + h0.to(tl.int64) * stride_mh
    if USE_MAP:
        # the query tile's row of the tile map: its partial kv tiles through the list, with the mask arithmetic;
        # the run of consecutive full tiles from the first as a range of columns (loads pipelined as in the band's
        # middle); the full tiles after that run (none in a band-like row) through the list
        row = b * stride_cb + h0 * stride_ch + pid_m * stride_cm
        lists = b * stride_ib + h0 * stride_ih + pid_m * stride_im
        for part in tl.static_range(3):
            lo, hi = _map_part(part, row, lists, part_cnt, full_cnt, full_idx, full_run, BLOCK_N, RUN)
            acc, l_i, m_i = _band_inner(
                acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, lo, hi,
                (part_idx if part == 0 else full_idx) + lists, pos, b, Nq, Nk, kv_end, qk_scale, off, band_lo,
                band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb, mask_row, stride_mm,
                stride_mn, D, DV, BLOCK_N, part == 0, part != 1, HAS_LO, HAS_HI, KP_MODE == 2, HAS_DOC, MASK == 3,
                DESC, WARP_SPEC, LAZY)
    else:
        start, full_lo, full_hi, end = _kv_tile_range(m0, kv_end, off, band_lo, band_hi, BLOCK_Q, BLOCK_N, HAS_LO,
                                                      HAS_HI)
        for part in tl.static_range(3):  # masked edge, visible middle, masked edge
            lo = start if part == 0 else (full_lo if part == 1 else full_hi)
            hi = full_lo if part == 0 else (full_hi if part == 1 else end)
            acc, l_i, m_i = _band_inner(
                acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, lo, hi, part_cnt, pos, b, Nq, Nk, kv_end,
                qk_scale, off, band_lo, band_hi, kp_ptr, stride_kpb, qdoc_ptr, stride_qdb, kvdoc_ptr, stride_kdb,
                mask_row, stride_mm, stride_mn, D, DV, BLOCK_N, part != 1, False, HAS_LO, HAS_HI, False, False, False,
                DESC, WARP_SPEC, LAZY)

    empty = l_i == 0.0
    out = (acc / tl.where(empty, 1.0, l_i)[:, None]).to(O.dtype.element_ty)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    if DESC and PACK == 1:
        o_desc = tl.make_tensor_descriptor(O + b * stride_ob + h0 * stride_oh, [Nq, DV], [stride_om, 1],
                                           [BLOCK_M, DV])
        o_desc.store([m0, 0], out)
    else:
        o_ptrs = O + b * stride_ob + head[:, None] * stride_oh + pos[:, None] * stride_om + offs_dv[None, :]
        tl.store(o_ptrs, out, mask=row_ok[:, None])
    tl.store(LSE + (b * H + head) * Nq + pos, lse, mask=row_ok)


# ----------------------------------------------------------------------------- launcher
def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors a launch builds on the device (Triton asks for it per launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def use_scratch_allocator() -> None:
    """Give Triton ``_scratch`` for the descriptors' memory where no allocator is set (in this thread's context);
    an allocator the user set is kept (any allocator serves: the launch asks it for plain device memory)."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # a Triton without the context variable: set ours as before
        pass
    triton.set_allocator(_scratch)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *,
            variant: Variant | dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, Nq, Dv], lse [B, Hq, Nq] float32, natural log)`` for q ``[B, Hq, Nq, D]``, k/v
    ``[B, Hkv, Nk, D/Dv]`` in any strides, as ``triton_flash``'s forward returns them (out in q's layout).

    Raises ValueError listing every reason when the spec or the variant cannot run here
    (``unsupported_reasons``)."""
    variant = as_variant(variant)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    reasons = unsupported_reasons(q, k, v, spec, variant)
    if reasons:
        raise ValueError(f"{variant.name} cannot run this spec: " + "; ".join(reasons))
    return run_forward(q, k, v, spec, variant)


def run_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, variant: Variant
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward`` on inputs its caller has already checked (``unsupported_reasons`` empty, last dims
    contiguous)."""
    return prepared(spec, variant).forward(q, k, v, spec)


#: prepared forwards kept, by a spec's shapes and settings and the variant (``prepared``); the oldest dropped first
_PREPARED = Interned(64)


def prepared(spec: AttentionSpec, variant: Variant) -> PreparedForward:
    """The ``PreparedForward`` of ``variant`` for calls like ``spec`` (its shapes, settings and which terms it has;
    any term tensors): one for every site with these, so that the layers of a forward share its ``LastCall``. Which
    terms are present is part of the key, so that one tensor handed over in two roles (a padding row here, a mask
    there) never gets the answer made for the other role."""
    key = (spec.batch, spec.q_heads, spec.kv_heads, spec.q_len, spec.kv_len, spec.head_dim, spec.v_head_dim,
           spec.dtype, spec.device, spec.scale, spec.causal, spec.align, spec.window, spec.fill, variant,
           *(t is None for t in (spec.key_padding, spec.q_doc, spec.kv_doc, spec.mask)))
    return _PREPARED.get(key, lambda: PreparedForward(spec, variant))


class PreparedForward:
    """``run_forward`` for the calls of one spec's shapes and settings (its term tensors may change from call to
    call; its softcap, bias and dropout are none): the grid and every kernel argument that the shapes and settings
    decide, in the kernel's order, made once. Per call: the outputs (laid out like q, their strides kept per q's
    strides), the terms' arguments, and the tile lists and whether rows may need their fill, which are handed on
    from the last call on the very same term tensors (``LastCall``: the layers of a forward share their padding),
    else looked up in the term caches. The arguments go to the launch positionally, so that no dictionary of
    seventy arguments is built per call."""

    __slots__ = ("variant", "grid", "shape", "head", "band", "tail", "options", "tiles", "no_terms", "dummy",
                 "list_dummy", "_out_strides", "_last")

    def __init__(self, spec: AttentionSpec, variant: Variant):
        self.variant = variant
        pack = spec.group_size if variant.pack_gqa else 1
        lo, hi = spec.band()
        b, hq, nq = spec.batch, spec.q_heads, spec.q_len
        self.grid = (cdiv(nq, variant.block_m // pack), b * hq // pack)
        if variant.heads_per_chunk:
            self.grid = (self.grid[0] * self.grid[1],)
        self.shape = (b, hq, nq, spec.v_head_dim)
        self.band = (nq, spec.kv_len, hq, spec.group_size, spec.scale * LOG2E.value, spec.diagonal_offset,
                     0 if lo is None else lo, 0 if hi is None else hi)
        self.head = (spec.head_dim, spec.v_head_dim, lo is not None, hi is not None)
        self.tail = (variant.full_run, pack, variant.descriptors, variant.warp_specialize, variant.lazy_rescale,
                     variant.block_m, variant.block_n, variant.heads_per_chunk)
        self.options = dict(num_warps=variant.num_warps, num_stages=variant.num_stages)
        # a program of packed heads holds block_m / pack query positions
        self.tiles = (variant.block_m // pack, variant.block_n)
        # stand-ins for absent term tensors and tile lists, never loaded: of q's dtype and float32, as
        # ``forward``'s q and log-sum-exp were before, so that the kernel compiled for them is the same
        self.dummy = torch.empty(1, dtype=spec.dtype, device=spec.device)
        self.list_dummy = torch.empty(1, dtype=torch.float32, device=spec.device)
        bare = dataclasses.replace(spec, key_padding=None, q_doc=None, kv_doc=None, bias=None, mask=None)
        self.no_terms = (listed_term_values(bare, spec.dtype, self.dummy), list_values(None, self.list_dummy),
                         bare.rows_need_fill())
        self._out_strides: dict = {}
        self._last = LastCall()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        """The output of an inference call (``Kernel.prepare``'s call)."""
        return self.forward(q, k, v, spec)[0]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` as ``run_forward`` gives them, for a call like the spec this was made for."""
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        b, hq, nq, dv = self.shape
        if self.band[1] == 0 or b * hq * nq == 0:  # no key anywhere (or no row): every row is empty
            out = q.new_zeros(self.shape)
            lse = torch.full((b, hq, nq), float("-inf"), dtype=torch.float32, device=q.device)
            return (fill_empty_rows(out, torch.isneginf(lse), v, spec, checked=True) if spec.rows_need_fill()
                    else out), lse
        strides = self._out_strides.get(q.stride())
        if strides is None:
            strides = self._out_strides[q.stride()] = strides_in_layout_of(self.shape, q)
        out = torch.empty_strided(self.shape, strides, dtype=q.dtype, device=q.device)  # laid out like q
        lse = q.new_empty((b, hq, nq), dtype=torch.float32)
        terms = [t for t in (spec.key_padding, spec.q_doc, spec.kv_doc, spec.mask) if t is not None]
        if terms:
            term_values = listed_term_values(spec, spec.dtype, self.dummy)
            lists, fills = self._last.get(terms, lambda: self._from_terms(spec))
        else:
            term_values, lists, fills = self.no_terms
        if self.variant.descriptors and q.is_cuda:
            use_scratch_allocator()
        _launch(
            _band_fwd, self.grid,
            q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *strides[:3], *self.band,
            *term_values[:11], *lists, *self.head, *term_values[11:], lists[0] is not self.list_dummy, *self.tail,
            **self.options,
        )
        if fills:
            out = fill_empty_rows(out, torch.isneginf(lse), v, spec, checked=True)
        return out, lse

    def _from_terms(self, spec: AttentionSpec) -> tuple:
        """What a call's term tensors decide beyond their own arguments: the tile lists' arguments, and whether a
        row may see no key and need its fill (``known_empty_rows``: one host sync per padding tensor)."""
        lists = tile_lists(spec, *self.tiles) if listed(spec) else None
        return list_values(lists, self.list_dummy), spec.rows_need_fill() and known_empty_rows(spec) is not False


# ----------------------------------------------------------------------------- the measured variants
#: the GPU (CUDA compute capability) the table below was measured on; elsewhere ``triton_flash`` keeps its
#: own autotuned forward
MEASURED_ON = (9, 0)
#: kv positions a query row walks (its band's width, or all keys) from which the long-row tiles win
LONG_ROWS = 12288
#: the fastest correct variant by (head dim, banded, long rows): H200, bf16, B*N = 16k tokens, N 1k, 4k and
#: 16k, causal, no band, GQA 32/8 and a window of 1024 at 8k (benchmarks/results/forward_sweep.md). 64x64 tiles
#: with 4 warps win up to 4k everywhere (0.95-0.96x cuDNN at D 64; 1.04-1.25x Flex; triton_flash's own forward
#: 0.98-1.24x Flex); at 16k the 128-row tiles (D 128, both; D 64 without a band).
MEASURED_VARIANTS = {
    (64, True, False): Variant(block_m=64, block_n=64, num_warps=4, num_stages=3),
    (64, True, True): Variant(block_m=64, block_n=64, num_warps=4, num_stages=3),
    (64, False, False): Variant(block_m=64, block_n=64, num_warps=4, num_stages=3),
    (64, False, True): Variant(block_m=128, block_n=128, num_warps=4, num_stages=3),
    (128, True, False): Variant(block_m=64, block_n=64, num_warps=4, num_stages=3),
    (128, True, True): Variant(block_m=128, block_n=64, num_warps=8, num_stages=3),
    (128, False, False): Variant(block_m=64, block_n=64, num_warps=4, num_stages=3),
    (128, False, True): Variant(block_m=128, block_n=128, num_warps=8, num_stages=3),
}
#: the same for specs with tile lists, by (head dim, what the lists come from: "mask" for a dense boolean mask,
#: else "documents", else "padding"): H200, bf16, B*N = 16k tokens. A dense mask (a causal window of 1024 at 8k and
#: 32k, causal at 4k; benchmarks/results/forward_sweep_listed.md): 128x64 tiles with 8 warps, 0.78-0.87x Flex
#: where the general forward gave 0.61-0.75x. Documents (4, 16 and 64 in a 16k row) and key padding: 64x64 tiles
#: with 4 warps. Every kind with the full-tile run, which measured faster than the lists alone in every case but
#: one tie (benchmarks/results/tile_lists.md, the ways interleaved in one process: 1.00-1.20x Flex with it,
#: 0.94-1.15x without; 64 documents 0.223 against 0.220 ms). D 64 takes the band's tiles (not measured with tile
#: lists)
LISTED_VARIANTS = {
    (64, "mask"): Variant(block_m=64, block_n=64, num_warps=4, num_stages=3),
    (64, "documents"): Variant(block_m=64, block_n=64, num_warps=4, num_stages=3),
    (64, "padding"): Variant(block_m=64, block_n=64, num_warps=4, num_stages=3),
    (128, "mask"): Variant(block_m=128, block_n=64, num_warps=8, num_stages=3),
    (128, "documents"): Variant(block_m=64, block_n=64, num_warps=4, num_stages=3),
    (128, "padding"): Variant(block_m=64, block_n=64, num_warps=4, num_stages=3),
}


#: ``heads_per_chunk`` of a causal row (a band open to the left: query tiles of unequal work), H200, bf16, 16k
#: tokens: 2.0-2.5% faster at N 4k, D 64 and 128, interleaved A/B (benchmarks/results/chunk_ab.md; packed GQA 32/8
#: 1.5% slower, inside the spread); the sweep that chose 8 heads (forward_sweep_chunks.md, single timings) read
#: 5-10%. Not for windows: their query tiles do equal work (D 64, a window of 1024 at 8k: 0.191 -> 0.206 ms with it)
CAUSAL_HEADS_PER_CHUNK = 8


def one_sided(spec: AttentionSpec) -> bool:
    """Whether the spec's band is open to the left and closed to the right (causal, no window, no terms walked as
    tile lists): its query tiles' work grows along the row, so the heaviest should start first."""
    lo, hi = spec.band()
    return lo is None and hi is not None and not listed(spec)


def listed_kind(spec: AttentionSpec) -> str:
    """What a spec's tile lists come from, as ``LISTED_VARIANTS`` keys them: a dense boolean mask, else documents,
    else key padding."""
    if spec.mask is not None and spec.mask.dtype == torch.bool:
        return "mask"
    return "documents" if spec.q_doc is not None else "padding"


_capabilities: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device`` (asked once per device), None off CUDA."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def measured_variant(spec: AttentionSpec) -> Variant | None:
    """The variant measured fastest for this spec, or None where none was: a band (causal, window) with key
    padding, documents or a boolean mask as tile lists, no dropout, float16/bfloat16, equal head dims 64 or 128,
    on the GPU of ``MEASURED_ON``. Query heads are packed per kv head where the group divides the tile and the
    heads share their tile lists."""
    if (spec.dropout_p > 0.0 or spec.dtype not in DTYPES or spec.v_head_dim != spec.head_dim
            or other_terms(spec)
            or _capability(spec.device) != MEASURED_ON):
        return None
    lo, hi = spec.band()
    width = hi - lo + 1 if lo is not None and hi is not None else spec.kv_len
    if listed(spec):
        variant = LISTED_VARIANTS.get((spec.head_dim, listed_kind(spec)))
    else:
        variant = MEASURED_VARIANTS.get((spec.head_dim, lo is not None or hi is not None, width >= LONG_ROWS))
        if variant is not None and one_sided(spec):
            variant = dataclasses.replace(variant, heads_per_chunk=CAUSAL_HEADS_PER_CHUNK)
    group = spec.group_size
    if (variant is not None and group > 1 and not group & (group - 1) and variant.block_m % group == 0
            and not per_head_lists(spec)):
        variant = dataclasses.replace(variant, pack_gqa=True)
    return variant
