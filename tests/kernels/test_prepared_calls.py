"""Prepared calls over a model's changing terms: the band forward's ``PreparedForward`` (``triton_flash_tma.prepared``)
and a site's call plans (``ops.SiteCall``), every call checked against the float64 oracle (``naive_attention``),
never against ``infer`` (which goes through the same object).

* Integer key lengths given as a strided view (``lengths[:, 0]``) reach the kernels contiguous: they read length
  ``b`` at ``kp_ptr + b``.
* A site's call plan is made per term shape and dtype, not only per term present: a plan prepared for a shared
  boolean mask (GQA heads packed) is not run with a per-head mask or an additive one.
* One boolean tensor used as key padding ``[B, Nk]`` in one call and as a ``[Nq, Nk]`` mask (``Nq == B``) in the
  next gets each role's tile lists (the prepared forwards and the tile lists' cache are keyed by which terms are
  present).
* Layouts, padding reused, written in place, freed and replaced, inference-mode lengths, documents, masks with and
  without a head dim, empty batches, queries and keys.
"""

from __future__ import annotations

import gc

import pytest
import torch

from attnopt.kernels import block_map, get
from attnopt.kernels import triton_flash_tma as tma
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window
from attnopt.kernels.term_cache import TermCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
#: 16 x 16 tiles: the tiny shapes below cross several (the measured variants need D 64/128 and 64-wide tiles)
SMALL = tma.Variant(block_m=16, block_n=16)
SMALL_PACKED = tma.Variant(block_m=16, block_n=16, pack_gqa=True)


@pytest.fixture
def measured(monkeypatch):
    """The band forward's measured variants, as on the GPU they were measured on."""
    monkeypatch.setattr(tma, "_capability", lambda device: tma.MEASURED_ON)


def _qkv(b, hq, hkv, nq, nk, d=16, dtype=torch.float16, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)

    def randn(h, n):
        if transposed:  # HF's [B, N, H, D] seen as [B, H, N, D]
            return torch.randn(b, n, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
        return torch.randn(b, h, n, d, generator=g).to(dtype).to(DEVICE)

    return randn(hq, nq), randn(hkv, nk), randn(hkv, nk)


def _assert_oracle(out, q, k, v, spec, tol, what=""):
    """``out`` against float64: the same NaN rows, and the rest within ``tol`` (relative to the largest value)."""
    want = naive_attention(q, k, v, spec).cpu()
    got = out.double().cpu()
    assert got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN rows differ"
    if want.numel():
        err = (got - want).nan_to_num(0).abs().max().item()
        scale = max(1.0, want.nan_to_num(0).abs().max().item())
        assert err <= tol * scale, f"{what}: max abs error {err:.3g}"


# ------------------------------------------------------------------------------------------------- bugs (failing)
@pytest.mark.parametrize("path", ["band_forward", "triton_flash_general"])
def test_strided_integer_key_lengths(path):
    """Key lengths ``[B]`` as a column of a ``[B, 2]`` tensor (stride 2): valid for the spec (``validate``), read
    right by the tile lists and by ``known_empty_rows`` (``key_padding_keep``), but the kernels load
    ``kp_ptr + b`` (``KP_MODE == 1`` has no stride): batch row 1 reads ``base[0, 1] = 3`` in place of 20 keys.
    Fix: ``listed_term_values`` passes ``kp.contiguous()`` for lengths (or a stride)."""
    q, k, v = _qkv(2, 2, 2, 8, 40)
    base = torch.tensor([[40, 3], [20, 3]], device=DEVICE)
    lengths = base[:, 0]
    assert lengths.stride() == (2,) and lengths.tolist() == [40, 20]
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=lengths, fill=Fill.SAFE)
    spec.validate()
    if path == "band_forward":
        out = tma.forward(q, k, v, spec, variant=SMALL)[0]
    else:  # D 16: triton_flash's own forward (the same argument list, ``_term_args``)
        out = get("triton_flash").forward(q, k, v, spec, 0)[0]
    _assert_oracle(out, q, k, v, spec, TOL[torch.float16], path)


