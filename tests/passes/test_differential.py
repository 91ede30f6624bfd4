"""Differential tests: generated attention programs, ``attnopt.optimize`` against eager, call after call.

Each example composes one small attention program from the spellings people
write (issue 10, "a differential test suite that generates variants"; issue 19):

* the score product: ``q @ k.T``, ``torch.matmul``, ``einsum``, ``bmm`` on
  ``[B*H, N, D]``, ``baddbmm`` positional and BLOOM's keyword form, or SDPA;
* the scale: ``s * c``, ``c * s``, ``s / (1/c)``, ``torch.div(s, 1/c)``, none;
* a structural mask (causal, sliding window, an attention-sink edit, a module
  buffer) built out of place or in place (``tril_``, ``triu_``, setitem) and a
  key padding mask (bool, or HF's 0/1 float ``attention_mask``) with fully
  padded batch rows;
* each mask applied as a boolean (``masked_fill`` positional or keyword,
  ``masked_fill_`` in place, ``where``) or as an additive term (``where(c, 0,
  fill)``, ``(1 - keep) * fill``, zeros then ``masked_fill_``, zeros then a
  boolean setitem, or a penalty subtracted, ``s - where(c, 0, -fill)``), with fill
  ``-inf``, ``finfo.min``, ``-1e9`` or ``-1e4``; an ALiBi bias added, or
  subtracted as a distance penalty, or a softcap;
* casts (scores ``.float()`` then probabilities ``.to(q.dtype)``, or
  ``softmax(dtype=float32)``), dropout with p = 0 in eval, three softmax and
  three value-product spellings;
* float32, bfloat16, float16 (whose range a -1e9 fill overflows: -1e4 instead), and float32 under
  bfloat16 autocast.

Every program is called three times; between calls the inputs change, the
padding changes, a mask buffer may be mutated (``fill_``, setitem,
``load_state_dict``, ``copy_``), and the sequence length may change so that
dynamo recompiles with symbolic shapes. Each program is optimized by the
planner's own choice (cost model), or with the reference kernel forced, so
that every site the analysis accepts is replaced and its proof exercised (the
planner may keep a small site's original code as faster), or with sdpa_cpu
forced, which must compute the site exactly or decline (``NoKernelError``, as a
forced kernel does). On every call the optimized program
must agree with eager (see ``assert_agrees``); each site must be replaced or
left alone with a reason.

Cost: ``max_examples`` is small by default so the file runs in well under 90 s
on 2 cores. Run more on demand::

    ATTNOPT_DIFFERENTIAL_EXAMPLES=500 pytest tests/passes/test_differential.py

Examples are derandomized and no example database is kept, so CI runs the same
programs every time. Shrinking is off by default (each step recompiles, and a
failure on today's code would otherwise take minutes); the failure message
prints the whole program's choices, which are already small. Set
``ATTNOPT_DIFFERENTIAL_SHRINK=1`` to shrink anyway, and
``ATTNOPT_DIFFERENTIAL_SEED=N`` to draw other programs than CI's (a long run
with a new seed explores programs that earlier long runs did not).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st

import attnopt
from attnopt.passes.plan import NoKernelError

EXAMPLES = int(os.environ.get("ATTNOPT_DIFFERENTIAL_EXAMPLES", "0"))
SHRINK = os.environ.get("ATTNOPT_DIFFERENTIAL_SHRINK", "") not in ("", "0")
SEED = os.environ.get("ATTNOPT_DIFFERENTIAL_SEED", "")
PHASES = (Phase.explicit, Phase.reuse, Phase.generate) + ((Phase.shrink,) if SHRINK else ())


def suite_settings(default_examples: int):
    chosen = settings(
        max_examples=EXAMPLES or default_examples, deadline=None, derandomize=not SEED, database=None,
        phases=PHASES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=False,
    )
    if not SEED:
        return chosen
    return lambda test: seed(int(SEED))(chosen(test))


B, H, D, MAX_N = 2, 2, 8, 16
MAX_PREFIX = 3  # keys before the first query (a prefix or cache): the buffer covers MAX_N + MAX_PREFIX positions
FILLS = {"-inf": float("-inf"), "finfo.min": None, "-1e9": -1e9, "-1e4": -1e4}  # None: finfo(scores).min
#: ``tune=False``: CPU timings would make the choice (and whether a wrong proof shows) depend on the load
PLANS = {"cost model": dict(tune=False), "reference kernel": dict(tune=False, kernel="reference"),
         "sdpa_cpu kernel": dict(tune=False, kernel="sdpa_cpu")}
BOOLEAN_APPLY = ("masked_fill", "masked_fill_kw", "masked_fill_", "where")
ADDITIVE_APPLY = ("add_where", "add_one_minus", "add_masked_fill_", "add_setitem", "sub_where")


@dataclass(frozen=True)
class Program:
    """The choices that make one attention program (printed when an example fails)."""

    dtype: str  # "float32" | "bfloat16" | "float16" | "autocast" (float32 inputs, bfloat16 autocast around it)
    score: str  # matmul | matmul_fn | einsum | bmm | baddbmm | baddbmm_kw | sdpa
    scale: str  # mul | rmul | div | torch_div | none
    scale_at: str  # scores (before the masks) | query (q scaled before the product) | after_masks
    kv: str  # mha | repeat_kv (HF's expand + reshape of one kv head) | repeat_interleave | enable_gqa (sdpa only)
    extra: str  # none | alibi (a per-head slope times the key distance, added) | alibi_sub (the same subtracted as a
    # distance penalty) | softcap (2 tanh(s / 2)), before masks
    prefix: int  # keys before the first query (0, or MAX_PREFIX: causal structures aligned bottom-right)
    upcast: str  # none | float (scores .float(), probabilities .to(q.dtype)) | softmax_dtype
    structure: str  # none | causal_tril | causal_arange | window_arange | causal_tril_ | window_triu_ | sink_setitem
    # | buffer | documents | causal_documents (a document-id input compared query against key)
    structure_apply: str
    structure_fill: str
    padding: str  # none | bool | hf_float
    padding_apply: str
    padding_fill: str
    fully_padded: bool  # the last batch row has no key at all
    dropout: str  # none | functional | module
    softmax: str  # torch | functional | method
    value: str  # matmul | matmul_fn | einsum
    lengths: tuple[int, ...]  # N (= Nq = Nk) on each call
    mutations: tuple[str, ...]  # the buffer change before each call: none | fill_true | setitem | load | copy_
    plan: str  # "cost model" (the planner's choice) | "reference kernel" | "sdpa_cpu kernel" (forced)


@st.composite
def programs(draw, dtypes):
    score = draw(st.sampled_from(["matmul", "matmul_fn", "einsum", "bmm", "baddbmm", "baddbmm_kw", "sdpa"]))
    structure = draw(st.sampled_from(["none", "causal_tril", "causal_arange", "window_arange", "causal_tril_",
                                      "window_triu_", "sink_setitem", "buffer", "documents", "causal_documents"]))
    padding = draw(st.sampled_from(["none", "bool", "hf_float"]))
    apply = st.sampled_from(BOOLEAN_APPLY + ADDITIVE_APPLY)
    structure_apply, padding_apply = draw(apply), draw(apply)
    if padding == "hf_float":  # HF's (1 - attention_mask) * fill on a float 0/1 input: additive only
        padding_apply = "add_one_minus"
    structure_fill, padding_fill = draw(st.sampled_from(list(FILLS))), draw(st.sampled_from(list(FILLS)))
    if padding_apply == "add_one_minus" and padding_fill == "-inf":
        padding_fill = "finfo.min"  # (1 - keep) * -inf is NaN where kept: not a mask anyone writes
    if structure_apply == "add_one_minus" and structure_fill == "-inf":
        structure_fill = "finfo.min"
    dynamic = draw(st.booleans())
    lengths = draw(st.sampled_from([(8, 12, 10), (6, 9, 16), (12, 8, 14)])) if dynamic else (8, 8, 8)
    mutations = ("none",) * 3
    if structure == "buffer":
        mutations = ("none", *draw(st.lists(st.sampled_from(["none", "fill_true", "setitem", "load", "copy_"]),
                                            min_size=2, max_size=2)))
    dtype = draw(st.sampled_from(dtypes))
    if dtype == "float16":  # -1e9 is beyond float16's range (masked_fill refuses it): its programs write -1e4
        structure_fill, padding_fill = (("-1e4" if f == "-1e9" else f) for f in (structure_fill, padding_fill))
    kv = draw(st.sampled_from(["mha", "repeat_kv", "repeat_interleave"] + (["enable_gqa"] if score == "sdpa" else [])))
    return Program(
        dtype=dtype, score=score,
        scale=draw(st.sampled_from(["mul", "rmul", "div", "torch_div", "none"])),
        scale_at=draw(st.sampled_from(["scores", "query", "after_masks"])), kv=kv,
        extra="none" if score == "sdpa" else draw(st.sampled_from(["none", "alibi", "alibi_sub", "softcap"])),
        prefix=draw(st.sampled_from([0, 0, MAX_PREFIX])),
        upcast=draw(st.sampled_from(["none", "float", "softmax_dtype"])),
        structure=structure, structure_apply=structure_apply, structure_fill=structure_fill,
        padding=padding, padding_apply=padding_apply, padding_fill=padding_fill,
        fully_padded=draw(st.booleans()),
        dropout=draw(st.sampled_from(["none", "functional", "module"])),
        softmax=draw(st.sampled_from(["torch", "functional", "method"])),
        value=draw(st.sampled_from(["matmul", "matmul_fn", "einsum"])),
        lengths=lengths, mutations=mutations, plan=draw(st.sampled_from(list(PLANS))),
    )


# ----------------------------------------------------------------- the program as a module
def _fill(name: str, dtype: torch.dtype) -> float:
    value = FILLS[name]
    return torch.finfo(dtype).min if value is None else value


def apply_mask(s: torch.Tensor, keep: torch.Tensor, how: str, fill_name: str) -> torch.Tensor:
    """Mask the scores ``s`` where ``keep`` is False, spelled ``how``."""
    fill = _fill(fill_name, s.dtype)
    if how == "masked_fill":
        return s.masked_fill(~keep, fill)
    if how == "masked_fill_kw":
        return s.masked_fill(mask=~keep, value=fill)
    if how == "masked_fill_":
        s.masked_fill_(~keep, fill)  # in place, the result not re-assigned
        return s
    if how == "where":
        return torch.where(keep, s, fill)
    # additive masks, in the scores' dtype (a float32 mask on bfloat16 scores would promote them)
    if how == "add_where":
        mask = torch.where(keep, torch.zeros((), dtype=s.dtype), fill)
    elif how == "add_one_minus":
        mask = (1 - keep.to(s.dtype)) * fill
    elif how == "add_masked_fill_":
        mask = torch.zeros(keep.shape, dtype=s.dtype)
        mask.masked_fill_(~keep, fill)
    elif how == "add_setitem":
        mask = torch.zeros(keep.shape, dtype=s.dtype)
        mask[~keep] = fill
    elif how == "sub_where":  # a penalty subtracted: -fill where masked (+inf for a -inf fill), s - inf = -inf
        return s - torch.where(keep, torch.zeros((), dtype=s.dtype), -fill)
    else:
        raise AssertionError(how)
    return s + mask


class Attention(nn.Module):
    """One generated program. ``reference = True`` runs it in float64 (casts to float32 become float64)."""

    def __init__(self, p: Program):
        super().__init__()
        self.p = p
        self.reference = False
        self.row_top: torch.Tensor | None = None
        self.drop = nn.Dropout(0.0)
        if p.structure == "buffer":
            size = MAX_N + MAX_PREFIX
            self.register_buffer("keep_buf", torch.ones(size, size, dtype=torch.bool).tril())

    def forward(self, q, k, v, pad, docs):
        if self.p.dtype == "autocast" and not self.reference:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.attention(q, k, v, pad, docs)
        return self.attention(q, k, v, pad, docs)

    def structure_keep(self, n: int, nk: int, docs: torch.Tensor) -> torch.Tensor | None:
        """``[Nq, Nk]`` (or ``[B, 1, Nq, Nk]``) bool; with keys before the queries (``nk - n``), causal
        structures align the last query with the last key."""
        kind, extra = self.p.structure, nk - n
        if kind == "none":
            return None
        if kind in ("documents", "causal_documents"):  # packed sequences: a query sees its own document's keys
            same = docs[:, None, extra:, None] == docs[:, None, None, :]
            return same & torch.ones(n, nk, dtype=torch.bool).tril(extra) if kind == "causal_documents" else same
        if kind == "causal_tril":
            return torch.ones(n, nk, dtype=torch.bool).tril(extra)
        if kind == "causal_arange":
            i, j = torch.arange(n) + extra, torch.arange(nk)
            return j[None, :] <= i[:, None]
        if kind == "window_arange":
            i, j = torch.arange(n) + extra, torch.arange(nk)
            dist = i[:, None] - j[None, :]
            return (dist >= 0) & (dist < 3)
        if kind == "causal_tril_":
            m = torch.ones(n, nk, dtype=torch.bool)
            m.tril_(extra)
            return m
        if kind == "window_triu_":
            m = torch.ones(n, nk, dtype=torch.bool).tril(extra)
            m.triu_(extra - 2)
            return m
        if kind == "sink_setitem":
            m = torch.ones(n, nk, dtype=torch.bool).tril(extra)
            m[4:, :2] = False  # late queries lose the first two keys
            return m
        if kind == "buffer":  # nanoGPT's slice of its tril buffer, rows of the last queries
            return self.keep_buf[extra:nk, :nk]
        raise AssertionError(kind)

    def padding_keep(self, pad) -> torch.Tensor | None:  # [B, 1, 1, Nk] bool
        if self.p.padding == "bool":
            return pad[:, None, None, :]
        return None

    def scaled(self, s: torch.Tensor, c: float) -> torch.Tensor:
        if self.p.scale == "mul":
            return s * c
        if self.p.scale == "rmul":
            return c * s
        if self.p.scale == "div":
            return s / (1 / c)
        if self.p.scale == "torch_div":
            return torch.div(s, 1 / c)
        return s

    def attention(self, q, k, v, pad, docs):
        p = self.p
        b, h, n, d = q.shape
        nk = k.shape[-2]
        wide = torch.float64 if self.reference else torch.float32
        c = 0.25  # a power of two: s * c, s / (1 / c) and torch.div(s, 1 / c) round alike

        structure, padding = self.structure_keep(n, nk, docs), self.padding_keep(pad)
        if p.kv in ("repeat_kv", "repeat_interleave"):  # k, v come with one head per group of h
            group = h // k.shape[1]
            if p.kv == "repeat_kv":
                k, v = (t[:, :, None].expand(b, t.shape[1], group, nk, d).reshape(b, h, nk, d) for t in (k, v))
            else:
                k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
        if p.score == "sdpa":
            return self.sdpa(q, k, v, pad, structure, padding, c)
        if p.scale_at == "query":
            q = self.scaled(q, c)

        if p.score == "matmul":
            s = q @ k.transpose(-1, -2)
        elif p.score == "matmul_fn":
            s = torch.matmul(q, k.transpose(-2, -1))
        elif p.score == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:  # [B*H, N, D] products
            q3, k3 = q.reshape(b * h, n, d), k.reshape(b * h, nk, d)
            if p.score == "bmm":
                s = torch.bmm(q3, k3.transpose(1, 2))
            elif p.score == "baddbmm":
                s = torch.baddbmm(torch.zeros(b * h, n, nk, dtype=q.dtype), q3, k3.transpose(1, 2))
            else:  # BLOOM's keywords; alpha scales the product, beta the (zero) base
                s = torch.zeros(b * h, n, nk, dtype=q.dtype).baddbmm(batch1=q3, batch2=k3.transpose(1, 2),
                                                                     beta=1.0, alpha=0.5)
            s = s.view(b, h, n, nk)

        if p.scale_at == "scores":
            s = self.scaled(s, c)

        if p.upcast == "float":
            s = s.double() if self.reference else s.float()
        if p.extra in ("alibi", "alibi_sub"):
            i, j = torch.arange(n) + (nk - n), torch.arange(nk)
            slopes = torch.tensor([0.5, 0.25], dtype=s.dtype)[:h]
            if p.extra == "alibi":
                s = s + (j[None, :] - i[:, None]).to(s.dtype) * slopes[:, None, None]
            else:  # the same bias written as a distance penalty
                s = s - (i[:, None] - j[None, :]).to(s.dtype) * slopes[:, None, None]
        elif p.extra == "softcap":
            s = 2.0 * torch.tanh(s / 2.0)

        if structure is not None:
            s = apply_mask(s, structure, p.structure_apply, p.structure_fill)
        if padding is not None:
            s = apply_mask(s, padding, p.padding_apply, p.padding_fill)
        elif p.padding == "hf_float":
            s = s + (1.0 - pad[:, None, None, :].to(s.dtype)) * _fill(p.padding_fill, s.dtype)
        if p.scale_at == "after_masks":  # the fills scaled too (c < 1: finfo.min stays finite)
            s = self.scaled(s, c)

        if self.reference:
            self.row_top = s.detach().amax(-1)  # each row's largest logit, for ``logit_rounding``
        if p.upcast == "softmax_dtype":
            probs = F.softmax(s, dim=-1, dtype=wide).to(q.dtype)
        elif p.softmax == "torch":
            probs = torch.softmax(s, -1)
        elif p.softmax == "functional":
            probs = F.softmax(s, dim=-1)
        else:
            probs = s.softmax(-1)
        if p.upcast == "float":
            probs = probs.to(q.dtype)

        if p.dropout == "functional":
            probs = F.dropout(probs, p=0.0, training=self.training)
        elif p.dropout == "module":
            probs = self.drop(probs)

        if p.value == "matmul":
            return probs @ v
        if p.value == "matmul_fn":
            return torch.matmul(probs, v)
        return torch.einsum("bhqk,bhkd->bhqd", probs, v)

    def sdpa(self, q, k, v, pad, structure, padding, c):
        p = self.p
        keep = structure
        if padding is not None:
            keep = padding if keep is None else keep & padding
        mask = None
        if keep is not None and p.structure_apply in BOOLEAN_APPLY:
            mask = keep
        elif keep is not None:
            mask = torch.where(keep, torch.zeros((), dtype=q.dtype), _fill(p.structure_fill, q.dtype))
        if p.padding == "hf_float":
            extra = (1.0 - pad[:, None, None, :].to(q.dtype)) * _fill(p.padding_fill, q.dtype)
            if mask is None:
                mask = extra
            elif mask.dtype == torch.bool:
                mask = torch.where(mask, extra, float("-inf"))
            else:
                mask = mask + extra
        scale = None if p.scale == "none" else c
        if p.kv == "enable_gqa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale)


# ----------------------------------------------------------------- calls and state changes
def call_inputs(p: Program, i: int):
    """The inputs of call ``i``: fresh q, k, v and padding (float32, bfloat16 or float16)."""
    n = p.lengths[i]
    g = torch.Generator().manual_seed(1000 * i + n)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(p.dtype, torch.float32)
    kv_heads = H if p.kv == "mha" else H // 2
    q = torch.randn(B, H, n, D, generator=g).to(dtype)
    n += p.prefix  # keys (and their padding and document ids) cover the prefix too
    k, v = (torch.randn(B, kv_heads, n, D, generator=g).to(dtype) for _ in range(2))
    keep = torch.ones(B, n, dtype=torch.bool)
    keep[0, n - 1 - i:] = False  # right padding, longer on every call
    if p.fully_padded:
        keep[B - 1] = False
    else:
        keep[B - 1, : 2 + i] = False  # left padding: the first queries of a causal program see no key
    pad = keep.to(dtype) if p.padding == "hf_float" else keep
    # packed documents: ids rising along each row, a new document every 2 to 5 positions (the same on every call)
    starts = torch.rand(B, n, generator=torch.Generator().manual_seed(7)) < 0.35
    docs = starts.long().cumsum(-1)
    return q, k, v, pad, docs


def mutate(module: Attention, how: str, i: int) -> None:
    """Change the mask buffer in place before call ``i`` (the same change to eager and optimized)."""
    if how == "none":
        return
    size = MAX_N + MAX_PREFIX
    pattern = torch.rand(size, size, generator=torch.Generator().manual_seed(i)) < 0.6
    if how == "fill_true":
        module.keep_buf.fill_(True)
    elif how == "setitem":
        module.keep_buf[:, 0] = False
        module.keep_buf[2:5] = True
    elif how == "load":
        module.load_state_dict({"keep_buf": pattern})
    elif how == "copy_":
        module.keep_buf.copy_(pattern.tril())
    else:
        raise AssertionError(how)


def reference(eager: Attention, args) -> torch.Tensor:
    """The same program in float64 on the same (exactly representable) inputs."""
    eager.reference, eager.row_top = True, None
    try:
        return eager(*(a.double() if a.is_floating_point() else a for a in args))
    finally:
        eager.reference = False


def fill_rounding(p: Program) -> float:
    """How far float32 rounding may move an output where scores sit at a program's moderate finite fill (-1e4): a
    row whose visible keys all carry it keeps softmax(s - 1e4), whose scores round at 1e4 (float32 ulp 1e-3) in
    whatever order eager or a kernel adds the terms; each add rounds by half an ulp, and the output moves by about
    that times twice the largest value (8 keys of unit normal values). Fills of -1e9 and beyond absorb the scores
    entirely (uniform rows), and in half precision eager's own error at -1e4 is larger than this."""
    moderate = [abs(v) for name in (p.structure_fill, p.padding_fill)
                if (v := FILLS[name]) is not None and math.isfinite(v) and abs(v) < 1e6]
    if not moderate or (p.dtype != "float32" and p.upcast == "none"):
        return 0.0
    return 8 * max(moderate) * torch.finfo(torch.float32).eps


