"""``flex``: PyTorch's compiled FlexAttention, with the spec's proven terms as its ``mask_mod``/``score_mod``.

FlexAttention computes ``softmax(score_mod(scale * q k^T)) v`` over the entries
its ``mask_mod`` keeps, visiting only the blocks a ``BlockMask`` lists. Every
term of an ``AttentionSpec`` except dropout is one of those two functions:

* ``mask_mod`` (boolean terms): the causal/window band ``lo <= j - i - offset <= hi``,
  key padding (``kv_idx < length[b]`` or ``keep[b, kv_idx]``), documents
  (``q_doc[b, q_idx] == kv_doc[b, kv_idx]``) and a boolean ``mask``;
* ``score_mod`` (the scores' arithmetic, in float32): ``softcap * tanh(s / softcap)``,
  then each additive term (``bias``, a float ``mask``) added as the original
  added it: a term of the inputs' half dtype in that dtype (``reference.add_term``);
  scores an added ``finfo.min`` drives past float32's base-2 range are held
  at ``SCORE_FLOOR`` (see there).

Grouped-query attention is ``enable_gqa``; the scale is FlexAttention's own.

The block structure is the project's tile map (``block_map.tile_lists``, cached
per mask tensor) in FlexAttention's format: partial tiles run the ``mask_mod``,
full tiles skip it, empty tiles are never visited. Its tensors are kept per
shape and mask tensors; each call only attaches the ``mask_mod`` that reads
that call's tensors. The compiled kernel is kept per spec family (terms,
band, dtype, head dims, training); new mask tensors of the same family reuse
it, and on CUDA its sequence lengths turn dynamic at their first change.

Rows with no visible key are 0 in FlexAttention (``lse = -inf``); ``kernels/fills.py``
then gives them what the replaced model gave, forward and backward.

CUDA: forward with the log-sum-exp; backward by FlexAttention's own compiled
backward on a recomputed forward, plus the fills' gradients of empty rows;
the gradient of an additive term comes from the reference kernel's backward.

CPU: torch's CPU FlexAttention (inductor C++ code) runs inference only and
returns no log-sum-exp, so a column of ones appended to ``v`` marks the rows
with a visible key (their probabilities sum to 1, an empty row's output is 0).
Its first call per shape compiles for seconds on a small machine, more than
the banded reference kernel spends on a whole call at the lengths CPU models
run, and the CPU tuning budget could not absorb it: on the CPU the planner
takes it only when asked by name (``kernel="flex"``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import inspect
import types
import weakref
from collections import OrderedDict

import torch

from . import registry
from .approx_base import nan_lse, recompute_grads
from .block_map import tile_lists
from .fills import (empty_row_grads, fill_empty_rows, grads_without_rows_or_keys, no_rows_or_keys,
                    output_without_rows_or_keys, plus_fill_grads)
from .registry import COMPILES_INDUCTOR, Grads, Kernel, register
from .spec import AttentionSpec, Window

try:
    from torch.nn.attention import flex_attention as _flex_module
except ImportError:  # torch < 2.5
    _flex_module = None

#: FlexAttention's sparse block: the tile map is built at this size
BLOCK = 128
#: FlexAttention's Triton kernels need head dims of at least 16 (``tl.dot``); above 256 they run out of memory
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: the CPU kernel is offered in float32 only: the dtype its tests cover
CPU_DTYPES = (torch.float32,)
# The CUDA cost model: FlexAttention's Triton kernels on an H200 (torch 2.11), per visited score: bf16 causal at
# N = 8k ran at 3.9e14 FLOP/s, 5-12% behind triton_flash on causal, window, documents and padding; float32
# products run at IEEE float32 speed (no TF32 unless asked).
FLOPS = {torch.float16: 3.8e14, torch.bfloat16: 3.8e14, torch.float32: 5e13}
#: host time of one call: guards of the compiled function, the block mask's pytree, one or two launches
CALL_SECONDS = 6e-5
#: tile-map construction: ~50 small launches when a data term (padding, documents, mask) is present
TILE_MAP_SECONDS = 3e-4
#: FlexAttention exponentiates in base 2: a score below -finfo(float32).max / log2(e) (an added finfo.min
#: fill) would become -inf, and a row of them would pass for a row with no visible key, where the original
#: averages it. Such scores are raised to this floor: each still weighs exp(-2e38) = 0 beside any other
#: score, and a row made only of them stays uniform, as in the original, where an added finfo.min
#: absorbs the scores (float32 resolves 2e31 there). Only two different huge fills in one row would differ.
SCORE_FLOOR = -2.3e38
#: FlexAttention's launch settings, tried in turn while torch's own choice needs more shared memory than the
#: device has: a ``score_mod`` that reads a float32 bias pipelines its tiles beside K and V
LAUNCH_FALLBACKS = ({}, {"num_stages": 2}, {"num_stages": 1}, {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1})
#: per spec family, the first of them that compiled
_LAUNCH: dict = {}
#: key splits of FlexAttention's decoding kernel (queries shorter than a block), for its workspace
DECODE_SPLITS = 32
#: the CPU kernel's block products (inductor's C++ code, 2 cores), and its compilation, counted in every call's
#: estimate: measured at 5 to 25 s per shape and spec family on a 2-core machine with a cold compile cache
CPU_FLOPS, CPU_COMPILE_SECONDS = 1.2e11, 5.0
#: block masks kept (their tensors are small: one int32 per tile and the counts)
CACHE_SIZE = 16


@functools.cache
def _torch_support() -> str | None:
    """Why this torch cannot run the kernel, or None."""
    if _flex_module is None:
        return f"needs torch.nn.attention.flex_attention (torch >= 2.7), this is torch {torch.__version__}"
    if "seq_lengths" not in inspect.signature(_flex_module.BlockMask.from_kv_blocks).parameters:
        return f"needs BlockMask.from_kv_blocks(seq_lengths=...) (torch >= 2.7), this is torch {torch.__version__}"
    return None


def _lse_request() -> dict:
    """The keyword asking FlexAttention for the log-sum-exp: ``return_aux`` where it exists (torch >= 2.9)."""
    aux = getattr(_flex_module, "AuxRequest", None)
    return {"return_aux": aux(lse=True)} if aux is not None else {"return_lse": True}


def _call_flex(q, k, v, **call):
    return _flex_module.flex_attention(q, k, v, **call)


@functools.cache
def compiled(device_type: str, family: tuple):
    """``flex_attention`` compiled for one spec family on one device type, shared by its calls in this process.

    Each family gets a function of its own code object: torch.compile keeps its graphs per code object
    and, past ``recompile_limit`` of them, runs the code uncompiled (FlexAttention's unfused fallback,
    which materializes the scores), so families must not share one. On CUDA the sequence lengths
    become dynamic at their first change (torch.compile's default); torch's CPU code generation for
    FlexAttention does not take dynamic lengths, so there each shape is compiled for itself.
    """
    name = f"flex_attention_{hashlib.sha1(repr(family).encode()).hexdigest()[:12]}"
    code = _call_flex.__code__.replace(co_name=name, co_qualname=name)
    function = types.FunctionType(code, _call_flex.__globals__, name)
    return torch.compile(function, dynamic=False if device_type == "cpu" else None)


# ------------------------------------------------------------------ terms as mask_mod / score_mod
def _reader(term: torch.Tensor):
    """``(b, h, q_idx, kv_idx) -> term`` at those indices, for a term broadcastable to ``[B, H, Nq, Nk]``.

    Broadcast (size-1) dims are dropped first, by a view: a ``[1, H, 1, Nk]`` bias is read as ``t[h, kv_idx]``.
    """
    while term.dim() < 4:
        term = term[None]
    kept = tuple(i for i, n in enumerate(term.shape) if n != 1)
    view = term[tuple(slice(None) if n != 1 else 0 for n in term.shape)]

    def read(b, h, q_idx, kv_idx):
        at = (b, h, q_idx, kv_idx)
        return view[tuple(at[i] for i in kept)] if kept else view

    return read


def mask_mod_of(spec: AttentionSpec):
    """The conjunction of the spec's boolean terms as a FlexAttention ``mask_mod``; None when nothing masks."""
    checks = []
    lo, hi = spec.band()
    off = spec.diagonal_offset
    if lo is not None:
        checks.append(lambda b, h, q_idx, kv_idx: kv_idx - q_idx - off >= lo)
    if hi is not None:
        checks.append(lambda b, h, q_idx, kv_idx: kv_idx - q_idx - off <= hi)
    kp = spec.key_padding
    if kp is not None and kp.dtype == torch.bool:
        checks.append(lambda b, h, q_idx, kv_idx: kp[b, kv_idx])
    elif kp is not None:
        checks.append(lambda b, h, q_idx, kv_idx: kv_idx < kp[b])
    if spec.q_doc is not None:
        q_doc = spec.q_doc[0] if spec.q_doc.shape[0] == 1 else spec.q_doc
        kv_doc = spec.kv_doc[0] if spec.kv_doc.shape[0] == 1 else spec.kv_doc
        q_id = (lambda b, q_idx: q_doc[q_idx]) if q_doc.dim() == 1 else (lambda b, q_idx: q_doc[b, q_idx])
        kv_id = (lambda b, kv_idx: kv_doc[kv_idx]) if kv_doc.dim() == 1 else (lambda b, kv_idx: kv_doc[b, kv_idx])
        checks.append(lambda b, h, q_idx, kv_idx: q_id(b, q_idx) == kv_id(b, kv_idx))
    if spec.mask is not None and spec.mask.dtype == torch.bool:
        checks.append(_reader(spec.mask))
    if not checks:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        keep = checks[0](b, h, q_idx, kv_idx)
        for check in checks[1:]:
            keep = keep & check(b, h, q_idx, kv_idx)
        return keep

    return mask_mod


def score_mod_of(spec: AttentionSpec):
    """Softcap and the additive terms as a FlexAttention ``score_mod`` (float32 arithmetic); None without them."""
    half = spec.dtype if spec.dtype in (torch.float16, torch.bfloat16) else None
    terms = [
        (_reader(t), half is not None and t.dtype == half)
        for t in (spec.bias, spec.mask) if t is not None and t.dtype != torch.bool
    ]
    softcap = spec.softcap
    if softcap is None and not terms:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        s = score.to(torch.float32)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        for read, in_half in terms:
            term = read(b, h, q_idx, kv_idx)
            # a half term is added in half precision, as eager adds it to half scores
            s = (s.to(half) + term).to(torch.float32) if in_half else s + term.to(torch.float32)
        return torch.clamp(s, min=SCORE_FLOOR) if terms else s

    return score_mod


# ------------------------------------------------------------------ block masks
_BLOCKS: OrderedDict = OrderedDict()


def block_mask(spec: AttentionSpec, mask_mod, training: bool = False):
    """The spec's ``BlockMask`` carrying ``mask_mod``; None when nothing masks (FlexAttention visits all).
    ``training``: with the transposed lists the backward walks.

    The block tensors come from ``block_map.tile_lists`` (cached per mask tensor and version) and are
    converted once per tile map; a call gets a shallow copy with its own ``mask_mod``, so the cache
    holds no reference to a model's mask tensors.
    """
    if mask_mod is None:
        return None
    lists = tile_lists(spec, BLOCK, BLOCK)
    key = (id(lists), spec.q_len, spec.kv_len, training)
    hit = _BLOCKS.get(key)
    if hit is not None and hit[0]() is lists:
        _BLOCKS.move_to_end(key)
        structure = hit[1]
    else:
        structure = _flex_module.BlockMask.from_kv_blocks(
            lists.partial_count, lists.partial_index, lists.full_count, lists.full_index, BLOCK_SIZE=BLOCK,
            seq_lengths=(spec.q_len, spec.kv_len), **_q_blocks(training),
        )
        _BLOCKS[key] = (weakref.ref(lists), structure)
        while len(_BLOCKS) > CACHE_SIZE:
            _BLOCKS.popitem(last=False)
    made = copy.copy(structure)
    made.mask_mod = mask_mod
    return made


@functools.cache
def _q_blocks(training: bool) -> dict:
    """The transposed block lists serve the backward only: an inference call skips them where torch allows."""
    parameters = inspect.signature(_flex_module.BlockMask.from_kv_blocks).parameters
    return {} if training or "compute_q_blocks" not in parameters else {"compute_q_blocks": False}


def _band_block_fraction(spec: AttentionSpec) -> float:
    """Fraction of the score matrix in the blocks the band leaves visible: the band widened by a block."""
    lo, hi = spec.band()
    if lo is None and hi is None:
        return 1.0
    widened = Window(None if lo is None else BLOCK - lo, None if hi is None else hi + BLOCK)
    return spec.with_(causal=False, window=widened).visible_fraction


# ------------------------------------------------------------------ the kernel
class FlexKernel(Kernel):
    """Compiled FlexAttention for every spec term but dropout; see the module docstring."""

    name = "flex"
    exact = True
    #: on the CPU only by name: see the module docstring
    devices = ("cuda",)
    compiles = COMPILES_INDUCTOR
    summary = "PyTorch FlexAttention (compiled), the spec's terms as mask_mod/score_mod, block-sparse"

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        missing = _torch_support()
        if missing:
            reasons.append(missing)
        device = spec.device.type
        if device == "cuda":
            if importlib.util.find_spec("triton") is None:
                reasons.append("needs triton: torch.compile generates FlexAttention's CUDA kernels with it")
            if not torch.cuda.is_available():
                reasons.append("no CUDA device available")
            else:
                major, _ = torch.cuda.get_device_capability(spec.device)
                if major < 8:
                    reasons.append(f"needs compute capability >= 8.0 (Ampere or newer), device has {major}.x")
            dtypes = CUDA_DTYPES
        elif device == "cpu":
            if spec.requires_grad:
                reasons.append("torch's FlexAttention has no backward on the CPU: inference only")
            dtypes = CPU_DTYPES
        else:
            reasons.append(f"runs on cuda (and on cpu by name), this call is on {device}")
            dtypes = ()
        if spec.dtype not in dtypes:
            reasons.append(f"dtype {spec.dtype} not supported on {device}: {', '.join(map(str, dtypes)) or 'none'}")
        for name, d in (("head_dim", spec.head_dim), ("v_head_dim", spec.v_head_dim)):
            if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
                reasons.append(f"{name}={d} not supported: {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
        if spec.dropout_p > 0.0:
            reasons.append(f"dropout (p={spec.dropout_p}) not supported: FlexAttention has no dropout")
        wide = [name for name in ("bias", "mask") if getattr(spec, name) is not None and getattr(spec, name).dtype == torch.float64]
        reasons += [f"{name} of dtype float64 not supported (score_mod adds in float32): give it in float32" for name in wide]
        return reasons

    # --------------------------------------------------------------------- estimates
    def memory_bytes(self, spec: AttentionSpec) -> int:
        q_tiles, k_tiles = -(-spec.q_len // BLOCK), -(-spec.kv_len // BLOCK)
        data = spec.key_padding is not None or spec.q_doc is not None or spec.mask is not None
        batch = spec.batch if data else 1
        heads = spec.q_heads if spec.mask is not None and spec.mask.dim() >= 3 and spec.mask.shape[-3] > 1 else 1
        # int8 tile states, then counts and int32 indices of partial and full tiles (transposed too to train)
        maps = batch * heads * q_tiles * k_tiles * (1 + 8 * (1 + spec.requires_grad)) if spec.has_boolean_mask else 0
        scan = spec.mask.numel() * 2 if spec.mask is not None else 0
        lse = 4 * spec.batch * spec.q_heads * spec.q_len
        if spec.device.type == "cpu":
            # v with a column of ones and the widened output; per thread a [q_split, kv_split] score block
            widened = (spec.batch * spec.kv_heads * spec.kv_len + spec.batch * spec.q_heads * spec.q_len) * (
                spec.v_head_dim + 1) * spec.dtype.itemsize
            return maps + scan + lse + widened + torch.get_num_threads() * 128 * 512 * 3 * 4
        if spec.q_len < BLOCK:
            # the decoding kernel splits the keys: partial outputs and row statistics per split
            lse += 4 * spec.batch * spec.q_heads * spec.q_len * DECODE_SPLITS * (spec.v_head_dim + 2)
        return maps + scan + lse

    def cost(self, spec: AttentionSpec) -> float:
        flops = 2.0 * spec.batch * spec.q_heads * spec.q_len * spec.kv_len * (spec.head_dim + spec.v_head_dim)
        visited = flops * _band_block_fraction(spec)
        maps = TILE_MAP_SECONDS if (spec.key_padding is not None or spec.q_doc is not None or spec.mask is not None) else 0.0
        if spec.device.type != "cuda":
            # inference through inductor's C++ kernel, plus one compilation per shape in this process
            return visited / CPU_FLOPS + maps + CPU_COMPILE_SECONDS
        seconds = visited / FLOPS.get(spec.dtype, FLOPS[torch.float32]) + CALL_SECONDS + maps
        if spec.mask is not None:
            seconds += spec.mask.numel() * spec.mask.element_size() / 3e12  # one scan to build the tile map
        return seconds

    # --------------------------------------------------------------------- forward
    def forward(self, q, k, v, spec: AttentionSpec, seed: int):
        if no_rows_or_keys(spec):
            return output_without_rows_or_keys(q, spec)
        if spec.device.type == "cpu":
            return self._cpu_forward(q, k, v, spec)
        with torch.no_grad():
            out, lse = attend(q, k, v, spec, with_lse=True)
        return _filled(out, torch.isneginf(lse), v, spec), lse

    def _cpu_forward(self, q, k, v, spec: AttentionSpec):
        """Without a log-sum-exp (torch's CPU kernel gives none): a column of ones finds the rows that see a key."""
        with torch.no_grad():
            if not spec.rows_need_fill():
                out = attend(q, k, v, spec, with_lse=False)  # an empty row is 0: the safe fill itself
                return out, nan_lse(q, spec)
            ones = v.new_ones((*v.shape[:-1], 1))
            widened = attend(q, k, torch.cat([v, ones], dim=-1), spec.with_(v_head_dim=spec.v_head_dim + 1),
                             with_lse=False)
            out, seen = widened[..., :-1], widened[..., -1]
            empty = seen < 0.5  # 1 where a key is visible (a NaN row is not empty: it stays NaN)
        lse = nan_lse(q, spec).masked_fill(empty, float("-inf"))
        return fill_empty_rows(out, empty, v, spec), lse

    # --------------------------------------------------------------------- backward
    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad) -> Grads:
        if no_rows_or_keys(spec):  # FlexAttention compiles no call without keys or rows
            return grads_without_rows_or_keys(q, k, v, spec, needs_bias_grad, needs_mask_grad)
        if needs_bias_grad or needs_mask_grad:
            # an additive term's gradient (dS summed over its broadcast dims): the exact reference backward
            return registry.get("reference").backward(
                grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad
            )
        may_be_empty = spec.rows_need_fill()
        empty = torch.isneginf(lse)
        # an empty row's gradient is the fill's alone (below), whatever FlexAttention makes of it
        visible_grad = grad_out.masked_fill(empty[..., None], 0.0) if may_be_empty else grad_out
        dq, dk, dv, _, _ = recompute_grads(_attend_out, visible_grad, q, k, v, spec, False, False)
        if may_be_empty:
            extra = empty_row_grads(q, k, v, grad_out, empty, spec)
            dq, dk, dv = plus_fill_grads((dq, dk, dv), extra[:3])
        return dq, dk, dv, None, None


def attend(q, k, v, spec: AttentionSpec, *, with_lse: bool, training: bool = False):
    """FlexAttention's output ``[B, Hq, Nq, Dv]`` for ``spec`` (0 on rows with no visible key), and with
    ``with_lse`` its natural-log log-sum-exp ``[B, Hq, Nq]`` float32 (``-inf`` on those rows).
    ``training``: the call will be differentiated (its block mask then carries the backward's lists)."""
    mask_mod = mask_mod_of(spec)
    call = dict(
        score_mod=score_mod_of(spec), block_mask=block_mask(spec, mask_mod, training), scale=spec.scale,
        enable_gqa=spec.group_size > 1, **(_lse_request() if with_lse else {}),
    )
    family = (spec.dtype, spec.mask_terms, spec.band(), spec.align, spec.head_dim, spec.v_head_dim, with_lse, training)
    first = _LAUNCH.get((q.device.type, family), 0)
    for index in range(first, len(LAUNCH_FALLBACKS)):
        options = LAUNCH_FALLBACKS[index]
        try:
            run = compiled(q.device.type, (*family, index))
            result = run(q, k, v, **call, **({"kernel_options": options} if options else {}))
        except Exception as err:  # noqa: BLE001  (inductor reports a failed compile in several types)
            if "out of resource" not in str(err) or index + 1 == len(LAUNCH_FALLBACKS):
                raise
            continue
        _LAUNCH[(q.device.type, family)] = index
        if not with_lse:
            return result
        out, aux = result
        return out, getattr(aux, "lse", aux)
    raise AssertionError("unreachable")


def _attend_out(q, k, v, spec: AttentionSpec):
    return attend(q, k, v, spec, with_lse=False, training=True)


def _filled(out: torch.Tensor, empty: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """``out`` with the rows that see no key as ``spec.fill`` says (no host sync; FlexAttention's 0 is the safe fill)."""
    if not spec.rows_need_fill():
        return out
    return fill_empty_rows(out, empty, v, spec)


register(FlexKernel())
