"""PyTorch's own ``scaled_dot_product_attention`` backends as attnopt kernels.

An honest planner offers the vendor's kernels too: ``sdpa_cpu`` (PyTorch's CPU
flash attention), and on CUDA ``sdpa_flash``, ``sdpa_efficient`` and
``sdpa_cudnn``, each pinned with ``torch.nn.attention.sdpa_kernel``. Each says
exactly when it computes the spec's function:

* boolean terms other than top-left causal, and additive terms, are handed to
  SDPA as one materialized ``[b, h, Nq, Nk]`` additive mask in the query dtype
  (``-inf`` where a boolean term masks): O(Nq Nk) memory, counted in
  ``memory_bytes``; FlashAttention takes no mask at all. Document ids and key
  padding become that mask too. Top-left causal is ``is_causal=True``.
* A row that the boolean terms mask entirely is left open in the mask handed
  to SDPA (so SDPA computes finite values there, in the forward and the
  backward), then zeroed, and given what the original gave by
  ``kernels/fills.py``: 0, NaN or the uniform average of v, with the matching
  gradients. An additive ``finfo.min`` mask is added, not a boolean term, so
  its rows average uniformly in SDPA exactly as in eager.
* GQA: the kv heads are repeated (memory counted), which every backend takes.
* softcap is not supported. Dropout is, on flash and memory-efficient, and on cuDNN through
  ATen's forward and backward pair only (``not_supported_reasons``): each call's dropout is SDPA's
  own, drawn from the default CUDA generator seeded with the call's seed
  (``_seeded``) and the generator's state restored after it, so a backward
  that recomputes regenerates the same mask. A backward from the saved forward
  (below) hands ATen the forward's own random state (``_PHILOX``). The CPU
  kernel has none (ATen's CPU flash attention takes no dropout).

``lse``: the CPU kernel returns it (``aten._scaled_dot_product_flash_attention_for_cpu``),
and its backward runs ATen's CPU flash backward from the saved output and ``lse``
when every term is boolean (rows without keys: no gradient into SDPA, their fill's
added). On CUDA, cuDNN and flash run ATen's own forward and backward pair
(``_scaled_dot_product_cudnn_attention`` / ``_scaled_dot_product_flash_attention``
and their ``_backward``) for every call that needs no mask (no term, or top-left
causal), and cuDNN also for a mask of boolean terms (key padding, documents, a
band, a boolean mask: rows without keys are left open, filled after, and pass no
gradient): the backward reads the forward's output and ``lse``. Any other call, and
every call on the memory-efficient backend, returns no ``lse`` (NaN there) and its
backward re-runs SDPA on the same backend under autograd (``approx_base.recompute_grads``).

A training call with dropout (never twice differentiable) on flash, memory-efficient, the CPU
kernel or cuDNN's saved-forward pair, with no row to fill and no gradient into a term, is SDPA's
own call under autograd (``autograd_forward``): its backward is ATen's, from the saved forward,
with no Python in it (cuDNN's is handed a contiguous output gradient, the one layout its own
backward is right for).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from .approx_base import nan_lse, recompute_grads
from .aten_cpu import cpu_flash_reads_groups, flash_attention_cpu, flash_attention_cpu_backward
from .fills import (empty_row_grads, fill_empty_rows, grads_without_rows_or_keys, known_empty_rows,
                    no_rows_or_keys, output_without_rows_or_keys, plus_fill_grads)
from .layout import in_layout_of, repeat_groups, sum_groups
from .registry import Grads, Kernel, register
from .spec import NAN_FILLS, Align, AttentionSpec, Fill
from .term_cache import Interned, LastCall, TermCache

#: bytes per second of materializing / reading a mask, for the cost model
MASK_BANDWIDTH = {"cpu": 1e10, "cuda": 3e12}
# The CPU kernel's cost model, fitted on a 2-core machine (1.0 ns per score at D = 32, 2.0 ns at
# D = 64). ATen's CPU flash attention keeps each score block in cache: a score costs its share of
# the two products plus a small softmax step; only the mask it is given is built and read.
#: FLOP/s of its block products
CPU_SDPA_FLOPS = 1.2e11
#: seconds of softmax work per score
CPU_SDPA_SCORE_S = 5e-11
#: writing a freshly allocated buffer above glibc's mmap threshold faults it in page by page
CPU_FRESH_BYTES_PER_S, CPU_MMAP_THRESHOLD = 4e9, 32 << 20
#: reading the mask once per query head: the heads of a batch re-read it from cache
CPU_MASK_READ_BYTES_PER_S = 3e10
#: ops that build the additive mask from the terms (keep tiles, fill, sum), and dispatch per op
CPU_MASK_OPS, CPU_OP_S = 6, 5e-6


def _pure_causal(spec: AttentionSpec) -> bool:
    """Top-left causal and nothing else that masks: SDPA's ``is_causal=True``."""
    return spec.causal and spec.align == Align.TOP_LEFT and spec.window is None and _band_terms_only(spec)


def _band_terms_only(spec: AttentionSpec) -> bool:
    """No term but causal and window (``mask_terms`` within them): read field by field, since an
    inference call asks it every time."""
    return (spec.key_padding is None and spec.q_doc is None and spec.bias is None and spec.mask is None
            and spec.softcap is None)


def _band_only_hiding_nothing(spec: AttentionSpec) -> bool:
    """Causal/window as the only terms, hiding no key from any row: SDPA then needs no mask at all."""
    return _band_terms_only(spec) and spec.band_hides_nothing()


def needs_mask(spec: AttentionSpec) -> bool:
    if not (spec.causal or spec.window is not None) and _band_terms_only(spec):
        return False  # no term at all
    return not _pure_causal(spec) and not _band_only_hiding_nothing(spec)


def _is_causal(spec: AttentionSpec) -> bool:
    """SDPA's ``is_causal`` for the spec (off when the band hides nothing)."""
    return _pure_causal(spec) and not spec.band_hides_nothing()