def _padding_and_mask_of_one_tensor(nk: int, tile: int):
    """q/k/v with B = Nq = 2, and one boolean ``[2, nk]`` tensor: row 0 keeps every key, row 1 the first tile only.
    As key padding its tile lists say batch 0: every kv tile full, batch 1: the second one empty; as a ``[Nq, Nk]``
    mask the second kv tile is partial for every batch row (query 1 must not see it, query 0 must)."""
    q, k, v = _qkv(2, 2, 2, 2, nk, d=64 if tile == 64 else 16, dtype=torch.bfloat16, seed=1)
    keep = torch.ones(2, nk, dtype=torch.bool, device=DEVICE)
    keep[1, tile:] = False
    as_padding = AttentionSpec.from_tensors(q, k, v, key_padding=keep, fill=Fill.SAFE)
    as_mask = AttentionSpec.from_tensors(q, k, v, mask=keep, fill=Fill.SAFE)
    as_padding.validate()
    as_mask.validate()
    return q, k, v, as_padding, as_mask


@pytest.mark.parametrize("order", ["padding_first", "mask_first"])
def test_one_bool_tensor_as_padding_then_as_a_mask_through_triton_flash(measured, order):
    """``triton_flash``'s forward on the band variant (D 64, one variant for both kinds): the same boolean tensor
    as key padding and as a 2-D mask (B = Nq), at the same version, twice each. Given the padding's tile lists (a
    shared ``PreparedForward``'s ``LastCall``, or ``tile_lists``' ``TermCache``, keyed without the terms present),
    query 1 of batch 0 sees keys its mask hides (max error 0.59)."""
    q, k, v, as_padding, as_mask = _padding_and_mask_of_one_tensor(128, 64)
    kernel = get("triton_flash")
    assert tma.measured_variant(as_padding) == tma.measured_variant(as_mask)
    calls = [(as_padding, "as padding"), (as_mask, "as mask")]
    for spec, what in (calls if order == "padding_first" else calls[::-1]) * 2:
        _assert_oracle(kernel.forward(q, k, v, spec, 0)[0], q, k, v, spec, TOL[torch.bfloat16], what)


def test_prepared_forwards_last_call_is_keyed_by_which_terms_are_present(monkeypatch):
    """The same, isolated to ``LastCall``: the tile-list cache is emptied between the calls, so only an interned
    ``PreparedForward`` shared by both specs could hand the padding's lists on (``prepared()``'s key holds which terms
    are present, so each gets its own)."""
    q, k, v, as_padding, as_mask = _padding_and_mask_of_one_tensor(32, 16)
    run = tma.prepared(as_padding, SMALL)
    _assert_oracle(run(q, k, v, as_padding), q, k, v, as_padding, TOL[torch.bfloat16], "as padding")
    monkeypatch.setattr(block_map, "_CACHE", TermCache(block_map.CACHE_SIZE, without_terms=True))
    _assert_oracle(tma.prepared(as_mask, SMALL)(q, k, v, as_mask), q, k, v, as_mask, TOL[torch.bfloat16],
                   "as mask")


def test_tile_list_cache_is_keyed_by_which_terms_are_present():
    """The same with two separate ``PreparedForward`` objects (empty ``LastCall``s): only ``tile_lists``'
    ``TermCache`` could hand the padding's lists to the mask call (its static key holds which terms are present)."""
    q, k, v, as_padding, as_mask = _padding_and_mask_of_one_tensor(32, 16)
    _assert_oracle(tma.PreparedForward(as_padding, SMALL)(q, k, v, as_padding), q, k, v, as_padding,
                   TOL[torch.bfloat16], "as padding")
    _assert_oracle(tma.PreparedForward(as_mask, SMALL)(q, k, v, as_mask), q, k, v, as_mask, TOL[torch.bfloat16],
                   "as mask")


