"""Rows with no visible key: what the original model computed there, forward and backward.

A kernel computes the visible part of each row and leaves a row with no
visible key as 0 with ``lse = -inf``. These helpers, shared by every kernel,
then give such rows what the model being replaced gave (``spec.fill``):

* ``Fill.NEG_INF`` — NaN (softmax of ``-inf`` everywhere); in the backward the
  NaN probabilities spread NaN over dV of every key of the head.
* ``Fill.NEG_INF_ADDED`` — the same, from ``-inf`` added to the scores: the NaN
  scores' gradient also passes the addition, so the row's dq and every key's
  dk of the head are NaN too.
* ``Fill.SAFE`` — 0, and no gradient (SDPA's safe softmax).
* ``Fill.FINITE`` — the masked scores were *replaced* by a finite minimum: the
  softmax is uniform, out = mean(v); dV gets dO / Nk on every key; the scores
  get no gradient (``masked_fill``'s backward zeroes it).
* ``Fill.FINITE_ADDED`` — a finite minimum was *added* (an additive
  ``finfo.min`` mask): the same uniform output, but autograd differentiates
  the addition as the identity, so q, k and an additive bias receive the
  gradient of a softmax that is uniform over all keys:
  ``dS_j = (dO . v_j - dO . mean(v)) / Nk``.
* ``Fill.FINITE_REPLACED_ADDED`` — the band replaced by ``finfo.min``, the key
  padding adding it: on a row with no visible key the band's keys and the kept
  keys are disjoint, and each scores ``finfo.min`` (the keys masked by both are
  ``-inf``). The softmax is uniform over their union ``U``: out = mean of v over
  ``U`` (NaN when ``U`` is empty); dV gets ``dO / |U|`` on ``U``; the scores get
  ``dS_j = (dO . v_j - mean_U(dO . v)) / |U|`` on the band's keys only, since
  ``where`` sends nothing to the scores it replaced.

The backward corrections are PyTorch ops. A row uniform over all keys (an
added fill, no softcap, no term gradient asked for) gets its dq and dk from
two ``[D, Dv]`` products per key head, whatever the number of such rows (a
left-padded batch row in training has thousands); the others are computed
for those rows only, in blocks of empty rows in every head at once
(``row_blocks``, working tensors of at most ``ROW_ELEMENTS`` elements): one
block for every batch row with such rows on a GPU, one per batch row
elsewhere (``BATCH_ROWS_PER_BLOCK``), so the ops do not grow with the heads.

With dropout (``spec.dropout_p > 0``) the original drops out the uniform row of
a finite fill like any other: ``out = sum_j z_j v_j / |U|`` over the keys ``U``
the row is uniform over, ``z_j`` 0 or ``1 / (1 - p)``. The fills draw ``z`` for
those rows only, as a function of the call's seed and the (batch, head, row,
key) index alone (``_dropout_keep``), so that the backward regenerates it
whatever row chunks the forward took; the gradients are those of the same
dropped-out row. Such calls look for empty rows with one host sync.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

import torch.nn.functional as F

from .spec import NAN_FILLS, AttentionSpec, Fill, band_keep, key_padding_keep, kept_scale
from .term_cache import TermCache

FINITE_FILLS = (Fill.FINITE, Fill.FINITE_ADDED)
#: fills whose rows are a (uniform) softmax that dropout then drops out, as any other row
DROPPED_FILLS = (Fill.FINITE, Fill.FINITE_ADDED, Fill.FINITE_REPLACED_ADDED)
#: device types whose row-wise fills (gradients, dropped rows) run in ``triton_fill_rows``' kernels where they take
#: the call: 2.7-3.9x faster than the PyTorch blocks on an H200, 6 launches against about 100
#: (``benchmarks/results/fill_rows.md``); ``ATTNOPT_FILL_KERNEL=0`` keeps the PyTorch blocks. The CPU's are
#: PyTorch's (the tests run the kernels under the interpreter by adding ``"cpu"``)
ROW_KERNEL = {"cuda"} if os.environ.get("ATTNOPT_FILL_KERNEL", "1") != "0" else set()
#: elements of the largest working tensor of a block of empty rows handled row by row (dropout, a softcap, term
#: gradients, a band's union): ``[heads, rows, Nk]`` and ``[heads, rows, D]``, 32 MiB in float32 (the dropout
#: hash's int64 temporaries 64 MiB)
ROW_ELEMENTS = 1 << 23


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_rows_or_keys(spec: AttentionSpec) -> bool:
    """Whether the call has no query row or no key (Nq = 0, Nk = 0, or no batch row or head): its output is
    empty or 0 on every row whatever the fill (``softmax(s) @ v`` sums over no key), and no kernel is run."""
    return spec.q_len == 0 or spec.kv_len == 0 or spec.batch * spec.q_heads == 0


def output_without_rows_or_keys(q: torch.Tensor, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a call ``no_rows_or_keys`` holds for: rows of 0 (or none), lse -inf."""
    out = q.new_zeros((spec.batch, spec.q_heads, spec.q_len, spec.v_head_dim))
    return out, torch.full(out.shape[:-1], float("-inf"), dtype=_compute_dtype(q.dtype), device=q.device)