def mask_bytes(spec: AttentionSpec) -> int:
    """Bytes of the materialized additive mask (0 when SDPA needs none)."""
    if not needs_mask(spec):
        return 0
    batch = spec.batch if (spec.key_padding is not None or spec.q_doc is not None) else 1
    heads = 1
    for term in (spec.bias, spec.mask):
        if term is not None and term.dim() >= 4 and term.shape[0] > 1:
            batch = spec.batch
        if term is not None and term.dim() >= 3 and term.shape[-3] > 1:
            heads = spec.q_heads
    # the boolean keep (1 byte) and the additive mask (query dtype) are alive together
    return batch * heads * spec.q_len * spec.kv_len * (1 + spec.dtype.itemsize)


def mask_workspace_bytes(spec: AttentionSpec) -> int:
    """Peak bytes of building SDPA's mask (``mask_and_empty_rows``): keep, keep | empty rows, ~keep and the
    additive mask, of the terms' broadcast shape; a band first makes ``keep_tile``'s int64 [Nq, Nk] offsets."""
    if not needs_mask(spec):
        return 0
    lo, hi = spec.band()
    banded = lo is not None or hi is not None
    dims = [spec.batch if (spec.key_padding is not None or spec.q_doc is not None) else 1, 1,
            spec.q_len if (banded or spec.q_doc is not None) else 1, spec.kv_len]
    for term in (spec.bias, spec.mask):
        if term is not None:
            shape = (1,) * (4 - term.dim()) + tuple(term.shape)
            for i, (full, size) in enumerate(zip((spec.batch, spec.q_heads, spec.q_len, spec.kv_len), shape)):
                if size != 1:
                    dims[i] = full
    built = dims[0] * dims[1] * dims[2] * dims[3] * (3 + spec.dtype.itemsize)
    band = spec.q_len * spec.kv_len * (8 + 1 + 1) if banded else 0
    return max(built, band)


#: masks up to this size are built once per term tensors (``mask_and_empty_rows``)
CACHED_MASK_BYTES = 32 << 20
#: the masks of the last few term tensors: a model's layers share one, a batch of models a few
_MASKS = TermCache(4, without_terms=False)
#: the mask sources prepared calls share (``MaskSource.shared``), by shapes, band, fill and kinds of terms
_SOURCES = Interned(64)


def sdpa_mask(spec: AttentionSpec) -> torch.Tensor | None:
    """The spec's terms as one additive mask in the query dtype, ``-inf`` where masked."""
    return mask_and_empty_rows(spec)[0]