def logit_rounding(p: Program, row_top: torch.Tensor | None) -> torch.Tensor | float:
    """Per row, how far half-precision rounding may move an output whose logits sit at a moderate fill: where a
    row's visible keys all carry a -1e4 fill (a causal buffer of -1e4 over every key its padding leaves), eager
    adds it to half-precision scores that then round at 1e4 (float16 ulp 8, bfloat16 64). The row's probabilities
    are then set by rounding, in whatever order eager or a kernel adds the terms: eager's own error is anything
    from 0 to O(1) (0.16 against a kernel's 0.78, float16, found by a long run), so four times it bounds nothing.
    Such rows (largest float64 logit of magnitude 1e3 or more) get 8 x that magnitude x the scores' epsilon: no
    bound in half precision, where only their NaN pattern is compared. Other rows get nothing, and so do programs
    that add their masks to float32 scores (``upcast="float"``; ``softmax_dtype`` upcasts only in the softmax)."""
    if row_top is None or p.dtype == "float32" or p.upcast == "float":
        return 0.0
    eps = torch.finfo(torch.float16 if p.dtype == "float16" else torch.bfloat16).eps
    top = row_top.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return torch.where(top >= 1e3, 8 * top * eps, 0.0)


def assert_agrees(got, expected, exact, *, atol: float, rtol: float, what: str, rounding: float = 0.0) -> None:
    """The optimized output agrees with eager's, row by row (a row is one query's softmax).

    NaN exactly where eager has NaN. Then each row either equals eager's within
    ``atol + rtol * |eager|``, or is about as accurate as eager's: its error
    against the float64 evaluation of the same program is at most four times eager's
    error on that row plus ``atol + rtol * |exact|``. The second clause admits a
    kernel that rounds differently from eager (bfloat16 scores added to a mask
    at a different point, a -1e4 fill whose sum eager rounds in float32; two -1e4
    masks added to the scores one by one in eager and as one -2e4 term by the
    kernel: errors 2.5e-4 and 5.1e-4 on a row whose scores round at 2e4) and
    nothing that changes what the row computes: a wrong mask, scale or fill
    moves a row by O(1), far beyond both eager's rounding and the slack. In
    float32 ``atol = rtol = 1e-5`` (plus ``rounding``, ``fill_rounding``'s allowance for
    scores at a -1e4 fill); in bfloat16 ``atol = 1e-2`` and ``rtol =
    2**-7`` (one bfloat16 ulp, about the rounding of the output itself).
    """
    assert got.dtype == expected.dtype and got.shape == expected.shape, (what, got.dtype, expected.dtype)
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN rows differ: eager {nan.any(-1).nonzero().tolist()}, " \
                                          f"optimized {got.isnan().any(-1).nonzero().tolist()}"
    got, expected, exact = got.double(), expected.double(), exact.double()
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    near = ((got - expected).abs() <= atol + rtol * expected.abs()) | nan
    err = torch.where(nan, 0.0, (got - exact).abs().nan_to_num(nan=inf))
    eager_err = torch.where(nan, 0.0, (expected - exact).abs().nan_to_num(nan=inf))
    rounding = torch.as_tensor(rounding, dtype=torch.float64)
    rounding = rounding[..., None] if rounding.dim() else rounding  # per row: over the row's values
    slack = atol + rounding + rtol * exact.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    accurate = err.amax(-1) <= 4 * eager_err.amax(-1) + slack.amax(-1)
    bad = ~(near.all(-1) | accurate)
    if bad.any():
        rows = bad.nonzero().tolist()
        worst = (got - expected).abs().nan_to_num(nan=0.0).amax().item()
        raise AssertionError(f"{what}: {len(rows)} rows differ from eager (first {rows[:4]}), max |diff| {worst:.4g}; "
                             f"error vs float64 on the first: optimized {err[tuple(rows[0])].amax().item():.4g}, "
                             f"eager {eager_err[tuple(rows[0])].amax().item():.4g}")