def grads_without_rows_or_keys(q, k, v, spec: AttentionSpec, needs_bias_grad: bool, needs_mask_grad: bool):
    """``(dq, dk, dv, dbias, dmask)`` of such a call: its output is constant (0) or empty, so all are 0."""
    return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
            torch.zeros_like(spec.bias) if needs_bias_grad else None,
            torch.zeros_like(spec.mask) if needs_mask_grad else None)


def fill_empty_rows(out: torch.Tensor, empty: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                    first_row: int = 0, seed: int = 0, checked: bool = False) -> torch.Tensor:
    """``out [B, Hq, n, Dv]`` with rows where ``empty [B, Hq, n]`` replaced as ``spec.fill`` says: query rows
    ``first_row .. first_row + n - 1`` of the spec (a kernel that works on row chunks passes each chunk).
    ``seed``: the call's dropout seed, which a finite fill with dropout draws its row's dropout from.
    ``checked``: the caller has already asked ``known_empty_rows`` of these terms, which did not say False.

    With no key at all (``Nk = 0``) every row is 0 whatever the fill: the original's ``softmax(s) @ v`` sums
    over no key."""
    if spec.dropout_p > 0.0 and spec.fill in DROPPED_FILLS and spec.kv_len > 0:
        # finding the rows syncs with the host: once per padding tensor where the padding alone decides them
        if known_empty_rows(spec) is False:
            return out
        if v.device.type in ROW_KERNEL:
            from . import triton_fill_rows  # imports this module

            if triton_fill_rows.supported(spec, v, False, False):
                return triton_fill_rows.dropped_rows(out, empty, v, spec, first_row, _seeded(seed))
        return _dropped_uniform_rows(out, empty, v, spec, first_row, seed)
    if not checked and known_empty_rows(spec) is False:  # every row sees a key (found once per padding tensor)
        return out
    if spec.fill == Fill.SAFE or spec.kv_len == 0:
        return _where_empty(empty, torch.zeros((), dtype=out.dtype, device=out.device), out)
    if spec.fill in NAN_FILLS:
        return _where_empty(empty, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
    if spec.fill == Fill.FINITE_REPLACED_ADDED:
        mean = _mean_over_union(v, spec, first_row, out.shape[2])  # [B, Hkv, n, Dv]
        return _where_empty(empty, mean[:, :, None].to(out.dtype), out, spec.kv_heads)
    # every score is the same finite minimum: softmax is uniform over all keys. The mean is computed
    # whether or not a row needs it: O(Nk Dv) beside the attention's O(Nq Nk D), and no host sync
    mean_v = v.mean(dim=2, dtype=_compute_dtype(v.dtype))  # [B, Hkv, Dv], float64 for float64 inputs; no copy of v
    return _where_empty(empty, mean_v[:, :, None, None].to(out.dtype), out, spec.kv_heads)  # [B, Hkv, 1, 1, Dv]


def _where_empty(empty: torch.Tensor, value: torch.Tensor, out: torch.Tensor, kv_heads: int = 1) -> torch.Tensor:
    """``value`` on the rows of ``out [B, Hq, n, Dv]`` that ``empty [B, Hq, n]`` marks, ``out`` elsewhere, in
    ``out``'s memory layout (a kernel's output laid out like the queries stays so: an HF layer's reshape of it is
    a view). ``value`` (in ``out``'s dtype) broadcasts to ``[B, kv_heads, G, n, Dv]``: a key head's value serves
    its ``G`` query heads without a copy per head. Under autograd (a kernel's differentiable recomputation), where
    ``out=`` is not allowed, torch's own layout."""
    rows = empty.unflatten(1, (kv_heads, -1))[..., None]  # [B, Hkv, G, n, 1]
    grouped = out.unflatten(1, (kv_heads, -1))  # [B, Hkv, G, n, Dv], a view
    if torch.is_grad_enabled() and (out.requires_grad or value.requires_grad):
        return torch.where(rows, value, grouped).flatten(1, 2)
    filled = torch.empty_like(out)
    torch.where(rows, value, grouped, out=filled.unflatten(1, (kv_heads, -1)))
    return filled


#: per key-padding tensor (and band and shapes): whether a call with those terms alone has a row with no visible
#: key. The layers of a forward share the padding tensor, and the backward the forward's: one host sync for all.
#: Most padded batches leave every row a key (right padding; a left-padded decode step): their calls then fill
#: nothing, on the host's word, instead of computing each row's fill on the device and keeping none of it
_EMPTY_ROWS = TermCache(8, without_terms=False)
#: per additive term tensor: its lowest value, a float (-inf, or NaN, where it holds one). A term whose values are
#: all finite cannot empty a row alone: the row's log-sum-exp stays finite, however low it pushes the scores. Two
#: terms can: two ``finfo.min`` masks add up to -inf where both mask, so their lowest values must sum to a finite
#: number too
_LOWEST = TermCache(8, without_terms=False)


def known_empty_rows(spec: AttentionSpec, find: bool = True) -> bool | None:
    """Whether some row of a call sees no key, for a call whose terms are a band, key padding and additive terms
    (bias, float mask): found once per term tensor (one host sync each; versions counted, ``TermCache``) and kept
    for every call that shares them: the layers of a forward, and its backward. Additive terms without -inf whose
    lowest values add up to a finite number (``_terms_stay_finite``) empty no row, so the band and the padding
    decide. None for other calls (documents, a boolean mask, an additive term with -inf, two terms whose sum may
    overflow to -inf), which look at their rows themselves on the device. ``find=False`` only looks the answer up.

    None while a CUDA graph is captured, found or not: nothing may sync there, and a replay runs on whatever
    terms its inputs then hold (an in-place write bumps the version, but a replay reads no version), so the
    captured call fills its rows on the device. None too for terms the cache cannot keep (inference-mode
    tensors, a bias that requires grad): finding out would be one host sync per call, per layer."""
    kp = spec.key_padding
    additive = [t for t in (spec.bias, spec.mask) if t is not None]
    if spec.q_doc is not None or spec.kv_doc is not None or any(t.dtype == torch.bool for t in additive):
        return None
    if kp is None and not additive:
        return None
    tensors = [kp, *additive] if kp is not None else additive
    if not _EMPTY_ROWS.keeps(tensors):  # nor while a CUDA graph is captured: the cache then keeps nothing
        return None
    if additive and not _terms_stay_finite(spec, additive, find):
        return None
    if kp is None:  # the band alone: static, no sync
        return False if not spec.rows_may_be_empty(additive=False) else None
    static = (spec.batch, spec.q_len, spec.kv_len, spec.band(), spec.diagonal_offset)
    if not find:
        return _EMPTY_ROWS.peek([kp], static)
    return _EMPTY_ROWS.get([kp], static, lambda: _any_row_without_keys(spec))


def _terms_stay_finite(spec: AttentionSpec, additive: list[torch.Tensor], find: bool) -> bool:
    """Whether the additive terms cannot make a score -inf: each one's lowest value finite (found once per term
    tensor, ``_LOWEST``) and, with more than one term, their sum too, in the narrowest of the dtypes they and the
    scores are added in (float16's range is 65504: two of its ``finfo.min`` masks overflow it). Scores of
    magnitude near that range are left aside: a single ``finfo.min`` mask would overflow them too."""
    lows = [_LOWEST.peek([term], ()) if not find else _LOWEST.get([term], (), lambda term=term: _lowest(term))
            for term in additive]
    if any(low is None or not math.isfinite(low) for low in lows):
        return False
    if len(lows) == 1:
        return True
    narrowest = min(torch.finfo(t).max for t in (spec.dtype, *(term.dtype for term in additive)) if t.is_floating_point)
    return sum(lows) > -narrowest


def _lowest(term: torch.Tensor) -> float:
    """The term's lowest value (one host sync); 0 for an empty term (no key to lower)."""
    return float(term.min()) if term.numel() else 0.0


def _any_row_without_keys(spec: AttentionSpec) -> bool:
    """Whether the band and the key padding leave some row no key (one host sync)."""
    return bool(rows_without_keys(spec).any())


def rows_without_keys(spec: AttentionSpec) -> torch.Tensor:
    """``[B or 1, Nq]``: the rows that the band and the key padding leave no key, each row's kept keys counted from
    prefix sums of the padding over its band's ends."""
    keep = key_padding_keep(spec.key_padding, spec.kv_len)  # [B or 1, Nk]
    prefix = F.pad(keep.to(torch.int32).cumsum(-1), (1, 0))  # [B, Nk + 1]
    start, end = _band_ends(spec, torch.arange(spec.q_len, device=keep.device))
    return (prefix[:, end] - prefix[:, start]) == 0


def empty_row_grads(q, k, v, grad_out, empty, spec: AttentionSpec, needs_bias_grad: bool = False,
                    needs_mask_grad: bool = False, seed: int = 0):
    """Gradient contributions of rows with no visible key: ``(dq, dk, dv, dbias, dmask)``, each or None.

    In float32 (float64 for float64 inputs). ``seed``: the forward's, for a finite fill with dropout.

    Add them to a kernel's gradients, which count such rows as contributing nothing.
    """
    if spec.fill == Fill.SAFE or spec.kv_len == 0 or known_empty_rows(spec) is False:  # Nk = 0: rows of constant 0
        return None, None, None, None, None
    if not bool(empty.any()):
        return None, None, None, None, None
    if spec.fill in NAN_FILLS:
        nan_heads = empty.reshape(spec.batch, spec.kv_heads, spec.group_size, -1).any(-1).any(-1)[:, :, None, None]
        zeros = torch.zeros(v.shape, dtype=_compute_dtype(v.dtype), device=v.device)
        dv = torch.where(nan_heads, float("nan"), zeros)
        if spec.fill == Fill.NEG_INF:
            return None, None, dv, None, None
        # added -inf: the row's NaN scores' gradient passes the addition, to its query, every key of its head and
        # the additive terms added to its scores
        dq = torch.where(empty[..., None], float("nan"), torch.zeros(q.shape, dtype=zeros.dtype, device=q.device))
        dk = torch.where(nan_heads, float("nan"), torch.zeros(k.shape, dtype=zeros.dtype, device=k.device))
        terms = [_nan_rows_of(term, empty, zeros.dtype) if needed and term is not None else None
                 for term, needed in ((spec.bias, needs_bias_grad), (spec.mask, needs_mask_grad))]
        return dq, dk, dv, *terms
    if row_wise_grads(spec, needs_bias_grad, needs_mask_grad):
        dropped = spec.dropout_p > 0.0 and spec.fill in DROPPED_FILLS
        if q.device.type in ROW_KERNEL:
            from . import triton_fill_rows  # imports this module

            if triton_fill_rows.supported(spec, q, needs_bias_grad, needs_mask_grad):
                dq, dk, dv = triton_fill_rows.row_grads(q, k, v, grad_out, empty, spec, seed if dropped else None)
                return dq, dk, dv, None, None
        return _row_grads(q, k, v, grad_out, empty, spec, seed if dropped else None, needs_bias_grad, needs_mask_grad)
    dv = _uniform_value_grad(v, grad_out, empty, spec)
    if spec.fill == Fill.FINITE:
        return None, None, dv, None, None
    dq, dk = uniform_score_grads(q, k, v, grad_out, empty, spec.scale, spec.kv_len)
    return dq, dk, dv, None, None


def _nan_rows_of(term: torch.Tensor, empty: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A gradient of ``term``'s shape, NaN on every element added to a score of a row that ``empty [B, Hq, Nq]``
    marks (its broadcast dims summed, as autograd sums them), 0 elsewhere: built at the term's size."""
    shape = (1,) * (4 - term.dim()) + tuple(term.shape)
    rows = empty
    for dim in range(3):  # batch, heads, queries: a dim the term broadcasts is summed over
        if shape[dim] == 1 and rows.shape[dim] != 1:
            rows = rows.any(dim, keepdim=True)
    nan = torch.where(rows[..., None], float("nan"), torch.zeros((), dtype=dtype, device=term.device))
    return nan.expand(shape).reshape(term.shape)


def plus_fill_grads(grads, extra) -> tuple:
    """Each of a kernel's ``grads`` plus the fill's ``extra`` (``empty_row_grads``; None: nothing to add), summed
    at the wider of the two dtypes (float64 gradients stay float64) and returned in the gradient's dtype."""
    return tuple(g if e is None else (g.to(torch.promote_types(g.dtype, e.dtype)) + e).to(g.dtype)
                 for g, e in zip(grads, extra))


def row_wise_grads(spec: AttentionSpec, needs_bias_grad: bool = True, needs_mask_grad: bool = True) -> bool:
    """Whether the gradients of rows with no visible key are computed row by row, against every key
    (``_row_grads``: about a hundred elementwise passes over those rows' ``[heads, rows, Nk]`` scores), rather than
    factored (a constant few ops): dropout on a finite fill, a replaced band with added padding, or an added fill
    with a softcap or a term's gradient asked for (by default: any term that may ask)."""
    if spec.fill in (Fill.SAFE, *NAN_FILLS):
        return False
    dropped = spec.dropout_p > 0.0 and spec.fill in DROPPED_FILLS
    term_grads = (needs_bias_grad and spec.bias is not None) or (needs_mask_grad and spec.mask is not None)
    return dropped or spec.fill == Fill.FINITE_REPLACED_ADDED or (spec.fill == Fill.FINITE_ADDED and (
        spec.softcap is not None or term_grads))


def _uniform_value_grad(v, grad_out, empty, spec: AttentionSpec) -> torch.Tensor:
    """dV of rows whose softmax was uniform over all keys: each such row's ``dO / Nk`` on every key of its head."""
    b, hkv, g = spec.batch, spec.kv_heads, spec.group_size
    rows_do = torch.where(empty[..., None], grad_out.to(_compute_dtype(grad_out.dtype)), 0.0)  # [B, Hq, Nq, Dv]
    uniform = rows_do.sum(2).reshape(b, hkv, g, -1).sum(2)[:, :, None, :] / spec.kv_len  # [B, Hkv, 1, Dv]
    return uniform.expand(b, hkv, spec.kv_len, spec.v_head_dim)


def uniform_score_grads(q, k, v, grad_out, empty, scale: float, count: int, mean_v: torch.Tensor | None = None):
    """``(dq [B, Hq, Nq, D], dk [B, Hkv, n, D])`` in float32 (float64 for float64 inputs): the gradients that rows
    ``empty [B, Hq, Nq]``, whose softmax was uniform over ``count`` keys through an added finite fill (no
    softcap), send q and the keys ``k``, ``v [B, Hkv, n, Dv]`` (all ``count`` of them, or a block of them with
    ``mean_v [B, Hkv, 1, Dv]`` the mean of all). The scores' gradient ``dS_ij = (dO_i . (v_j - mean_v)) / count``
    factors through two ``[D, Dv]`` products per key head, ``K^T (V - mean_v)`` and ``Q_e^T dO_e`` over the
    empty rows ``e``::

        dq_i = scale / count * (K^T (V - mean_v)) dO_i        dk_j = scale / count * (Q_e^T dO_e) (v_j - mean_v)

    O((Nq + n) D Dv) work per head and memory of q's and k's size, whatever the number of empty rows (a
    left-padded batch row in training leaves thousands); the values are centred first, as ``dS`` is, so no
    large terms cancel."""
    cdtype = _compute_dtype(q.dtype)
    b, hq, nq = empty.shape
    hkv = k.shape[1]
    rows = empty[..., None]
    do = torch.where(rows, grad_out.to(cdtype), 0.0).reshape(b, hkv, -1, v.shape[-1])  # [B, Hkv, g Nq, Dv]
    queries = torch.where(rows, q.to(cdtype), 0.0).reshape(b, hkv, -1, q.shape[-1])  # [B, Hkv, g Nq, D]
    values = v.to(cdtype)
    centred = values - (values.mean(2, keepdim=True) if mean_v is None else mean_v.to(cdtype))  # [B, Hkv, n, Dv]
    factor = scale / count
    dq = (do @ (k.to(cdtype).transpose(-1, -2) @ centred).transpose(-1, -2)) * factor
    dq = torch.where(rows, dq.reshape(b, hq, nq, -1), 0.0)  # a NaN key reaches no row that saw a key
    dk = (centred @ (queries.transpose(-1, -2) @ do).transpose(-1, -2)) * factor  # [B, Hkv, n, D]
    return dq, dk


def _kept_keys(spec: AttentionSpec, device) -> torch.Tensor:
    """``[B or 1, Nk]``: the keys the added mask keeps (all without key padding)."""
    if spec.q_doc is not None or spec.bias is not None or spec.mask is not None:
        raise NotImplementedError(f"fill={spec.fill.value!r} with {'+'.join(spec.mask_terms)} is not supported yet: "
                                  "it takes a band and key padding only")
    if spec.key_padding is None:
        return torch.ones(1, spec.kv_len, dtype=torch.bool, device=device)
    return key_padding_keep(spec.key_padding, spec.kv_len)


def _band_ends(spec: AttentionSpec, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one past the last key of the band of each query row in ``rows``, clamped to ``[0, Nk]``."""
    lo, hi = spec.band()
    diagonal = rows + spec.diagonal_offset
    start = torch.zeros_like(rows) if lo is None else (diagonal + lo).clamp(0, spec.kv_len)
    end = torch.full_like(rows, spec.kv_len) if hi is None else (diagonal + hi + 1).clamp(0, spec.kv_len)
    return start, torch.maximum(start, end)


def _mean_over_union(v: torch.Tensor, spec: AttentionSpec, first_row: int, n_rows: int) -> torch.Tensor:
    """``[B, Hkv, n_rows, Dv]`` in float64: for query rows ``first_row ..``, each row's mean of v over its band's
    keys and the kept keys, counted as disjoint (they are on the rows that see no key). O(Nk Dv) per head with
    prefix sums in float64, so a difference of two sums keeps the rounding of one; no host sync."""
    values = v.to(torch.float64)  # [B, Hkv, Nk, Dv]
    kept = _kept_keys(spec, v.device).expand(spec.batch, spec.kv_len)  # [B, Nk]
    kept_sum = torch.einsum("bn,bhnd->bhd", kept.to(values.dtype), values)[:, :, None]  # [B, Hkv, 1, Dv]
    kept_count = kept.sum(-1)[:, None, None, None]  # [B, 1, 1, 1]
    prefix = F.pad(values.cumsum(2), (0, 0, 1, 0))  # [B, Hkv, Nk + 1, Dv], prefix[j] = v[0] + .. + v[j - 1]
    start, end = _band_ends(spec, torch.arange(first_row, first_row + n_rows, device=v.device))  # [n_rows]
    band_sum = prefix[:, :, end] - prefix[:, :, start]  # [B, Hkv, Nq, Dv]
    return (band_sum + kept_sum) / ((end - start)[:, None] + kept_count)  # 0 / 0 = NaN: every key masked twice


# ----------------------------------------------------------------------------- dropout on filled rows
#: splitmix64's increment and finalizer multipliers, as signed int64 (torch's integer products wrap)
_GOLDEN, _MIX1, _MIX2 = (c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shifted(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x >> bits`` as an unsigned shift of int64 bits (torch's ``>>`` copies the sign bit in)."""
    return (x >> bits).bitwise_and_((1 << (64 - bits)) - 1)


def _seeded(seed: int) -> int:
    """``seed``, the call's dropout seed: 0 means no dropout was drawn, which a finite fill with dropout cannot
    stand for."""
    if seed == 0:
        raise ValueError("a finite fill with dropout needs the call's dropout seed (0 means no dropout was drawn)")
    return seed


def _dropout_keep(spec: AttentionSpec, seed: int, b: int | torch.Tensor, heads: torch.Tensor, rows: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """``[..., Nk]`` dropout multipliers (0 or ``1 / (1 - p)``) of query rows ``rows`` (absolute) of heads ``heads``
    in batch rows ``b``, all three broadcast against each other (``[Bb, 1, 1, 1]`` batch rows, ``[Hkv, G, 1]``
    heads and ``[Bb, 1, 1, r]`` rows give ``[Bb, Hkv, G, r, Nk]``): uniform draws that are a function of ``seed``
    and the (b, h, i, j) index alone."""
    _seeded(seed)
    row_index = (b * spec.q_heads + heads) * spec.q_len + rows  # b, heads and rows broadcast
    keys = torch.arange(spec.kv_len, device=rows.device)
    # in place past the first product: a block's draws are ROW_ELEMENTS int64, a fresh buffer per op was most of
    # the time on a CPU (int64 products wrap as the unsigned ones would, bit for bit)
    x = (row_index[..., None] * spec.kv_len + keys).mul_(_GOLDEN).add_(seed & ((1 << 62) - 1))
    x.bitwise_xor_(_shifted(x, 30)).mul_(_MIX1)
    x.bitwise_xor_(_shifted(x, 27)).mul_(_MIX2)
    x.bitwise_xor_(_shifted(x, 31))
    uniform = x.bitwise_and_((1 << 53) - 1).to(torch.float64).div_(float(1 << 53))
    return (uniform >= spec.dropout_p).to(dtype).mul_(kept_scale(spec.dropout_p))


# ----------------------------------------------------------------------------- rows without keys, in blocks
#: batch rows a block of rows without keys takes at once, by device type (None: as many as ``ROW_ELEMENTS``
#: allows; others take 1). On a GPU a block's few dozen ops are launches, whatever their size: one block for every
#: batch row with empty rows. On a CPU the work dominates, and padding each batch row's empty rows to the block's
#: common count adds work (taking every batch row at once was up to 1.7x slower with dropout)
BATCH_ROWS_PER_BLOCK: Mapping[str, int | None] = MappingProxyType({"cuda": None})


@dataclass(frozen=True)
class RowBlock:
    """Query rows ``rows [Bb, r]`` (indices into ``empty``'s rows) of batch rows ``b [Bb]`` (distinct), taken in
    key heads ``kv`` and their query heads at once. Each batch row's rows are distinct: its rows empty in some
    head, then, where it has fewer than the block's ``r``, rows that see a key in every head (padding).
    ``empty [Bb, hk, G, r]`` marks the (batch row, head, row) triples that are empty: the others (a row empty in
    another head only, or padding) take nothing."""

    b: torch.Tensor
    kv: slice
    rows: torch.Tensor
    empty: torch.Tensor

    @property
    def heads(self) -> slice:
        """The query heads of the block's key heads."""
        group = self.empty.shape[2]
        return slice(self.kv.start * group, self.kv.stop * group)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[Bb, hk, G, r, ...]``: the block's rows of ``x [B, Hq, n, ...]``."""
        rows = x[self.b[:, None], self.heads, self.rows]  # [Bb, r, hq, ...]: the indexed dims first
        return rows.transpose(1, 2).unflatten(1, self.empty.shape[1:3])

    def add_rows(self, total: torch.Tensor, rows: torch.Tensor) -> None:
        """Add ``rows [Bb, hk, G, r, ...]`` into the block's rows of ``total [B, Hq, n, ...]``."""
        target = total[:, self.heads].transpose(1, 2)  # [B, n, hq, ...], a view of total
        target.index_put_((self.b[:, None], self.rows), rows.flatten(1, 2).transpose(1, 2), accumulate=True)

    def add_keys(self, total: torch.Tensor, keys: torch.Tensor) -> None:
        """Add ``keys [Bb, hk, Nk, ...]`` into the block's key heads of ``total [B, Hkv, Nk, ...]``."""
        total[:, self.kv].index_add_(0, self.b, keys)


def row_blocks(empty: torch.Tensor, group_size: int, width: int) -> list[RowBlock]:
    """The rows ``empty [B, Hq, n]`` marks, as blocks of batch rows (``BATCH_ROWS_PER_BLOCK`` for ``empty``'s
    device): the rows empty in any head of each, in every head at once (``group_size`` query heads per key head),
    so that the work on them is a few batched ops per block whatever the number of heads. ``width``: elements per
    (head, row) of the caller's largest working tensor (``Nk``, ``D``); a block holds at most
    ``ROW_ELEMENTS // width`` (batch row, head, row) triples: fewer batch rows, then fewer rows, and past one row of
    one batch row in every head, fewer key heads (at least one row of one key head). One host sync."""
    batch, q_heads, _ = empty.shape
    kv_heads = q_heads // group_size
    pairs = max(1, ROW_ELEMENTS // max(1, width))
    capacity, n_kv = (pairs // q_heads, kv_heads) if pairs >= q_heads else (1, max(1, pairs // group_size))
    any_head = empty.any(1)  # [B, n]
    # [B, n]: a batch row's empty rows first, then the others, which pad it to a block's count
    order = torch.sort((~any_head).to(torch.uint8), dim=1, stable=True).indices
    counts = any_head.sum(1).tolist()
    active = sorted((b for b in range(batch) if counts[b]), key=lambda b: -counts[b])  # most empty rows first
    together = min(capacity, BATCH_ROWS_PER_BLOCK.get(empty.device.type, 1) or batch)
    blocks = []
    for start in range(0, len(active), together):
        group = active[start:start + together]
        n_rows = capacity // len(group)
        for first in range(0, counts[group[0]], n_rows):
            members = [b for b in group if counts[b] > first]  # those with empty rows left
            count = min(n_rows, counts[group[0]] - first)
            b = torch.tensor(members, device=empty.device)  # [Bb]
            rows = order[b, first:first + count]  # [Bb, r]
            marks = empty[b[:, None], :, rows].transpose(1, 2).unflatten(1, (kv_heads, group_size))  # [Bb, Hkv, G, r]
            for kv in range(0, kv_heads, n_kv):
                last = min(kv + n_kv, kv_heads)
                blocks.append(RowBlock(b, slice(kv, last), rows, marks[:, kv:last]))
    return blocks


def _scatter_rows(total: torch.Tensor, ds: torch.Tensor, block: RowBlock) -> None:
    """Add a block's rows ``ds [Bb, hk, G, r, Nk]`` into a term broadcastable to ``[B, Hq, Nq, Nk]``, summing its
    broadcast dims."""
    view = total.reshape((1,) * (4 - total.dim()) + tuple(total.shape))  # a view of total (fresh zeros)
    rows = ds.flatten(1, 2)  # [Bb, hq, r, Nk]
    for dim in (1, 2, 3):
        if view.shape[dim] == 1:
            rows = rows.sum(dim, keepdim=True)
    target = view[:, block.heads] if view.shape[1] > 1 else view  # [B or 1, hq or 1, Nq or 1, Nk or 1]
    if view.shape[2] > 1:  # (batch row, row) pairs; the same row of several batch rows where the term has no B
        index, target = ((block.b[:, None], block.rows), target.transpose(1, 2)) if view.shape[0] > 1 else (
            (block.rows,), target[0].transpose(0, 1))
        target.index_put_(index, rows.transpose(1, 2), accumulate=True)
    elif view.shape[0] > 1:
        target.index_add_(0, block.b, rows)
    else:
        target += rows.sum(0, keepdim=True)


def _uniform_weights(spec: AttentionSpec, b: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype):
    """``(weights [Bb, r, Nk], band [Bb, r, Nk] or None)`` of empty query rows ``rows [Bb, r]`` (absolute) of batch
    rows ``b [Bb]``: the uniform softmax the fill stands for, and (replaced band + added padding) the keys whose
    scores the band's ``where`` passes a gradient to."""
    if spec.fill != Fill.FINITE_REPLACED_ADDED:
        return torch.full((*rows.shape, spec.kv_len), 1.0 / spec.kv_len, dtype=dtype, device=rows.device), None
    lo, top = spec.band()
    keys = torch.arange(spec.kv_len, device=rows.device)
    band = band_keep(keys - (rows + spec.diagonal_offset)[..., None], lo, top)  # [Bb, r, Nk]
    kept = _kept_keys(spec, rows.device).expand(spec.batch, spec.kv_len)[b]  # [Bb, Nk]
    union = band | kept[:, None, :]  # disjoint on a row with no visible key
    return union.to(dtype) / union.sum(-1, keepdim=True), band  # 0 / 0 = NaN: every key masked twice


def _query_heads(spec: AttentionSpec, device) -> torch.Tensor:
    """``[Hkv, G, 1]``: each query head's index, grouped by key head (``_dropout_keep``'s heads for a block)."""
    return torch.arange(spec.q_heads, device=device).view(spec.kv_heads, spec.group_size, 1)


def _block_keep(spec: AttentionSpec, seed: int, heads: torch.Tensor, block: RowBlock, rows: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """``[Bb, hk, G, r, Nk]``: the dropout multipliers of a block's rows ``rows [Bb, r]`` (absolute)."""
    return _dropout_keep(spec, seed, block.b[:, None, None, None], heads[block.kv], rows[:, None, None], dtype)


def _dropped_uniform_rows(out: torch.Tensor, empty: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                          first_row: int, seed: int) -> torch.Tensor:
    """``fill_empty_rows`` for a finite fill with dropout: each empty row's uniform softmax dropped out, times v."""
    blocks = row_blocks(empty, spec.group_size, max(spec.kv_len, spec.v_head_dim))  # one host sync
    if not blocks:  # most calls have no such row
        return out
    cdtype = _compute_dtype(v.dtype)
    heads = _query_heads(spec, v.device)
    filled = torch.empty_like(out).copy_(out)  # out's layout kept
    for block in blocks:
        rows = block.rows + first_row  # [Bb, r]
        weights, _ = _uniform_weights(spec, block.b, rows, cdtype)  # [Bb, r, Nk]
        probs = weights[:, None, None] * _block_keep(spec, seed, heads, block, rows, cdtype)  # [Bb, hk, G, r, Nk]
        values = v[block.b, block.kv].to(cdtype)  # [Bb, hk, Nk, Dv]
        dropped = (probs.flatten(2, 3) @ values).to(out.dtype).unflatten(2, block.empty.shape[2:])  # [Bb, hk, G, r, Dv]
        # a block's (batch row, row) pairs are distinct: the rows it does not fill get their own value back
        index = (block.b[:, None], block.heads, block.rows)
        dropped = torch.where(block.empty[..., None], dropped, block.gather(filled))
        filled[index] = dropped.flatten(1, 2).transpose(1, 2)  # [Bb, r, hq, Dv], the indexed dims first
    return filled


def _row_grads(q, k, v, grad_out, empty, spec: AttentionSpec, seed: int | None, needs_bias_grad: bool,
               needs_mask_grad: bool):
    """``empty_row_grads`` row by row, in ``row_blocks`` (batch rows' empty rows in every head at once, against
    their heads' keys: ``[Bb, hk, G, r, Nk]`` working tensors): the gradients of each empty row's uniform softmax
    (``P = 1 / |U|`` on its keys ``U``), dropped out with the call's ``seed`` (``z`` the dropout multipliers; 1
    where ``seed`` is None). dV gets ``P z dO``; the scores (added fills only) ``dS = P (dP - sum(P dP))`` with
    ``dP = z (dO . v)``, through the softcap's tanh. A (head, row) of a block that sees a key takes nothing: its
    dO and q are zeroed and its dS and dq masked (a NaN of k or v reaches no row that saw a key)."""
    cdtype = _compute_dtype(q.dtype)
    dv = torch.zeros(v.shape, dtype=cdtype, device=v.device)
    scores = spec.fill != Fill.FINITE  # a replaced fill sends the scores nothing (masked_fill's backward)
    dq = torch.zeros(q.shape, dtype=cdtype, device=q.device) if scores else None
    dk = torch.zeros(k.shape, dtype=cdtype, device=k.device) if scores else None
    added = spec.fill == Fill.FINITE_ADDED  # only an added fill's terms receive the scores' gradient
    term_grads = [torch.zeros(term.shape, dtype=cdtype, device=q.device) if added and needed else None
                  for term, needed in ((spec.bias, needs_bias_grad), (spec.mask, needs_mask_grad))]
    heads = _query_heads(spec, q.device) if seed is not None else None
    width = max(spec.kv_len, spec.head_dim, spec.v_head_dim)
    for block in row_blocks(empty, spec.group_size, width):
        b, kv = block.b, block.kv
        marks = block.empty[..., None]  # [Bb, hk, G, r, 1]
        weights, band = _uniform_weights(spec, b, block.rows, cdtype)  # [Bb, r, Nk]
        keep = _block_keep(spec, seed, heads, block, block.rows, cdtype) if seed is not None else None
        do = torch.where(marks, block.gather(grad_out).to(cdtype), 0.0)  # [Bb, hk, G, r, Dv]
        if keep is None:  # every head's rows take the same weights: their dO summed first (as many ops for any Bb,
            # where ``weights[:, None].mT @ do.sum(2)`` copies the broadcast weights past one batch row)
            block.add_keys(dv, torch.einsum("brn,bhgrd->bhnd", weights, do))  # [Bb, hk, Nk, Dv]
        else:
            probs = weights[:, None, None] * keep  # P z: [Bb, hk, G, r, Nk]
            block.add_keys(dv, probs.flatten(2, 3).mT @ do.flatten(2, 3))
        if not scores:
            continue
        # in place on fresh products from here: a block's [Bb, hk, G, r, Nk] buffers are the fill's memory traffic
        weights = weights[:, None, None]  # [Bb, 1, 1, r, Nk]
        values = v[b, kv].to(cdtype)  # [Bb, hk, Nk, Dv]
        dov = (do.flatten(2, 3) @ values.mT).view(*do.shape[:4], -1)  # [Bb, hk, G, r, Nk]: dO . v_j
        expected = ((weights if keep is None else probs) * dov).sum(-1, keepdim=True)  # sum_j P_j dP_j
        ds = (dov if keep is None else dov.mul_(keep)).sub_(expected).mul_(weights)  # P (dP - sum P dP)
        if band is not None:
            ds.masked_fill_(~band[:, None, None], 0.0)
        for grad in term_grads:
            if grad is not None:
                _scatter_rows(grad, torch.where(marks, ds, 0.0), block)
        keys = k[b, kv].to(cdtype)  # [Bb, hk, Nk, D]
        queries = torch.where(marks, block.gather(q).to(cdtype), 0.0).flatten(2, 3)  # [Bb, hk, G r, D]
        if spec.softcap is not None:  # through the softcap's tanh: 1 - tanh^2
            capped = (queries @ keys.mT).view(ds.shape).mul_(spec.scale).div_(spec.softcap).tanh_()
            ds.mul_(capped.square_().neg_().add_(1.0))
        ds = ds.masked_fill_(~marks, 0.0).flatten(2, 3)  # [Bb, hk, G r, Nk]
        block.add_rows(dq, torch.where(marks, ((ds @ keys) * spec.scale).view(*marks.shape[:4], -1), 0.0))
        block.add_keys(dk, (ds.mT @ queries) * spec.scale)
    return dq, dk, dv, *term_grads
