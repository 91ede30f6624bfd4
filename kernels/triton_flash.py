"""``triton_flash``: exact flash attention in Triton, forward and backward, for every AttentionSpec term.

The kernels are in ``triton_flash_fwd.py`` (algorithm, band/map modes, the
shared score function) and ``triton_flash_bwd.py`` (dQ/dK/dV); the tile map of
data-dependent masks is built by ``block_map.py``. This file turns a spec into
kernel arguments, launches, and applies what the kernels leave to torch:

* rows with no visible key come out of the kernel as 0 with ``lse = -inf``;
  ``spec.fill`` then makes them NaN or the mean of v with one
  ``torch.where`` on ``lse``, only when the spec can produce such rows at all,
  and not when its key padding (its only term beside a band) leaves every row
  a key (``fills.known_empty_rows``: one host sync per padding tensor);
* their gradient, as the replaced model's autograd gives it: nothing for a
  safe fill, ``dV += dO / Nk`` for a finite fill, NaN dV for a ``-inf`` fill;
* gradients of an additive bias or float mask (``needs_bias_grad`` /
  ``needs_mask_grad``), and the backward of ``Fill.FINITE_ADDED`` when rows
  without keys can occur, are not computed by the Triton kernels: they fall
  back to the exact reference kernel's backward.

Band specs (causal, window or none) in half precision at head dims 64 and 128 run
the band kernels measured faster on the GPU they were measured on:
``triton_flash_tma.py``'s forward and ``triton_flash_bwd_exp.py``'s backward
(``measured_variant`` in each; ``benchmarks/forward_sweep.py`` and
``benchmarks/backward_sweep.py``). Both walk key padding, documents and a dense
boolean mask on top of the band as tile lists at their own tiles; an additive
mask, a bias, softcap and dropout keep the general kernels.

Key padding given as integer lengths runs in band mode (loop bounds per batch);
a bool ``[B, Nk]`` mask goes through the tile map, where a prefix mask has one
partial tile per row (the only one that loads the mask row), so it costs what
lengths cost without a host sync to find out whether it is a prefix.
"""

from __future__ import annotations

import os

import torch

from . import registry
from .fills import empty_row_grads, fill_empty_rows, known_empty_rows, plus_fill_grads
from .layout import empty_in_layout_of
from .block_map import TileLists, needs_tile_map, tile_lists
from .launch import cdiv, next_power_of_2
from .launch import launch as _launch
from .registry import COMPILES_TRITON, Grads, Kernel, register
from .spec import AttentionSpec
from .triton_flash_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .triton_flash_fwd import MAP_BLOCK, _attn_fwd

#: sustained bf16 flash-attention rate on an H100/H200, for the cost model
GPU_FLOPS = 4.0e14
LAUNCH_SECONDS = 5e-6
#: the interpreter runs kernels in numpy: never the planner's choice
INTERPRETER_COST = 1e9
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block(d: int) -> int:
    """Head dims are padded to a power of two (masked loads); tl.dot needs at least 16."""
    return max(16, next_power_of_2(d))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides4(t: torch.Tensor) -> list[int]:
    """Strides of a term broadcastable to ``[B, H, Nq, Nk]``, 0 on broadcast (size-1) dims."""
    while t.dim() < 4:
        t = t[None]
    return [0 if t.shape[d] == 1 else t.stride(d) for d in range(4)]


def _additive_mode(term: torch.Tensor, dtype: torch.dtype) -> int:
    """1: added in float32; 2: added in the half dtype, as eager adds a half term to half scores."""
    return 2 if dtype in (torch.float16, torch.bfloat16) and term.dtype == dtype else 1


def tune_bucket(n: int) -> int:
    """The length the autotuners key on: the next power of two (at least 128). Keyed on exact lengths, a
    model whose length changes every call (generation, variable batches) would re-tune every call."""
    return max(128, 1 << max(n - 1, 0).bit_length())


#: names of ``listed_term_values``' values, in order: the runtime arguments of key padding, documents and a
#: mask, then their constexpr switches (the band kernels take these; the general kernels take them among the rest)
LISTED_TERM_ARGS = ("kp_ptr", "stride_kpb", "qdoc_ptr", "stride_qdb", "kvdoc_ptr", "stride_kdb", "mask_ptr",
                    "stride_mb", "stride_mh", "stride_mm", "stride_mn", "KP_MODE", "HAS_DOC", "MASK")