def mask_and_empty_rows(spec: AttentionSpec) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SDPA's additive mask and the rows the boolean terms leave no key in (``[b or 1, h or 1, Nq, 1]``,
    None when the terms prove there are none). Those rows are left open in the mask: SDPA then computes
    finite values there, which the kernel replaces, instead of a backend-dependent 0 or NaN that would
    reach the backward.

    Built once per term tensors (``term_cache``): the layers of a forward share their padding or document
    tensor, and a backward that recomputes finds its forward's mask. Masks above ``CACHED_MASK_BYTES`` are
    built per call: kept across layers they would raise the peak, where their building is small beside
    the attention they feed. The result is shared: callers never change it in place."""
    if not needs_mask(spec):
        return None, None
    return MaskSource(spec)(spec)


class MaskSource:
    """``mask_and_empty_rows`` for the calls of one spec's shapes and terms (a spec that needs a mask), with what
    they share decided once: whether the term cache keeps their masks, and its key's static part.

    ``for_call`` gives an inference call everything it needs from its terms at once: the mask, the rows to set
    to NaN and the rows to fill, the last call's answer when its term tensors are the very same at the same
    versions (``term_cache.LastCall``): the layers of a forward, or a decode step's, then skip the term cache's
    lookups (about 30 us of host time per padded call on a GPU host, ``benchmarks/dispatch.py``)."""

    __slots__ = ("cached", "static", "_last")

    def __init__(self, spec: AttentionSpec):
        self.cached = mask_bytes(spec) <= CACHED_MASK_BYTES
        # which terms are present keys the entries too: one tensor handed over as key padding for one call and as
        # a mask for another (a [B, Nk] row with Nq = B) makes another mask in each role
        self.static = (spec.batch, spec.q_heads, spec.q_len, spec.kv_len, spec.band(), spec.diagonal_offset,
                       spec.dtype, str(spec.device), *(t is None for t in _every_term(spec)))
        self._last = LastCall()

    @staticmethod
    def shared(spec: AttentionSpec) -> MaskSource:
        """The source of every prepared call with ``spec``'s shapes, band, fill and kinds of terms: the layers of a
        forward prepare one call each, and through one source the first layer's answer reaches the others
        (``LastCall``: the same term tensors at the same versions, in the same generation) without a term cache
        lookup, the rows' check and the fill's views per layer."""
        key = (spec.batch, spec.q_heads, spec.q_len, spec.kv_len, spec.band(), spec.diagonal_offset, spec.dtype,
               str(spec.device), spec.fill, *(t is None for t in (spec.key_padding, spec.q_doc, spec.kv_doc)),
               *(None if t is None else t.dtype for t in (spec.bias, spec.mask)))
        return _SOURCES.get(key, lambda: MaskSource(spec))

    def __call__(self, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.cached:
            return _mask_and_empty_rows(spec)
        return _MASKS.get(_terms(spec), self.static, lambda: _mask_and_empty_rows(spec))

    def for_call(self, spec: AttentionSpec) -> tuple:
        """``(mask, nan_rows, fill_rows)`` of an inference call: its mask, the rows an additive ``-inf`` term
        masks entirely (None: none to set to NaN) and the rows without keys to fill (``[B, Hq, Nq]``, None:
        none)."""
        if not self.cached:  # a mask too large to keep: built per call
            return self._answer(spec)
        return self._last.get(_terms(spec), lambda: self._answer(spec))

    def _answer(self, spec: AttentionSpec) -> tuple:
        mask, empty = self(spec)
        empty = _rows_to_fill(empty, spec)
        return mask, _neg_inf_rows(mask, spec), None if empty is None else _full_rows(empty, spec)


def _every_term(spec: AttentionSpec) -> tuple:
    return spec.key_padding, spec.q_doc, spec.kv_doc, spec.bias, spec.mask


def _terms(spec: AttentionSpec) -> list[torch.Tensor]:
    return [t for t in _every_term(spec) if t is not None]


def _mask_and_empty_rows(spec: AttentionSpec) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    keep, additive = spec.materialize()
    mask = torch.zeros((), dtype=spec.dtype, device=spec.device)
    for term in additive:
        mask = mask + term.to(spec.dtype)
    empty = None
    if keep is not None:
        # on the CPU, padding that leaves every row a key is found out here, once per mask (a small computation
        # there): the calls sharing the mask then have no rows to open or fill, without a lookup of their own
        cpu_known = spec.device.type == "cpu" and known_empty_rows(spec) is False
        if spec.rows_may_be_empty(additive=False) and not cpu_known:
            empty = ~keep.any(dim=-1, keepdim=True)
            keep = keep | empty
        mask = mask.masked_fill(~keep, float("-inf"))
    return with_key_dim(mask, spec.kv_len, spec.device.type == "cuda"), empty


def with_key_dim(mask: torch.Tensor, kv_len: int, cuda: bool) -> torch.Tensor:
    """``mask`` with its key dim at its full length, made in memory, for the CUDA backends: a term that is
    the same for every key (a condition on the query index alone, ``[.., Nq, 1]``) must not reach them with
    a broadcast key dim (an H200 run, torch 2.11: "CUDA error: misaligned address" inside a timed cuDNN call
    with such a mask, which left the process's CUDA context unusable). Broadcast batch, head and query dims
    are what SDPA's own callers pass and stay as they are; the CPU kernel broadcasts any dim itself."""
    if not cuda or mask.dim() == 0 or mask.shape[-1] == kv_len:
        return mask
    return mask.expand(*mask.shape[:-1], kv_len).contiguous()


def _full_rows(empty: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    return empty[..., 0].expand(spec.batch, spec.q_heads, spec.q_len)


def _rows_to_fill(empty: torch.Tensor | None, spec: AttentionSpec) -> torch.Tensor | None:
    """``mask_and_empty_rows``'s rows, or None where the padding alone leaves every row a key
    (``fills.known_empty_rows``: found once per padding tensor, one host sync shared by the layers of a forward;
    on the CPU the mask builder has already found it): then nothing is filled, opened or added per call."""
    if empty is None or known_empty_rows(spec) is False:
        return None
    return empty


def _opened(grad, out, lse, empty: torch.Tensor, spec: AttentionSpec):
    """``(grad, out, lse)`` for ATen's backward from a forward whose rows without keys were filled after SDPA:
    such a row passes no gradient to SDPA (its gradient is the fill's, added after), so its output gradient
    is 0 there, and log-sum-exp +inf makes its probabilities exactly 0 (no inf - inf)."""
    rows = _full_rows(empty, spec)
    return grad.masked_fill(rows[..., None], 0.0), out.masked_fill(rows[..., None], 0.0), lse.masked_fill(rows, float("inf"))


def _nan_where_masked(out: torch.Tensor, mask: torch.Tensor | None, spec: AttentionSpec) -> torch.Tensor:
    """NaN on rows an additive term masks entirely with ``-inf``, as the original's softmax gives
    (SDPA's safe softmax gives 0); on the device, no sync. Boolean terms are covered by ``fill_reasons``."""
    rows = _neg_inf_rows(mask, spec)
    return out if rows is None else out.masked_fill(rows, float("nan"))


def _neg_inf_rows(mask: torch.Tensor | None, spec: AttentionSpec) -> torch.Tensor | None:
    """The rows ``_nan_where_masked`` sets to NaN, ``[b or 1, h or 1, Nq, 1]``, or None when no term can make one."""
    if mask is None or spec.fill not in NAN_FILLS:
        return None
    if not any(t is not None and t.is_floating_point() for t in (spec.bias, spec.mask)):
        return None
    return torch.isneginf(mask).all(dim=-1, keepdim=True)


def _backend_switches() -> dict:
    """``{backend: (is_enabled, set_enabled)}`` for every SDPA backend this torch has."""
    switches = {}
    for name in ("cudnn", "flash", "mem_efficient", "math", "overrideable"):
        get, put = getattr(torch._C, f"_get_{name}_sdp_enabled", None), getattr(torch._C, f"_set_sdp_use_{name}", None)
        backend = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "mem_efficient": "EFFICIENT_ATTENTION",
                   "math": "MATH", "overrideable": "OVERRIDEABLE"}[name]
        if get is not None and put is not None and hasattr(SDPBackend, backend):
            switches[getattr(SDPBackend, backend)] = (get, put)
    return switches


_SWITCHES = _backend_switches()
_IS_ENABLED = tuple(get for get, _ in _SWITCHES.values())
_SET_ENABLED = tuple(put for _, put in _SWITCHES.values())


def _only(backend: SDPBackend) -> list[bool]:
    """The switch states of ``sdpa_kernel([backend])``, in ``_SWITCHES`` order."""
    return [other == backend for other in _SWITCHES]


def _pinned(states: list[bool], q, k, v, mask, is_causal: bool, scale, gqa: bool = False,
            dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA with the backend switches set to ``states`` (``_only``) for the call and restored after it:
    ``sdpa_kernel`` without its context manager, since a site runs this on every call. Nothing is
    switched when the switches already are so."""
    saved = [get() for get in _IS_ENABLED]
    if saved == states:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa, dropout_p=dropout_p)
    for put, enabled in zip(_SET_ENABLED, states):
        put(enabled)
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa, dropout_p=dropout_p)
    finally:
        for put, enabled in zip(_SET_ENABLED, saved):
            put(enabled)


#: CUDA backends asked whether they take a mask in this process, and their answers
_MASK_PROBES: dict[str, str] = {}
#: CUDA backends found to refuse ``enable_gqa`` in this process
_NO_NATIVE_GQA: set[str] = set()


def _aten_forward(backend: SDPBackend, q, k, v, mask, causal: bool, scale: float, dropout_p: float,
                  with_lse: bool = True):
    """``(out, lse [B, H, Nq] float32, (philox seed, philox offset))`` of ATen's cuDNN or flash forward (flash:
    ``mask`` None); the random state is what its backward takes to regenerate the dropout. ``with_lse=False``:
    an inference call's, as SDPA makes it when nothing requires grad (cuDNN then writes no ``lse``)."""
    if backend == SDPBackend.CUDNN_ATTENTION:
        res = _cudnn_attention(q, k, v, mask, with_lse, dropout_p, causal, False, scale=scale)
        # cuDNN's lse is [B, H, Nq, 1]; without one its binding returns None there
        return res[0], res[1].squeeze(-1) if with_lse else None, (res[6], res[7])
    res = _flash_attention(q, k, v, dropout_p, causal, False, scale=scale)
    return res[0], res[1], (res[6], res[7])


#: ATen's CUDA forwards through their generated bindings (``torch.ops.aten`` parses the schema per call)
_cudnn_attention = torch._scaled_dot_product_cudnn_attention
_flash_attention = torch._scaled_dot_product_flash_attention


#: per device, the random state the ATen backwards take without dropout (then never read)
_NO_RANDOM_STATE: dict[torch.device, torch.Tensor] = {}


def _aten_backward(backend: SDPBackend, grad, q, k, v, out, lse, mask, causal: bool, scale: float,
                   dropout_p: float = 0.0, philox: tuple | None = None):
    """``(dq, dk, dv)`` of ``_aten_forward``'s call from its output, ``lse`` and (with dropout) random state."""
    if philox is None:
        state = _NO_RANDOM_STATE.get(q.device)
        if state is None:
            state = _NO_RANDOM_STATE.setdefault(q.device, torch.zeros((), dtype=torch.int64, device=q.device))
        philox = (state, state)
    nq, nk = q.shape[2], k.shape[2]
    if backend == SDPBackend.CUDNN_ATTENTION:
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse.unsqueeze(-1), *philox, mask, None, None, nq, nk, dropout_p, causal,
            scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, None, None, nq, nk, dropout_p, causal, *philox, scale=scale)