@pytest.mark.parametrize("second", ["per_head_bool_mask", "additive_mask"])
def test_site_call_plan_with_another_kind_of_mask(measured, second):
    """``SiteCall``'s plan is keyed by which terms are present; ``triton_flash.prepare`` decided its variant (heads
    packed: the first mask is shared by the heads) and its checks (``spec_reasons``) from the first call's mask.
    A later call of the same shapes with a per-head mask runs packed (each packed head reads head 0's tile lists
    and mask row); one with an additive mask runs without it (the band kernel knows boolean masks only). Older
    than this change (the prepared call before it bound the same variant); ``Kernel.prepare``'s contract only
    covers term values. Fix: key ``SiteCall``'s plans on the terms' dtypes and shapes too, as ``_attention_impl``
    keys ``_OP_PLANS``."""
    from attnopt.ops import SiteCall

    b, hq, hkv, n, d = 1, 4, 2, 16, 64
    q, k, v = _qkv(b, hq, hkv, n, n, d=d, dtype=torch.bfloat16, seed=2)
    site = SiteCall("triton_flash", d ** -0.5, False, "top_left", None, None, None, "safe")
    g = torch.Generator().manual_seed(5)
    shared = (torch.rand(b, 1, n, n, generator=g) > 0.3).to(DEVICE)
    if second == "per_head_bool_mask":
        other = (torch.rand(b, hq, n, n, generator=g) > 0.5).to(DEVICE)
    else:
        other = torch.zeros(b, 1, n, n).masked_fill(torch.rand(b, 1, n, n, generator=g) > 0.5, float("-inf"))
        other = other.to(torch.bfloat16).to(DEVICE)
    for mask, what in ((shared, "shared bool mask"), (other, second)):
        out = site(q, k, v, None, None, None, None, mask)[0]
        spec = AttentionSpec.from_tensors(q, k, v, mask=mask, fill=Fill.SAFE)
        _assert_oracle(out, q, k, v, spec, TOL[torch.bfloat16], what)


# --------------------------------------------------------------------------------------- properties (passing)
def test_prepared_call_over_a_forward_of_changing_terms(measured):
    """``triton_flash.prepare``'s call (a ``PreparedForward``) over the calls of one plan, each against float64:
    HF's transposed q/k/v and a q with a non-unit last-dim stride; a boolean padding given transposed (not
    contiguous in its last dim); the same padding again (the last call's answer); written in place (rows left
    without a key: the fill runs); freed and another made (maybe at its address); lengths in inference mode,
    written in place there; lengths as int32; no terms at all."""
    b, hq, hkv, nq, nk = 2, 4, 2, 40, 72
    q, k, v = _qkv(b, hq, hkv, nq, nk, d=64, dtype=torch.bfloat16, seed=3, transposed=True)
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, align=Align.BOTTOM_RIGHT, fill=Fill.NEG_INF)
    plan = spec.with_(key_padding=torch.ones(b, nk, dtype=torch.bool, device=DEVICE))
    run = get("triton_flash").prepare(plan)
    assert isinstance(run, tma.PreparedForward)
    wide = torch.randn(b, hq, nq, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(DEVICE)
    strided_q = wide[..., ::2]  # last-dim stride 2
    assert strided_q.stride(-1) == 2

    def call(spec, what, q=q):
        _assert_oracle(run(q, k, v, spec), q, k, v, spec, TOL[torch.bfloat16], what)

    padding = (torch.rand(nk, b, generator=torch.Generator().manual_seed(5)) > 0.3).to(DEVICE).t()
    assert padding.stride(-1) != 1
    padded = spec.with_(key_padding=padding)
    call(padded, "transposed padding")
    call(padded, "the same padding again")
    call(padded, "strided q", q=strided_q)
    padding[1, :] = False  # in place: batch row 1 sees no key (NaN rows)
    call(padded, "written in place")
    del padding, padded
    gc.collect()
    fresh = torch.ones(b, nk, dtype=torch.bool, device=DEVICE)
    fresh[0, nk // 2:] = False
    call(spec.with_(key_padding=fresh), "a new padding")
    with torch.inference_mode():
        lengths = torch.tensor([nk, 9], device=DEVICE)
        call(spec.with_(key_padding=lengths), "inference-mode lengths")
        lengths[1] = 0
        call(spec.with_(key_padding=lengths), "inference-mode lengths written in place")
    call(spec.with_(key_padding=torch.tensor([30, nk], dtype=torch.int32, device=DEVICE)), "int32 lengths")
    call(spec, "no terms")


def test_sites_of_other_settings_sharing_one_padding_tensor():
    """One padding tensor handed to sites whose settings differ (fill, band, alignment, window) in turn, twice:
    each gets its own ``PreparedForward`` (the key holds them), and every call is right, NaN and mean-of-v rows
    included."""
    b, hq, hkv, nq, nk = 2, 4, 2, 24, 20
    q, k, v = _qkv(b, hq, hkv, nq, nk, seed=6)
    keep = torch.ones(b, nk, dtype=torch.bool, device=DEVICE)
    keep[1, :12] = False  # left padding: with causal, batch row 1's first queries see no key
    sites = [dict(causal=True, fill=Fill.NEG_INF), dict(causal=True, fill=Fill.FINITE),
             dict(causal=True, align=Align.BOTTOM_RIGHT, fill=Fill.FINITE_ADDED),
             dict(window=Window(3, 1), fill=Fill.SAFE), dict(fill=Fill.NEG_INF)]
    specs = [AttentionSpec.from_tensors(q, k, v, key_padding=keep, **site) for site in sites]
    runs = [tma.prepared(spec, SMALL_PACKED) for spec in specs]
    assert len({id(run) for run in runs}) == len(runs)
    for _ in range(2):
        for spec, run in zip(specs, runs):
            _assert_oracle(run(q, k, v, spec), q, k, v, spec, TOL[torch.float16], str(spec.fill))


def test_documents_self_then_cross_attention_with_rows_without_keys():
    """Self-attention over documents (one id tensor for both: no row can be empty, no fill), then the same query
    ids against key ids where one query document has no key (NaN rows), then back: the answer of one is never
    the other's."""
    b, h, n = 2, 2, 24
    q, k, v = _qkv(b, h, h, n, n, seed=7)
    ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 21], device=DEVICE)
    other = torch.tensor([[0] * 24, [1] * 24], device=DEVICE)
    selfs = AttentionSpec.from_tensors(q, k, v, q_doc=ids, kv_doc=ids, causal=True, fill=Fill.NEG_INF)
    cross = AttentionSpec.from_tensors(q, k, v, q_doc=ids, kv_doc=other, causal=True, fill=Fill.NEG_INF)
    assert not selfs.rows_need_fill() and cross.rows_need_fill()
    run = tma.prepared(selfs, SMALL)
    for spec in (selfs, cross, selfs, cross):
        _assert_oracle(run(q, k, v, spec), q, k, v, spec, TOL[torch.float16], "documents")