def listed_term_values(spec: AttentionSpec, dtype: torch.dtype, dummy: torch.Tensor) -> tuple:
    """The kernel arguments of the spec's key padding, documents and mask (``LISTED_TERM_ARGS``), for inputs of
    ``dtype``; ``dummy`` stands in for absent tensors (never loaded: their switches are off)."""
    kp_ptr, stride_kpb, kp_mode = dummy, 0, 0
    if spec.key_padding is not None:
        kp = spec.key_padding
        if kp.dtype == torch.bool:
            kp = _last_dim_contiguous(kp).view(torch.uint8)
            kp_ptr, stride_kpb, kp_mode = kp, kp.stride(0), 2
        else:  # the kernels read length b at ``kp_ptr + b``: contiguous (a strided view's would be another's)
            kp_ptr, kp_mode = kp.contiguous(), 1
    q_doc = kv_doc = dummy
    stride_qdb = stride_kdb = 0
    if spec.q_doc is not None:
        q_doc, kv_doc = _last_dim_contiguous(spec.q_doc), _last_dim_contiguous(spec.kv_doc)
        stride_qdb = 0 if q_doc.shape[0] == 1 else q_doc.stride(0)
        stride_kdb = 0 if kv_doc.shape[0] == 1 else kv_doc.stride(0)
    mask, sm, mask_mode = dummy, (0, 0, 0, 0), 0
    if spec.mask is not None:
        boolean = spec.mask.dtype == torch.bool
        mask = spec.mask.view(torch.uint8) if boolean else spec.mask
        sm, mask_mode = _strides4(mask), 3 if boolean else _additive_mode(spec.mask, dtype)
    return (kp_ptr, stride_kpb, q_doc, stride_qdb, kv_doc, stride_kdb, mask, *sm, kp_mode, spec.q_doc is not None,
            mask_mode)


def _term_args(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor) -> dict:
    """Kernel arguments describing the mask terms (runtime values and constexpr switches)."""
    lo, hi = spec.band()
    args = dict(
        sm_scale=spec.scale, softcap=1.0 if spec.softcap is None else spec.softcap,
        off=spec.diagonal_offset, band_lo=0 if lo is None else lo, band_hi=0 if hi is None else hi,
        HAS_LO=lo is not None, HAS_HI=hi is not None, SOFTCAP=spec.softcap is not None,
        bias_ptr=q, stride_bb=0, stride_bh=0, stride_bm=0, stride_bn=0, BIAS=0,
        D=spec.head_dim, DV=spec.v_head_dim, BLOCK_D=_block(spec.head_dim), BLOCK_DV=_block(spec.v_head_dim),
        DOT_PREC="tf32" if q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee",
        GROUP=spec.group_size, H=spec.q_heads, Nq=spec.q_len, Nk=spec.kv_len,
        NQ_TUNE=tune_bucket(spec.q_len), NK_TUNE=tune_bucket(spec.kv_len),
    )
    args.update(zip(LISTED_TERM_ARGS, listed_term_values(spec, q.dtype, q)))
    if spec.bias is not None:
        sb = _strides4(spec.bias)
        args.update(bias_ptr=spec.bias, stride_bb=sb[0], stride_bh=sb[1], stride_bm=sb[2], stride_bn=sb[3],
                    BIAS=_additive_mode(spec.bias, q.dtype))
    return args


#: names of ``map_values``' values, in order (then ``USE_MAP``)
MAP_ARGS = ("part_cnt", "part_idx", "full_cnt", "full_idx", "stride_cb", "stride_ch", "stride_cm", "stride_ib",
            "stride_ih", "stride_im")


def map_values(lists: TileLists | None, dummy: torch.Tensor) -> tuple:
    """The tile lists' kernel arguments (``MAP_ARGS``); ``dummy`` stands in for them where there are none."""
    if lists is None:
        return (dummy, dummy, dummy, dummy, 0, 0, 0, 0, 0, 0)
    return (lists.partial_count, lists.partial_index, lists.full_count, lists.full_index, *lists.strides())


def _map_args(lists: TileLists | None, dummy: torch.Tensor) -> dict:
    return dict(zip(MAP_ARGS, map_values(lists, dummy)), USE_MAP=lists is not None, MAP_M=MAP_BLOCK,
                MAP_N=MAP_BLOCK)


def _dropout_args(spec: AttentionSpec, seed: int) -> dict:
    return dict(seed=int(seed) % (1 << 62), dropout_p=float(spec.dropout_p), DROPOUT=spec.dropout_p > 0.0)


def _fill_empty_rows(out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                     seed: int = 0) -> torch.Tensor:
    if not spec.rows_need_fill() or known_empty_rows(spec) is False:  # every row sees a key
        return out
    return fill_empty_rows(out, torch.isneginf(lse), v, spec, seed=seed, checked=True)