#: the random state of the latest forwards with dropout that saved their ``lse``, by the call's seed: what
#: their backwards hand ATen. Bounded: a backward whose forward's state is gone (a forward run without a
#: backward, ``_PHILOX_KEPT`` calls ago) recomputes instead, on the same seed.
_PHILOX: OrderedDict[int, tuple] = OrderedDict()
_PHILOX_KEPT = 4096


def _seeded(device: torch.device, seed: int, run):
    """``run()`` with the device's default CUDA generator (the one SDPA's dropout draws from) seeded with
    ``seed``, and its state restored after: the call's dropout is a function of its seed, which a backward
    that recomputes the forward passes again, and the user's random stream is left as it was."""
    generator = torch.cuda.default_generators[device.index if device.index is not None else
                                              torch.cuda.current_device()]
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return run()
    finally:
        generator.set_state(state)


class SDPAKernel(Kernel):
    """One SDPA backend; ``backend`` None is the CPU kernel (whatever SDPA picks on CPU)."""

    exact = True

    def __init__(self, name: str, backend: SDPBackend | None, device: str, dtypes: tuple, max_head_dim: int,
                 takes_mask: bool | str, flops: float, summary: str):
        self.name, self.backend, self.device_type, self.dtypes = name, backend, device, dtypes
        self.max_head_dim, self.takes_mask, self.flops, self.summary = max_head_dim, takes_mask, flops, summary
        #: the backend switch states that pin this kernel's backend
        self.switches = None if backend is None else _only(backend)

    def not_supported_reasons(self, spec: AttentionSpec) -> list[str]:
        reasons = []
        if spec.device.type != self.device_type:
            reasons.append(f"runs on {self.device_type} only, this call is on {spec.device.type}")
        elif self.device_type == "cuda" and not torch.cuda.is_available():
            reasons.append("no CUDA device available")
        if spec.dtype not in self.dtypes:
            reasons.append(f"dtype {spec.dtype} not supported: {', '.join(str(d) for d in self.dtypes)}")
        if max(spec.head_dim, spec.v_head_dim) > self.max_head_dim:
            reasons.append(f"head dim {max(spec.head_dim, spec.v_head_dim)} above {self.max_head_dim}")
        if self.backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION) and spec.head_dim != spec.v_head_dim:
            reasons.append(f"needs equal q/k and v head dims, got {spec.head_dim} and {spec.v_head_dim}")
        if spec.softcap is not None:
            reasons.append(f"softcap={spec.softcap} not supported by SDPA")
        if spec.dropout_p > 0.0 and self.device_type == "cpu":
            reasons.append(f"dropout (p={spec.dropout_p}) not supported: ATen's CPU flash attention has none")
        if spec.dropout_p > 0.0 and self.backend == SDPBackend.CUDNN_ATTENTION and not self._saves_lse(spec):
            # measured on an H200 (torch 2.11, benchmarks/sdpa_dropout_layouts.py): with dropout, SDPA's own
            # cuDNN autograd drops other weights in its backward than in its forward when the output's gradient
            # is in the queries' layout; ATen's forward and backward pair, handed the output and its gradient in
            # the forward's layout (``_aten_backward``), keeps them in both layouts. Dropout goes through it only.
            reasons.append(f"dropout (p={spec.dropout_p}) not used: cuDNN's dropout gradients are right only "
                           "through ATen's forward and backward pair, which this call cannot take (it needs "
                           "equal head dims divisible by 8 and a mask of boolean terms only)")
        if self.backend == SDPBackend.FLASH_ATTENTION and _is_causal(spec) and spec.q_len != spec.kv_len:
            # measured on an H200 (torch 2.11): "Flash attention does not support the is_causal flag when
            # seqlen_q != seqlen_k", and no other backend is allowed in its place
            reasons.append(f"top-left causal over {spec.q_len} queries and {spec.kv_len} keys: flash takes "
                           "is_causal only for equal lengths")
        if needs_mask(spec) and not self._takes_mask(spec):
            refusal = f" (asked with a tiny call: {_MASK_PROBES[self.name]})" if _MASK_PROBES.get(self.name) else ""
            reasons.append(f"takes no attention mask{refusal}; this call has {'+'.join(spec.mask_terms)} beyond "
                           "top-left causal")
        additive = [t.dtype for t in (spec.bias, spec.mask) if t is not None and t.is_floating_point()]
        if additive and (spec.dtype in (torch.float16, torch.bfloat16) or additive[0].itemsize > spec.dtype.itemsize):
            # a half term is one the original added in half precision; a wider one would be rounded to
            # the queries' dtype (a float32 finfo.min becomes -inf in bfloat16): SDPA does neither
            reasons.append(f"adds the {additive[0]} mask at another precision than the original did")
        if additive and spec.requires_grad:
            # measured on the CPU backend: rows a finite finfo.min mask fills entirely get other gradients
            # than autograd gives the original (which differentiates the addition as the identity)
            reasons.append("gradients through an additive mask are not the original's on rows it fills entirely")
        return reasons

    def _takes_mask(self, spec: AttentionSpec) -> bool:
        """cuDNN takes an additive mask from some cuDNN versions on: asked once per process, with a tiny
        call (a refusal is SDPA's "No available kernel")."""
        if self.takes_mask != "probe" or not torch.cuda.is_available():  # without a device: "no CUDA device"
            return bool(self.takes_mask)
        if self.name not in _MASK_PROBES:
            # asked on a CUDA device whatever the spec's: a CPU spec (another kernel's candidate) must not
            # record a refusal for the process
            device = spec.device if spec.device.type == "cuda" else torch.device("cuda")
            try:
                q = torch.ones(1, 1, 8, 64, dtype=torch.bfloat16, device=device)
                mask = torch.zeros(1, 1, 8, 8, dtype=torch.bfloat16, device=device)
            except (RuntimeError, AssertionError):  # no such device here (a plan made for another machine)
                return True
            try:
                _pinned(_only(self.backend), q, q, q, mask, False, None)
                _MASK_PROBES[self.name] = ""
            except RuntimeError as err:  # the refusal, kept for the reason it gives
                _MASK_PROBES[self.name] = " ".join(str(err).split())[:300] or type(err).__name__
        return not _MASK_PROBES[self.name]

    def memory_bytes(self, spec: AttentionSpec) -> int:
        repeated = 0
        # cuDNN reads each K/V head once for its query-head group (``_grouped``, ``_sdpa_call``) unless this build
        # refused groups; the other backends get K/V repeated per query head
        native = self.backend == SDPBackend.CUDNN_ATTENTION and self.name not in _NO_NATIVE_GQA
        if spec.group_size > 1 and not native:
            repeated = spec.batch * spec.q_heads * spec.kv_len * (spec.head_dim + spec.v_head_dim) * spec.dtype.itemsize
        workspace = 0
        if self.device_type == "cpu":
            # ATen's CPU flash attention: per thread a [q_split, kv_split] float32 score block and its exp
            q_split = 256 if spec.q_len >= 768 else 64 if spec.q_len >= 192 else 32
            kv_split = min(512, max(1, spec.kv_len))
            workspace = torch.get_num_threads() * q_split * (kv_split * 3 + spec.v_head_dim) * 4
        return mask_workspace_bytes(spec) + repeated + workspace

    def saved_bytes(self, spec: AttentionSpec) -> int:
        """The log-sum-exp; a cuDNN training call with dropout (``autograd_forward``) also returns its output as a
        contiguous copy beside the one cuDNN made and keeps, so the layer's next op keeps one more output-sized
        tensor (BERT at 512 tokens, H200: 287 MiB more peak over 12 layers)."""
        extra = 0
        if self.backend == SDPBackend.CUDNN_ATTENTION and spec.dropout_p > 0.0 and self._saves_lse(spec):
            extra = spec.batch * spec.q_heads * spec.q_len * spec.v_head_dim * spec.dtype.itemsize
        return super().saved_bytes(spec) + extra

    def cost(self, spec: AttentionSpec) -> float:
        if self.device_type == "cpu":
            return self._cpu_cost(spec)
        flops = 2.0 * spec.batch * spec.q_heads * spec.q_len * spec.kv_len * (spec.head_dim + spec.v_head_dim)
        visible = spec.visible_fraction if _pure_causal(spec) else 1.0
        return flops * visible / self.flops + mask_bytes(spec) / MASK_BANDWIDTH[self.device_type]

    def _cpu_cost(self, spec: AttentionSpec) -> float:
        """Scores visited (half of them under ``is_causal``: the kernel skips blocks above the diagonal),
        plus building the additive mask and reading it once per query head."""
        scores = spec.batch * spec.q_heads * spec.q_len * spec.kv_len
        visible = spec.visible_fraction if _pure_causal(spec) else 1.0
        per_score = 2.0 * (spec.head_dim + spec.v_head_dim) / self.flops + CPU_SDPA_SCORE_S
        seconds = scores * visible * per_score + CPU_OP_S
        built = mask_bytes(spec)
        if built:
            bandwidth = MASK_BANDWIDTH["cpu"]
            seconds += 3 * built / bandwidth + scores * spec.dtype.itemsize / CPU_MASK_READ_BYTES_PER_S
            seconds += CPU_MASK_OPS * CPU_OP_S
            if built > CPU_MMAP_THRESHOLD:
                seconds += built / CPU_FRESH_BYTES_PER_S
        if spec.group_size > 1:
            repeated = spec.batch * spec.q_heads * spec.kv_len * (spec.head_dim + spec.v_head_dim)
            seconds += 2 * repeated * spec.dtype.itemsize / MASK_BANDWIDTH["cpu"]
        return seconds

    def attend(self, q, k, v, spec: AttentionSpec, seed: int = 0) -> torch.Tensor:
        """Differentiable SDPA on this backend, ``[B, Hq, Nq, Dv]``, with the dropout of ``seed``; rows with no
        visible key are 0 (``fills.py`` gives them the original's values)."""
        mask, empty = mask_and_empty_rows(spec)
        out = self._sdpa(q, k, v, spec, mask, _is_causal(spec), seed)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return _nan_where_masked(out, mask, spec)

    def _sdpa(self, q, k, v, spec: AttentionSpec, mask, causal: bool, seed: int = 0) -> torch.Tensor:
        if spec.dropout_p > 0.0:  # CUDA only (``not_supported_reasons``)
            return _seeded(q.device, seed, lambda: self._sdpa_call(q, k, v, spec, mask, causal, spec.dropout_p))
        return self._sdpa_call(q, k, v, spec, mask, causal, 0.0)

    def _sdpa_call(self, q, k, v, spec: AttentionSpec, mask, causal: bool, dropout_p: float) -> torch.Tensor:
        if self.backend is None:
            k, v = repeat_groups(k, v, spec.group_size)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=spec.scale)
        if spec.group_size > 1 and self.name not in _NO_NATIVE_GQA:
            try:  # read each K/V head once for its query-head group, no repeated copy
                return _pinned(self.switches, q, k, v, mask, causal, spec.scale, gqa=True, dropout_p=dropout_p)
            except RuntimeError:  # this backend refuses GQA on this build: repeat from now on
                _NO_NATIVE_GQA.add(self.name)
        k, v = repeat_groups(k, v, spec.group_size)
        return _pinned(self.switches, q, k, v, mask, causal, spec.scale, dropout_p=dropout_p)

    def forward(self, q, k, v, spec: AttentionSpec, seed: int):
        return self._forward(q, k, v, spec, seed)[:2]

    def train_forward(self, q, k, v, spec: AttentionSpec, seed: int):
        """``(out, lse, residual)``; the residual is the call's ``mask_and_empty_rows`` (its rows to fill), which
        its backward takes instead of looking them up again, when that mask is one the term cache keeps anyway:
        a larger one is not kept alive until the backward (it is built again there). As every call, it finds
        out whether its padding leaves every row a key (one host sync per padding tensor, in a model's first
        layer), so that no layer fills rows in its forward, or opens them in its backward, for nothing."""
        return self._forward(q, k, v, spec, seed)

    def _forward(self, q, k, v, spec: AttentionSpec, seed: int):
        if no_rows_or_keys(spec):
            return (*output_without_rows_or_keys(q, spec), None)
        if self.device_type == "cpu":
            k_all, v_all = (k, v) if spec.group_size == 1 or cpu_flash_reads_groups() else repeat_groups(k, v, spec.group_size)
            mask, empty = mask_and_empty_rows(spec)
            out, lse = flash_attention_cpu(q, k_all, v_all, 0.0, _is_causal(spec), attn_mask=mask, scale=spec.scale)
            lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            if lse.dtype != lse_dtype:
                lse = lse.to(lse_dtype)
            out = _nan_where_masked(out, mask, spec)
        elif self._saves_lse(spec):
            with torch.no_grad():
                mask, empty = mask_and_empty_rows(spec)
                out, lse = self._aten_forward(q, k, v, spec, mask, seed)
        else:
            with torch.no_grad():
                mask, empty = mask_and_empty_rows(spec)
                out, lse = self._sdpa(q, k, v, spec, mask, _is_causal(spec), seed), nan_lse(q, spec)
                out = _nan_where_masked(out, mask, spec)
        empty = _rows_to_fill(empty, spec)
        residual = (mask, empty) if mask is None or mask_bytes(spec) <= CACHED_MASK_BYTES else None
        if empty is None:
            return out, lse, residual
        rows = _full_rows(empty, spec)
        return fill_empty_rows(out, rows, v, spec, seed=seed), lse.masked_fill(rows, float("-inf")), residual

    def autograd_forward(self, q, k, v, spec: AttentionSpec, seed: int):
        """SDPA's own autograd where it is this kernel's training call: on flash and memory-efficient (their own
        backwards are right whatever the output gradient's layout, ``benchmarks/sdpa_dropout_layouts.py``), on
        the CPU, and on cuDNN for the calls of its saved-forward pair (``_saves_lse``), handed a contiguous output
        gradient. Not for a call with rows without keys (filled after, with the fill's gradients) or a gradient
        into a term."""
        cudnn = self.backend == SDPBackend.CUDNN_ATTENTION
        if no_rows_or_keys(spec) or (cudnn and not self._saves_lse(spec)):
            return None
        if any(t is not None and t.requires_grad for t in (spec.bias, spec.mask)):
            return None
        mask, empty = mask_and_empty_rows(spec)
        if _rows_to_fill(empty, spec) is not None:
            return None
        out = _nan_where_masked(self._sdpa(q, k, v, spec, mask, _is_causal(spec), seed), mask, spec)
        if not cudnn:
            return out
        # measured on an H200 (torch 2.11, benchmarks/sdpa_cudnn_grad_layouts.py): SDPA's own cuDNN backward is
        # right for a contiguous output gradient only, with or without dropout or a mask, whatever its output's
        # layout; the backward of ``as_strided`` hands its input a gradient in the input's strides, so the
        # output goes out contiguous (a copy when cuDNN made it in the queries' layout) through an as_strided view
        out = out.contiguous()
        return out.as_strided(out.shape, out.stride(), out.storage_offset())

    def infer(self, q, k, v, spec: AttentionSpec) -> torch.Tensor:
        """``forward``'s output with nothing else made: no log-sum-exp placeholder, no mask when the spec
        needs none. On the CPU the log-sum-exp comes free with the output: ``forward`` it is."""
        if spec.dropout_p > 0.0:
            from attnopt.ops import _draw_seed  # the op's seed, drawn as for any call with dropout

            return self.forward(q, k, v, spec, _draw_seed(spec.dropout_p))[0]
        if self.device_type == "cpu" or no_rows_or_keys(spec):
            return self.forward(q, k, v, spec, 0)[0]
        return self.prepare(spec)(q, k, v, spec)  # on CUDA: the call a plan of this spec prepares

    def prepare(self, spec: AttentionSpec):
        """``infer`` with the spec's decisions taken once: ``is_causal`` and, for a call with a mask, how its masks
        are found (``MaskSource``); on the CPU also whether K/V heads are repeated. Each call then looks its own
        mask up, calls the pinned backend (ATen's CPU flash attention on the CPU) and fills what ``infer``
        fills."""
        if no_rows_or_keys(spec) or spec.dropout_p > 0.0:
            return self.infer
        causal = _is_causal(spec)
        if self.device_type == "cuda":
            if self._saves_lse(spec) and spec.device.type == "cuda":
                # ATen's forward called directly, as a training call's is: no backend switches set and restored
                # around SDPA's public call, no backend selection, on every call of every layer (ATen's flash
                # and cuDNN forwards have CUDA kernels only: this kernel's path on CPU tensors keeps SDPA's call).
                # Its arguments are the plan's: a cuDNN that refuses the groups goes through ``_aten_forward``,
                # which repeats K/V from then on
                scale, grouped = spec.scale, spec.group_size > 1
                if self.backend == SDPBackend.CUDNN_ATTENTION:
                    def attend(q, k, v, spec, mask):
                        if not grouped or self.name not in _NO_NATIVE_GQA:
                            try:
                                return _cudnn_attention(q, k, v, mask, False, 0.0, causal, False, scale=scale)[0]
                            except RuntimeError:
                                if not grouped:
                                    raise
                        return self._aten_forward(q, k, v, spec, mask, 0, with_lse=False)[0]
                else:
                    def attend(q, k, v, spec, mask):
                        if grouped:
                            k, v = repeat_groups(k, v, spec.group_size)
                        return _flash_attention(q, k, v, 0.0, causal, False, scale=scale)[0]
            else:
                def attend(q, k, v, spec, mask):
                    return self._sdpa(q, k, v, spec, mask, causal)
            if needs_mask(spec):
                masks = MaskSource.shared(spec)
                return lambda q, k, v, spec: _on_mask(attend, masks, q, k, v, spec)
            return lambda q, k, v, spec: attend(q, k, v, spec, None)
        repeat = spec.group_size > 1 and not cpu_flash_reads_groups()

        def attend(q, k, v, spec, mask):
            if repeat:
                k, v = repeat_groups(k, v, spec.group_size)
            return flash_attention_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=spec.scale)[0]

        if not needs_mask(spec):
            return lambda q, k, v, spec: attend(q, k, v, spec, None)
        masks = MaskSource.shared(spec)
        return lambda q, k, v, spec: _on_mask(attend, masks, q, k, v, spec)

    def backward(self, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad) -> Grads:
        return self.train_backward(None, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad, needs_mask_grad)

    def train_backward(self, residual, grad_out, q, k, v, out, lse, spec, seed, needs_bias_grad,
                       needs_mask_grad) -> Grads:
        """``backward``, with the forward's ``mask_and_empty_rows`` as ``residual`` (None: looked up)."""
        if no_rows_or_keys(spec):
            return grads_without_rows_or_keys(q, k, v, spec, needs_bias_grad, needs_mask_grad)
        if self.device_type == "cpu" and not (needs_bias_grad or needs_mask_grad) and _boolean_terms_only(spec):
            # ATen's own backward from the forward's output and log-sum-exp (SDPA's, on every row a key is
            # visible in): no second forward
            return self._cpu_backward(grad_out, q, k, v, out, lse, spec, residual)
        philox = _PHILOX.get(seed) if spec.dropout_p > 0.0 else None
        if spec.dropout_p > 0.0 and self.backend == SDPBackend.CUDNN_ATTENTION:
            # cuDNN's dropout only through the pair (``not_supported_reasons``); a forward whose random state is
            # gone runs again under its seed, which draws the same state
            if philox is None:
                with torch.no_grad():
                    out, lse = self._aten_forward(q, k, v, spec, (residual or mask_and_empty_rows(spec))[0], seed)
                philox = _PHILOX[seed]
            return self._aten_backward(grad_out, q, k, v, out, lse, spec, philox, seed, residual)
        if (self._saves_lse(spec) and not torch.are_deterministic_algorithms_enabled()
                and (philox is not None or spec.dropout_p == 0.0)):
            # under torch.use_deterministic_algorithms the public call below decides, as SDPA's checks do
            return self._aten_backward(grad_out, q, k, v, out, lse, spec, philox, seed, residual)
        # cuDNN's backward (H200, torch 2.11) gave wrong gradients when the output's gradient came in other
        # strides than the output (a contiguous gradient for HF's transposed output: a Llama training step
        # off by 1.6x its largest gradient); it gets one in the output's strides
        grads = recompute_grads(lambda q, k, v, spec: self.attend(q, k, v, spec, seed), grad_out, q, k, v, spec,
                                needs_bias_grad, needs_mask_grad,
                                grad_like_out=self.backend == SDPBackend.CUDNN_ATTENTION)
        if spec.fill == Fill.SAFE or not spec.rows_may_be_empty(additive=False):
            return grads
        return _with_fill_grads(grads, (residual or mask_and_empty_rows(spec))[1], q, k, v, grad_out, spec,
                                needs_bias_grad, needs_mask_grad, seed)


    def _saves_lse(self, spec: AttentionSpec) -> bool:
        """Whether the forward runs ATen's cuDNN or flash forward and the backward reads its ``lse``: a CUDA
        call with one head dim that ATen takes as is, that needs no mask, or (cuDNN) a mask of boolean terms
        only (an additive term's rows that it fills entirely are averaged by SDPA, not filled after)."""
        if self.device_type != "cuda" or self.backend not in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            return False
        if spec.head_dim != spec.v_head_dim or spec.head_dim % 8 != 0:
            return False
        return not needs_mask(spec) or (self.backend == SDPBackend.CUDNN_ATTENTION and _boolean_terms_only(spec))

    def _grouped(self, k, v, spec: AttentionSpec):
        """``(k, v, repeated)``: K/V as the ATen call reads them (flash, or a cuDNN that refused groups, reads
        them repeated per query head)."""
        if spec.group_size == 1 or (self.backend == SDPBackend.CUDNN_ATTENTION and self.name not in _NO_NATIVE_GQA):
            return k, v, False
        return (*repeat_groups(k, v, spec.group_size), True)

    def _aten_forward(self, q, k, v, spec: AttentionSpec, mask, seed: int, with_lse: bool = True):
        """``(out, lse)`` of ATen's forward (rows without keys as SDPA computed them on the open mask); with
        dropout, under the call's seed, its random state kept for the backward (``_PHILOX``).
        ``with_lse=False``: an inference call's (``lse`` then not one to read)."""
        k_read, v_read, _ = self._grouped(k, v, spec)

        def run():
            return _aten_forward(self.backend, q, k_read, v_read, mask, _is_causal(spec), spec.scale, spec.dropout_p,
                                 with_lse)
        try:
            out, lse, philox = run() if spec.dropout_p == 0.0 else _seeded(q.device, seed, run)
        except RuntimeError:
            if k_read is not k or spec.group_size == 1:
                raise
            _NO_NATIVE_GQA.add(self.name)  # this cuDNN refuses groups: repeat from now on
            return self._aten_forward(q, k, v, spec, mask, seed, with_lse)
        if spec.dropout_p > 0.0:
            _PHILOX[seed] = philox
            if len(_PHILOX) > _PHILOX_KEPT:
                _PHILOX.popitem(last=False)
        return out, lse

    def _aten_backward(self, grad_out, q, k, v, out, lse, spec: AttentionSpec, philox: tuple | None,
                       seed: int, residual: tuple | None) -> Grads:
        k_read, v_read, repeated = self._grouped(k, v, spec)
        mask, empty = residual or mask_and_empty_rows(spec)
        empty = _rows_to_fill(empty, spec)
        grad = grad_out if grad_out.dtype == out.dtype else grad_out.to(out.dtype)
        if empty is not None:
            grad, out, lse = _opened(grad, out, lse, empty, spec)
        # measured on an H200 (torch 2.11): cuDNN's backward is wrong unless the output and its gradient are
        # in the layout its forward made (the queries'), as a dense saved output or a contiguous gradient are not
        out = in_layout_of(out, q)
        grad = in_layout_of(grad, out)
        dq, dk, dv = _aten_backward(self.backend, grad, q, k_read, v_read, out, lse, mask, _is_causal(spec),
                                    spec.scale, spec.dropout_p, philox)
        if repeated:  # each kv head's gradient is the sum over its query-head group
            dk, dv = sum_groups(dk, spec.kv_heads), sum_groups(dv, spec.kv_heads)
        grads = (dq, dk, dv, None, None)
        if empty is None or spec.fill == Fill.SAFE:
            return grads
        return _with_fill_grads(grads, empty, q, k, v, grad_out, spec, False, False, seed)

    def _cpu_backward(self, grad_out, q, k, v, out, lse, spec, residual: tuple | None) -> Grads:
        grouped = spec.group_size == 1 or cpu_flash_reads_groups()
        k_all, v_all = (k, v) if grouped else repeat_groups(k, v, spec.group_size)
        mask, empty = residual or mask_and_empty_rows(spec)
        empty = _rows_to_fill(empty, spec)
        grad = grad_out if grad_out.dtype == out.dtype else grad_out.to(out.dtype)
        if empty is not None:
            grad, out, lse = _opened(grad, out, lse, empty, spec)
        dq, dk, dv = flash_attention_cpu_backward(grad, q, k_all, v_all, out, lse, 0.0, _is_causal(spec),
                                                   attn_mask=mask, scale=spec.scale)
        if not grouped:  # each kv head's gradient is the sum over its query-head group
            dk, dv = sum_groups(dk, spec.kv_heads), sum_groups(dv, spec.kv_heads)
        grads = (dq, dk, dv, None, None)
        if empty is None or spec.fill == Fill.SAFE:
            return grads
        return _with_fill_grads(grads, empty, q, k, v, grad_out, spec, False, False)