@pytest.mark.parametrize("mask_shape", [(2, 1, 20, 20), (1, 1, 1, 20), (20,), (4, 20, 20)])
def test_boolean_masks_with_and_without_a_head_dim(mask_shape):
    """Boolean masks broadcast over batch, heads and queries; heads packed where the mask is shared by a group
    (GQA 4/2), one program per head where it has a head dim; each call twice (the last call's answer)."""
    b, hq, hkv, n = 2, 4, 2, 20
    q, k, v = _qkv(b, hq, hkv, n, n, seed=8)
    mask = (torch.rand(mask_shape, generator=torch.Generator().manual_seed(9)) > 0.4).to(DEVICE)
    spec = AttentionSpec.from_tensors(q, k, v, mask=mask, causal=True, fill=Fill.FINITE)
    variant = SMALL if tma.per_head_lists(spec) else SMALL_PACKED
    assert not tma.unsupported_reasons(q, k, v, spec, variant)
    run = tma.prepared(spec, variant)
    for _ in range(2):
        _assert_oracle(run(q, k, v, spec), q, k, v, spec, TOL[torch.float16], f"mask {mask_shape}")


@pytest.mark.parametrize("shape", [(0, 4, 2, 8, 16), (2, 4, 2, 0, 16), (2, 4, 2, 8, 0)],
                         ids=["no_batch", "no_query", "no_key"])
@pytest.mark.parametrize("fill", [Fill.NEG_INF, Fill.FINITE])
def test_empty_batches_queries_and_keys(shape, fill):
    """No batch row, no query or no key: rows of 0 (no key: the original's sum over no key), whatever the fill,
    with padding lengths, a boolean padding or no terms."""
    q, k, v = _qkv(*shape, seed=10)
    b, nk = shape[0], shape[-1]
    for terms in ({}, {"key_padding": torch.full((b,), 3, device=DEVICE)},
                  {"key_padding": torch.ones(b, nk, dtype=torch.bool, device=DEVICE), "causal": True}):
        spec = AttentionSpec.from_tensors(q, k, v, fill=fill, **terms)
        out, lse = tma.prepared(spec, SMALL_PACKED).forward(q, k, v, spec)
        assert out.shape == (b, 4, shape[3], 16) and lse.shape == out.shape[:-1]
        assert (out == 0).all() and lse.isneginf().all()
        _assert_oracle(out, q, k, v, spec, TOL[torch.float16], f"{shape} {terms}")