def _with_empty_rows(grads, q, k, v, grad_out, lse, spec: AttentionSpec, seed: int = 0) -> Grads:
    """``(dq, dk, dv)`` plus what rows with no visible key gave in the original (kernels/fills.py); ``seed``:
    the call's dropout seed."""
    if spec.rows_need_fill():
        extra = empty_row_grads(q, k, v, grad_out, torch.isneginf(lse), spec, seed=seed)
        grads = plus_fill_grads(grads, extra[:3])
    return (*grads, None, None)


class TritonFlashKernel(Kernel):
    """Flash attention (FlashAttention-2 algorithm) in Triton for every spec term; see module docs."""

    name = "triton_flash"
    devices = ("cuda",)
    exact = True
    summary = "exact flash attention in Triton: tile skipping for causal/window/padding/documents/masks, GQA"
    #: one large kernel per term set and specialization: the planner compiles it to time it only where its
    #: estimate leads the ATen kernels (pure causal, where cuDNN wins, it does not)
    compiles = COMPILES_TRITON

    def __init__(self, atomic_dq: bool = False):
        #: accumulate dQ with float32 atomics in the dK/dV kernel instead of the dQ kernel (order-dependent,
        #: never under torch.use_deterministic_algorithms). Measured on an H200 (bf16, D=64/128, N=4k,
        #: benchmarks/results/kernel_configs.md) it is 2-3x slower than the dQ kernel, so it is off by default
        self.atomic_dq = atomic_dq

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.device.type != "cuda" and not _interpreting():
            reasons.append("needs a CUDA device (or TRITON_INTERPRET=1 for testing)")
        if spec.device.type == "cuda" and torch.cuda.is_available():
            major, _ = torch.cuda.get_device_capability(spec.device)
            if major < 8:
                reasons.append(f"needs compute capability >= 8.0 (Ampere or newer), device has {major}.x")
        if spec.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {spec.dtype} not supported: float16, bfloat16 or float32")
        for name, d in (("head_dim", spec.head_dim), ("v_head_dim", spec.v_head_dim)):
            if not 1 <= d <= MAX_HEAD_DIM:
                reasons.append(f"{name}={d} not supported: 1..{MAX_HEAD_DIM}")
        if spec.batch * spec.q_heads > MAX_GRID_Y:
            reasons.append(f"batch * q_heads = {spec.batch * spec.q_heads} exceeds the grid limit {MAX_GRID_Y}")
        for name in ("bias", "mask"):
            term = getattr(spec, name)
            if term is not None and term.dtype == torch.float64:
                reasons.append(f"{name} of dtype float64 not supported: give it in float32 or the input dtype")
        return reasons

    def memory_bytes(self, spec: AttentionSpec) -> int:
        if not needs_tile_map(spec):
            return 0
        tiles = -(-spec.q_len // MAP_BLOCK) * -(-spec.kv_len // MAP_BLOCK)
        heads = spec.q_heads if spec.mask is not None and spec.mask.dim() >= 3 and spec.mask.shape[-3] > 1 else 1
        # int8 state, two int32 index lists (+ the same transposed in the backward); a mask is scanned as uint8
        scan = spec.mask.numel() * 2 if spec.mask is not None else 0
        return spec.batch * heads * tiles * 9 + scan

    def saved_bytes(self, spec: AttentionSpec) -> int:
        return 4 * spec.batch * spec.q_heads * spec.q_len

    def cost(self, spec: AttentionSpec) -> float:
        if _interpreting() or spec.device.type != "cuda":
            return INTERPRETER_COST
        flops = 2.0 * spec.batch * spec.q_heads * spec.q_len * spec.kv_len * (spec.head_dim + spec.v_head_dim)
        seconds = flops * spec.visible_fraction / GPU_FLOPS + LAUNCH_SECONDS
        if spec.mask is not None:
            seconds += spec.mask.numel() * spec.mask.element_size() / 3e12  # one scan to build the tile map
        return seconds

    # --------------------------------------------------------------------- forward
    def prepare(self, spec: AttentionSpec):
        """``infer`` through the band forward's ``PreparedForward`` where the band forward takes the spec: its
        variant, the checks of the spec and the variant and the launch's arguments decided once per call plan
        (``forward`` makes them on every call: some twenty tests of the spec); each call then checks only what its
        tensors decide (descriptor alignment) and launches. Specs the band forward does not take keep ``infer``."""
        band = band_fwd.measured_variant(spec) if spec.dropout_p == 0.0 else None
        if band is None or band_fwd.spec_reasons(spec, band):
            return self.infer
        run = band_fwd.prepared(spec, band)
        if not band.descriptors:
            return run

        def call(q, k, v, spec):
            q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
            if band_fwd.tensor_reasons(q, k, v, band):
                return self.infer(q, k, v, spec)
            return run(q, k, v, spec)

        return call

    def forward(self, q, k, v, spec: AttentionSpec, seed: int):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        band = band_fwd.measured_variant(spec)
        if band is not None and not band_fwd.unsupported_reasons(q, k, v, spec, band):
            # band specs at D 64/128 in half precision: the band forward measured faster (its module)
            return band_fwd.run_forward(q, k, v, spec, band)
        b, hq, nq = spec.batch, spec.q_heads, spec.q_len
        out = empty_in_layout_of((b, hq, nq, spec.v_head_dim), q)  # an HF layer's reshape of it is then a view
        lse = q.new_empty((b, hq, nq), dtype=torch.float32)
        if out.numel() == 0 and lse.numel() == 0:
            return out, lse
        if spec.kv_len == 0:
            out.zero_()
            lse.fill_(float("-inf"))
            return _fill_empty_rows(out, lse, v, spec, seed), lse
        lists = tile_lists(spec, MAP_BLOCK, MAP_BLOCK) if needs_tile_map(spec) else None
        grid = lambda meta: (cdiv(nq, meta["BLOCK_M"]), b * hq)  # noqa: E731
        _launch(
            _attn_fwd, grid, q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            **_term_args(spec, q, k), **_dropout_args(spec, seed), **_map_args(lists, lse),
        )
        return _fill_empty_rows(out, lse, v, spec, seed), lse

    # --------------------------------------------------------------------- backward
    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad) -> Grads:
        if needs_bias_grad or needs_mask_grad:
            # not in the Triton kernels yet, exact fallback: dS summed over a term's broadcast dims
            return registry.get("reference").backward(
                grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad
            )
        q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
        band = None if self.atomic_dq else band_bwd.measured_variant(spec)
        if band is not None and not band_bwd.unsupported_reasons(grad_out, q, k, v, spec, band):
            # causal, windowed or no band at D 64/128 in half precision: the band backward measured faster
            return (*band_bwd.run_backward(grad_out, q, k, v, out, lse, spec, band), None, None)
        b, hq, nq, nk = spec.batch, spec.q_heads, spec.q_len, spec.kv_len
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        if nq == 0 or nk == 0 or b * hq == 0:
            return _with_empty_rows((torch.zeros_like(q), dk, dv), q, k, v, grad_out, lse, spec, seed)
        lse = lse.float().contiguous()
        delta = torch.empty_like(lse)
        lse2 = torch.empty_like(lse)
        block_dv = _block(spec.v_head_dim)
        _launch(
            _attn_bwd_preprocess, (cdiv(nq, 64), b * hq),
            out, grad_out, lse, delta, lse2, *out.stride()[:3], *grad_out.stride()[:3], nq, hq,
            DV=spec.v_head_dim, BLOCK_DV=block_dv, BLOCK_M=64,
        )
        terms = {**_term_args(spec, q, k), **_dropout_args(spec, seed)}
        use_map = needs_tile_map(spec)
        deterministic = not self.atomic_dq or torch.are_deterministic_algorithms_enabled()
        dq_acc = q.new_empty(q.shape) if deterministic else q.new_zeros(q.shape, dtype=torch.float32)
        kv_lists = tile_lists(spec, MAP_BLOCK, MAP_BLOCK, transposed=True) if use_map else None
        grid_kv = lambda meta: (cdiv(nk, meta["BLOCK_N"]), b * spec.kv_heads)  # noqa: E731
        _launch(
            _attn_bwd_dkdv, grid_kv, q, k, v, grad_out, dq_acc, dk, dv, lse2, delta,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq_acc.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3],
            **terms, **_map_args(kv_lists, lse), ATOMIC_DQ=not deterministic,
        )
        if deterministic:
            q_lists = tile_lists(spec, MAP_BLOCK, MAP_BLOCK) if use_map else None
            grid_q = lambda meta: (cdiv(nq, meta["BLOCK_M"]), b * hq)  # noqa: E731
            _launch(
                _attn_bwd_dq, grid_q, q, k, v, grad_out, dq_acc, lse2, delta,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq_acc.stride()[:3],
                **terms, **_map_args(q_lists, lse),
            )
        return _with_empty_rows((dq_acc.to(q.dtype), dk, dv), q, k, v, grad_out, lse, spec, seed)


register(TritonFlashKernel())

# the band forward and backward (causal, window or no band) import this module's helpers: imported after them
from . import triton_flash_bwd_exp as band_bwd  # noqa: E402
from . import triton_flash_tma as band_fwd  # noqa: E402