def _with_grads(module: nn.Module, args, grad_seed: int, double: bool = False):
    """``module``'s output on fresh leaf copies of ``args`` (float64 ones with ``double``) and the gradients of q, k
    and v for a fixed random output gradient."""
    leaves = [(a.double() if double and a.is_floating_point() else a.clone()) for a in args]
    qkv = leaves[:3]
    for t in qkv:
        t.requires_grad_(True)
    out = module(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    return out.detach(), torch.autograd.grad(out, qkv, grad)


def run_program(p: Program, grads: bool = False) -> None:
    """Optimize program ``p`` and compare it with eager on each call; ``grads``: the gradients of q, k and v too."""
    torch._dynamo.reset()  # a fresh cache per program: they share one forward, whose recompile limit would hit
    eager = Attention(p).eval()
    optimized = attnopt.optimize(copy.deepcopy(eager), **PLANS[p.plan])
    optimized.eval()
    half = p.dtype != "float32"
    atol, rtol = (1e-2, 2.0**-7) if half else (1e-5, 1e-5)
    for i in range(len(p.lengths)):
        mutate(eager, p.mutations[i], i)
        mutate(optimized, p.mutations[i], i)
        args = call_inputs(p, i)
        if grads:
            expected, expected_grads = _with_grads(eager, args, i)
        else:
            expected = eager(*args)
        try:
            got, got_grads = _with_grads(optimized, args, i) if grads else (optimized(*args), ())
        except NoKernelError as err:
            # the reference kernel takes every site but one whose gradients no kernel gives (plan.py's
            # original_gradients_unmatched: an SDPA call on the CPU in training with an additive mask)
            if PLANS[p.plan].get("kernel") in (None, "reference") and "no kernel reproduces" not in str(err):
                raise
            return  # the forced kernel declines this program: nothing to compare
        sites = "; ".join(f"{s.node}: {s.kernel + ' ' + '+'.join(s.mask_terms) if s.replaced else s.reason}"
                          for s in optimized.attnopt_report.sites)
        what = f"{p}\ncall {i} (N={p.lengths[i]}); sites: {sites}"
        exact = reference(eager, args)
        assert_agrees(got, expected, exact, atol=atol, rtol=rtol, what=what,
                      rounding=fill_rounding(p) + logit_rounding(p, eager.row_top))
        if grads and not expected.isnan().any():
            # (rows eager leaves NaN are compared forward only: where an added -inf empties a row, eager's
            # backward spreads NaN to dq and dk of the head too; the kernels spread it to dv alone, README)
            eager.reference = True
            try:
                _, exact_grads = _with_grads(eager, args, i, double=True)
            finally:
                eager.reference = False
            for name, g, e, x in zip("qkv", got_grads, expected_grads, exact_grads):
                assert_agrees(g, e, x, atol=atol, rtol=rtol, what=f"{what}; d{name}", rounding=fill_rounding(p))
    report = optimized.attnopt_report
    assert report.sites, f"{p}: no site in the report"
    for site in report.sites:
        assert site.replaced or site.reason, f"{p}: left alone without a reason: {site}"


# ----------------------------------------------------------------- the tests
def _program(**changes) -> Program:
    """A plain program (scores * c, softmax, @ v, no mask) with ``changes``: the explicit examples below."""
    base = dict(dtype="float32", score="matmul", scale="mul", scale_at="scores", kv="mha", extra="none", prefix=0,
                upcast="none", structure="none", structure_apply="masked_fill", structure_fill="-inf", padding="none",
                padding_apply="masked_fill", padding_fill="-inf", fully_padded=False, dropout="none", softmax="torch",
                value="matmul", lengths=(8, 8, 8), mutations=("none",) * 3, plan="reference kernel")
    return Program(**{**base, **changes})


# Programs the generated search found (minimized by hand), run on every CI pass:
# two -inf additive masks built in place (a dense mask to the analysis) leave rows with no visible key;
# eager gives NaN there, sdpa_cpu gives finite rows instead of declining
NAN_ROWS_OF_TWO_NEG_INF_MASKS = _program(structure="causal_tril_", structure_apply="add_masked_fill_", padding="bool",
                                         padding_apply="add_masked_fill_", plan="sdpa_cpu kernel")
# two finfo.min additive masks (a buffer's structure, then the padding), neither holding -inf: where both mask a
# key their sum overflows to -inf, so a fully padded row the structure also masks entirely is NaN in eager; the
# kernels took "no -inf in either term" as "no row without a key" and skipped its fill
NAN_ROWS_OF_TWO_FINITE_MASKS = _program(structure="buffer", structure_apply="add_one_minus", structure_fill="finfo.min",
                                        padding="bool", padding_apply="add_setitem", padding_fill="finfo.min",
                                        fully_padded=True, mutations=("none", "setitem", "none"))
# float16: baddbmm's zero base is added to the half-precision scores, two finfo.min masks to the upcast ones; the
# kernels added the masks' sum first and the base after, at half precision, where float32's finfo.min is -inf
HALF_TERM_BEFORE_UPCAST_TERMS = _program(dtype="float16", score="baddbmm", upcast="float", structure="window_triu_",
                                         structure_apply="add_one_minus", structure_fill="finfo.min", padding="bool",
                                         padding_apply="add_one_minus", padding_fill="finfo.min", fully_padded=True,
                                         lengths=(8, 12, 10))
# SDPA on the CPU with a finfo.min additive mask, in training: ATen's backward gives the rows it hides Nk times the
# softmax's gradients; the reference kernel forced took the call and gave the softmax's (now it declines)
SDPA_CPU_GRADIENTS_OF_HIDDEN_ROWS = _program(score="sdpa", structure="window_arange",
                                             structure_apply="add_masked_fill_", structure_fill="finfo.min",
                                             padding="bool", padding_apply="add_where", padding_fill="finfo.min",
                                             fully_padded=True)
# bfloat16 autocast, scores upcast with .float(), a -1e4 additive mask: eager adds it in float32, where rows with
# no visible key keep softmax(s); added at bfloat16 precision they become uniform
AUTOCAST_FINITE_ADDITIVE_FILL = _program(dtype="autocast", upcast="float", padding="bool",
                                         padding_apply="add_one_minus", padding_fill="-1e4", fully_padded=True)

# the scores divided after two finfo.min masks (a buffer's, added in place, and the padding's): eager's sum overflows
# to -inf before the division, so a fully padded row the buffer also masks is NaN; the kernels took the scale into
# each term (finfo.min / 4 twice: finite) and gave the row a uniform average (now left alone)
SCALED_AFTER_TWO_FINITE_MASKS = _program(score="baddbmm", scale="div", scale_at="after_masks", structure="buffer",
                                         structure_apply="add_masked_fill_", structure_fill="finfo.min", padding="bool",
                                         padding_apply="add_one_minus", padding_fill="finfo.min", fully_padded=True,
                                         mutations=("none", "copy_", "none"))
# float16 scores with a -1e4 causal buffer over every key that left padding (finfo.min) leaves to query 2 of the
# second row: the row's scores round at 1e4 (ulp 8); eager's error against float64 0.16, the kernel's 0.78
HALF_ROW_ROUNDED_AT_A_MODERATE_FILL = _program(dtype="float16", score="bmm", extra="alibi", structure="buffer",
                                               structure_apply="add_setitem", structure_fill="-1e4",
                                               padding="hf_float", padding_apply="add_one_minus",
                                               padding_fill="finfo.min", softmax="method", value="einsum",
                                               mutations=("none", "copy_", "copy_"))
# two -1e4 additive masks: eager adds them to the scores one by one, sdpa_cpu takes their sum as one mask; a row
# both mask rounds its scores at 2e4 either way (error against float64: eager 2.5e-4, the kernel 5.1e-4)
TWO_FINITE_MASKS_ROUNDED_AT_2E4 = _program(score="matmul", scale="div", kv="repeat_kv", upcast="softmax_dtype",
                                           structure="buffer", structure_apply="add_setitem", structure_fill="-1e4",
                                           padding="bool", padding_apply="add_setitem", padding_fill="-1e4",
                                           fully_padded=True, dropout="module", softmax="method", value="einsum",
                                           mutations=("none", "copy_", "copy_"), plan="cost model")


@suite_settings(default_examples=60)
@given(programs(["float32"]))
@example(NAN_ROWS_OF_TWO_NEG_INF_MASKS)
@example(NAN_ROWS_OF_TWO_FINITE_MASKS)
@example(SCALED_AFTER_TWO_FINITE_MASKS)
@example(TWO_FINITE_MASKS_ROUNDED_AT_2E4)
def test_float32_programs_agree_with_eager(program):
    run_program(program)


@suite_settings(default_examples=40)
@given(programs(["bfloat16", "autocast"]))
@example(AUTOCAST_FINITE_ADDITIVE_FILL)
def test_bfloat16_programs_agree_with_eager(program):
    run_program(program)


@suite_settings(default_examples=20)
@given(programs(["float16"]))
@example(HALF_TERM_BEFORE_UPCAST_TERMS)
@example(HALF_ROW_ROUNDED_AT_A_MODERATE_FILL)
def test_float16_programs_agree_with_eager(program):
    run_program(program)


@suite_settings(default_examples=20)
@given(programs(["float32"]))
@example(SDPA_CPU_GRADIENTS_OF_HIDDEN_ROWS)
def test_float32_gradients_agree_with_eager(program):
    """The same programs under autograd: dq, dk and dv of a random output gradient (programs whose output has no
    NaN row)."""
    run_program(program, grads=True)