def _on_mask(attend, masks: MaskSource, q, k, v, spec: AttentionSpec) -> torch.Tensor:
    """An inference call's output: ``attend(q, k, v, spec, mask)`` on the call's mask (``masks.for_call``), NaN on
    rows an additive ``-inf`` term masks entirely, and rows without keys filled."""
    mask, nan_rows, fill_rows = masks.for_call(spec)
    out = attend(q, k, v, spec, mask)
    if nan_rows is not None:
        out = out.masked_fill(nan_rows, float("nan"))
    return out if fill_rows is None else fill_empty_rows(out, fill_rows, v, spec, checked=True)


def _boolean_terms_only(spec: AttentionSpec) -> bool:
    """No additive term: every row SDPA computes is the original's or one a boolean term empties (filled)."""
    return spec.bias is None and (spec.mask is None or spec.mask.dtype == torch.bool)


def _with_fill_grads(grads: Grads, empty, q, k, v, grad_out, spec: AttentionSpec, needs_bias_grad: bool,
                     needs_mask_grad: bool, seed: int = 0) -> Grads:
    """``grads`` plus the gradients the fill gives rows without keys (``fills.py``, with the dropout of
    ``seed``); ``empty`` as ``mask_and_empty_rows`` gives it, None when there are none."""
    if empty is None:
        return grads
    extra = empty_row_grads(q, k, v, grad_out, _full_rows(empty, spec), spec, needs_bias_grad, needs_mask_grad,
                            seed=seed)
    # a term's extra gradient exists only where its gradient was asked for
    return plus_fill_grads(grads, extra)


_HALF = (torch.float16, torch.bfloat16)
register(SDPAKernel("sdpa_cpu", None, "cpu", (torch.float32, torch.float64, *_HALF), 1 << 16, True, CPU_SDPA_FLOPS,
                    "PyTorch SDPA on CPU (ATen flash attention for CPU)"))
register(SDPAKernel("sdpa_flash", SDPBackend.FLASH_ATTENTION, "cuda", _HALF, 256, False, 4.5e14,
                    "PyTorch SDPA, FlashAttention-2 backend (no mask beyond top-left causal)"))
register(SDPAKernel("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION, "cuda", (torch.float32, *_HALF), 256, True,
                    2.5e14, "PyTorch SDPA, memory-efficient (xformers) backend, additive mask"))
register(SDPAKernel("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION, "cuda", _HALF, 128, "probe", 5e14,
                    "PyTorch SDPA, cuDNN backend (additive mask where this cuDNN takes one)"))
