"""The experimental band forward (``triton_flash_tma``) against the float64 oracle, for every variant.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) with 16-row tiles on shapes that
cross tiles and end mid-tile; the interpreter runs descriptor loads too, and ignores warp specialization
(which changes the schedule, not the arithmetic), so those variants are checked here for their results
only. GPU tests (``-m gpu``) run every candidate variant at N = 1024.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.kernels import triton_flash_tma as tma
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: max abs error of out on unit-variance inputs, scaled by max(1, |reference|)
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
#: the switch combinations; tiles of 16 so the tiny shapes below cross several
SWITCHES = {
    "ptr": tma.Variant(block_m=16, block_n=16),
    "desc": tma.Variant(descriptors=True, block_m=16, block_n=16),
    "desc_ws": tma.Variant(descriptors=True, warp_specialize=True, block_m=16, block_n=16),
    "ptr_pack": tma.Variant(pack_gqa=True, block_m=16, block_n=16),
    "desc_pack": tma.Variant(descriptors=True, pack_gqa=True, block_m=16, block_n=16),
    "desc_ws_pack": tma.Variant(descriptors=True, warp_specialize=True, pack_gqa=True, block_m=16, block_n=16),
    "ptr_lazy": tma.Variant(lazy_rescale=True, block_m=16, block_n=16),
    "desc_pack_lazy": tma.Variant(descriptors=True, pack_gqa=True, lazy_rescale=True, block_m=16, block_n=16),
    # heavy tiles first, a few heads at a time: 3 does not divide the head slots, so the last chunk is smaller
    "ptr_chunk3": tma.Variant(heads_per_chunk=3, block_m=16, block_n=16),
    "desc_pack_chunk2": tma.Variant(descriptors=True, pack_gqa=True, heads_per_chunk=2, block_m=16, block_n=16),
}
#: name -> (B, Hq, Hkv, Nq, Nk, spec terms): each band family, Nq != Nk both ways, GQA 4/2 and 8/2
CASES = {
    "none_gqa8_2": (1, 8, 2, 37, 50, {}),
    "causal_top_left_nq_lt_nk": (2, 4, 2, 21, 50, {"causal": True}),
    "causal_bottom_right_nq_gt_nk": (1, 8, 2, 50, 21, {"causal": True, "align": Align.BOTTOM_RIGHT}),
    "window": (2, 4, 2, 45, 45, {"window": Window(7, 3)}),
    "window_causal_bottom_right": (1, 8, 2, 30, 45, {"window": Window(9, None), "causal": True,
                                                     "align": Align.BOTTOM_RIGHT}),
}


def _documents(b: int, n: int, g: torch.Generator, count: int) -> torch.Tensor:
    """``[b, n]`` non-decreasing document ids, ``count`` documents of random lengths per row (HF's packing)."""
    rows = []
    for _ in range(b):
        cuts = torch.randperm(n - 1, generator=g)[: count - 1] + 1
        rows.append(torch.zeros(n, dtype=torch.int64).index_fill_(0, cuts, 1).cumsum(0))
    return torch.stack(rows)


#: name -> (B, Hq, Hkv, Nq, Nk, terms(g)): the terms the band kernels walk through tile lists
MAP_CASES = {
    "documents_causal_gqa": (2, 8, 2, 45, 45, lambda g: dict(causal=True, **_doc_pair(2, 45, g, 4))),
    "documents_no_band": (1, 4, 2, 37, 37, lambda g: _doc_pair(1, 37, g, 3)),
    "documents_shuffled_ids": (1, 4, 1, 40, 40, lambda g: {"q_doc": (ids := torch.randint(0, 3, (1, 40),
                                                                                          generator=g)),
                                                            "kv_doc": ids, "causal": True}),
    "key_padding_bool_causal": (2, 4, 2, 40, 40, lambda g: dict(causal=True, key_padding=torch.rand(2, 40,
                                                                                                     generator=g) > 0.3)),
    "key_padding_lengths": (3, 4, 2, 21, 50, lambda g: dict(key_padding=torch.tensor([50, 17, 33]))),
    "key_padding_left_padded_causal": (2, 4, 2, 40, 40, lambda g: dict(
        causal=True, key_padding=torch.arange(40)[None, :] >= torch.tensor([[0], [13]]))),
    "window_documents": (1, 4, 2, 48, 48, lambda g: dict(causal=True, window=Window(9, 0),
                                                         **_doc_pair(1, 48, g, 2))),
    # a window handed over as the [N, N] boolean mask a model builds (broadcast over batch and heads)
    "dense_bool_window": (2, 4, 2, 45, 45, lambda g: dict(mask=_band_mask(45, 45, 9))),
    # whole 16-column stripes masked out: full tiles on both sides of a gap (after a row's first run of full tiles)
    "dense_bool_striped": (1, 4, 2, 40, 80, lambda g: dict(mask=_striped_mask(40, 80))),
    # a mask per batch row and query head, a quarter of it kept: rows and tiles with no key, tiles all kept
    "dense_bool_per_head_causal": (2, 4, 2, 40, 37, lambda g: dict(causal=True, mask=_blocky_mask(
        (2, 4, 40, 37), g))),
}


def _band_mask(nq: int, nk: int, width: int) -> torch.Tensor:
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    return (j <= i) & (j > i - width)


def _striped_mask(nq: int, nk: int, width: int = 16) -> torch.Tensor:
    """``[nq, nk]``: ``width``-column stripes kept whole, except every third from the second, masked whole, and a
    few elements dropped in the last column: full tiles on both sides of a masked gap (a row's full tiles after
    its first run of consecutive ones), and a partial stripe at the end."""
    stripes = torch.arange(-(-nk // width)) % 3 != 1
    keep = stripes.repeat_interleave(width)[:nk].expand(nq, nk).clone()
    keep[::3, -1] = False
    return keep


def _blocky_mask(shape, g: torch.Generator) -> torch.Tensor:
    """A boolean mask kept in 8 x 8 blocks with probability 1/2, then elementwise with probability 3/4."""
    blocks = torch.rand(*shape[:2], -(-shape[2] // 8), -(-shape[3] // 8), generator=g) > 0.5
    blocks = blocks.repeat_interleave(8, 2).repeat_interleave(8, 3)[..., : shape[2], : shape[3]]
    return blocks & (torch.rand(shape, generator=g) > 0.25)


def _doc_pair(b, n, g, count):
    ids = _documents(b, n, g, count)
    return {"q_doc": ids, "kv_doc": ids}


#: name -> (B, N, terms(g)): the tile-list terms at lengths that end mid-tile
GPU_LISTED = {
    "documents_causal": (1, 1000, lambda g: dict(causal=True, **_doc_pair(1, 1000, g, 7))),
    "documents_two_rows": (2, 777, lambda g: _doc_pair(2, 777, g, 3)),
    "left_padding_causal": (2, 1000, lambda g: dict(causal=True, key_padding=torch.arange(1000)[None, :] >=
                                                    torch.tensor([[0], [300]]))),
    "key_lengths": (2, 1000, lambda g: dict(key_padding=torch.tensor([1000, 513]))),
    "dense_bool_window": (1, 1000, lambda g: dict(mask=_band_mask(1000, 1000, 255))),
    "dense_bool_per_head": (2, 1000, lambda g: dict(mask=_blocky_mask((2, 8, 1000, 1000), g))),
    "dense_bool_striped": (1, 1000, lambda g: dict(mask=_striped_mask(1000, 1000, width=128))),
}


def make_inputs(b, hq, hkv, nq, nk, d, dtype, terms, *, transposed=True, seed=0, fill=Fill.SAFE, device=DEVICE):
    """q/k/v as HF hands them over: ``[B, N, H, D]`` tensors seen as ``[B, H, N, D]`` (or contiguous)."""
    g = torch.Generator().manual_seed(seed)

    def randn(h, n):
        if transposed:
            return torch.randn(b, n, h, d, generator=g).to(dtype).to(device).transpose(1, 2)
        return torch.randn(b, h, n, d, generator=g).to(dtype).to(device)

    q, k, v = randn(hq, nq), randn(hkv, nk), randn(hkv, nk)
    return q, k, v, AttentionSpec.from_tensors(q, k, v, fill=fill, **terms)


def terms_on_device(spec: AttentionSpec, device=DEVICE) -> AttentionSpec:
    """The spec with its term tensors (key padding, documents, mask) on ``device``."""
    return spec.with_(**{name: getattr(spec, name).to(device) for name in ("key_padding", "q_doc", "kv_doc", "mask")
                         if getattr(spec, name) is not None})


def oracle_lse(q, k, spec: AttentionSpec) -> torch.Tensor:
    """float64 natural-log log-sum-exp of each row's visible scores; -inf where none is visible."""
    k = k.double().repeat_interleave(spec.group_size, dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * spec.scale  # [B, Hq, Nq, Nk]
    keep = spec.materialize()[0]
    if keep is not None:
        s = s.masked_fill(~keep.to(s.device), float("-inf"))
    return torch.logsumexp(s, dim=-1)


def check(q, k, v, spec, variant, tol):
    out, lse = tma.forward(q, k, v, spec, variant=variant)
    assert out.shape == (spec.batch, spec.q_heads, spec.q_len, spec.v_head_dim) and out.dtype == q.dtype
    assert lse.shape == out.shape[:-1] and lse.dtype == torch.float32
    want = naive_attention(q, k, v, spec).cpu()
    got = out.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), "NaN rows differ"
    err = (got - want).nan_to_num(0).abs().max().item()
    assert err <= tol * max(1.0, want.nan_to_num(0).abs().max().item()), f"out: max abs error {err:.3g}"
    want_lse = oracle_lse(q, k, spec).cpu()
    assert torch.equal(lse.isneginf().cpu(), want_lse.isneginf()), "rows without keys differ"
    lse_err = (lse.double().cpu() - want_lse).nan_to_num(0, 0, 0).abs().max().item()
    assert lse_err <= 1e-3 * max(1.0, want_lse.nan_to_num(0, 0, 0).abs().max().item()), f"lse: error {lse_err:.3g}"
    return out, lse


# ------------------------------------------------------------------------------------ CPU (interpreter)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("switches", list(SWITCHES))
def test_variants_match_oracle(switches, case):
    b, hq, hkv, nq, nk, terms = CASES[case]
    dtype = torch.bfloat16 if "ptr" in switches else torch.float16
    q, k, v, spec = make_inputs(b, hq, hkv, nq, nk, 16, dtype, terms)
    assert not q.is_contiguous() and q.stride(-1) == 1
    check(q, k, v, spec, SWITCHES[switches], TOL[dtype])


@triton.jit
def _order_probe(out, n_tiles, CHUNK: tl.constexpr):
    """Writes ``tma.tile_order``'s (tile, slot) at the program's place in launch order."""
    tile, slot = tma.tile_order(n_tiles, CHUNK)
    pid = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
    tl.store(out + 2 * pid, tile)
    tl.store(out + 2 * pid + 1, slot)


@settings(max_examples=30, deadline=None)
@given(n_tiles=st.integers(1, 7), slots=st.integers(1, 9), chunk=st.integers(0, 11))
def test_tile_order_starts_each_tile_of_every_head_once_heaviest_first(n_tiles, slots, chunk):
    """Every (tile, head slot) exactly once; chunked, in launch order: chunk by chunk of ``chunk`` slots (the last
    one smaller), and inside a chunk tile 0 of each slot before any slot's tile 1."""
    grid = (n_tiles * slots,) if chunk else (n_tiles, slots)
    out = torch.full((n_tiles * slots, 2), -1, dtype=torch.int32, device=DEVICE)
    _order_probe[grid](out, n_tiles, CHUNK=chunk)
    order = [tuple(pair) for pair in out.cpu().tolist()]
    assert sorted(order) == [(t, s) for t in range(n_tiles) for s in range(slots)]
    if chunk:
        chunks = [s // chunk for _, s in order]
        assert chunks == sorted(chunks)
        for c in set(chunks):
            tiles = [t for t, s in order if s // chunk == c]
            assert tiles == sorted(tiles)


@pytest.mark.parametrize("fill", [Fill.NEG_INF, Fill.SAFE, Fill.FINITE])
def test_rows_without_keys_follow_fill(fill):
    """Bottom-right causal with Nq > Nk: the first Nq - Nk rows see no key (out 0 and lse -inf from the
    kernel, then the fill: NaN, 0, or the mean of v)."""
    q, k, v, spec = make_inputs(1, 4, 2, 40, 17, 16, torch.float16, {"causal": True, "align": Align.BOTTOM_RIGHT},
                                fill=fill)
    assert spec.rows_may_be_empty()
    _, lse = check(q, k, v, spec, SWITCHES["desc_pack"], TOL[torch.float16])
    assert lse[:, :, :23].isneginf().all() and lse[:, :, 23:].isfinite().all()


@settings(max_examples=25, deadline=None)
@given(
    switches=st.sampled_from(list(SWITCHES)), group=st.sampled_from([1, 2, 4]), nq=st.integers(1, 40),
    nk=st.integers(1, 40), d=st.sampled_from([16, 32]), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    band=st.sampled_from(["none", "causal", "window", "window_left"]), bottom_right=st.booleans(),
    transposed=st.booleans(), block_n=st.sampled_from([16, 32]),
)
def test_random_band_specs(switches, group, nq, nk, d, dtype, band, bottom_right, transposed, block_n):
    terms = {"none": {}, "causal": {"causal": True}, "window": {"window": Window(5, 2)},
             "window_left": {"window": Window(3, None)}}[band]
    terms["align"] = Align.BOTTOM_RIGHT if bottom_right else Align.TOP_LEFT
    q, k, v, spec = make_inputs(1, 2 * group, 2, nq, nk, d, dtype, terms, transposed=transposed)
    variant = dataclasses.replace(SWITCHES[switches], block_n=block_n)
    check(q, k, v, spec, variant, TOL[dtype])


@pytest.mark.parametrize("fill", [Fill.SAFE, Fill.FINITE_ADDED])
@pytest.mark.parametrize("case", list(MAP_CASES))
def test_tile_list_terms_match_oracle(case, fill):
    """Key padding (a boolean row, left padding, lengths), documents and dense boolean masks over causal, no band and
    a window, GQA, in HF's layout, through the tile lists: against float64, rows that see no key included. Heads
    are packed where the tile lists are shared by a group's heads (all but the per-head mask); the full-tile run
    on and off."""
    b, hq, hkv, nq, nk, terms = MAP_CASES[case]
    q, k, v, spec = make_inputs(b, hq, hkv, nq, nk, 16, torch.float16, terms(torch.Generator().manual_seed(3)),
                                fill=fill)
    spec = terms_on_device(spec)
    switches = "desc" if tma.per_head_lists(spec) else "desc_pack"
    assert tma.listed(spec) and not tma.unsupported_reasons(q, k, v, spec, SWITCHES[switches])
    for full_run in (True, False):
        # the list-only walk also in the chunked order of the tiles (3 head slots per chunk)
        check(q, k, v, spec, dataclasses.replace(SWITCHES[switches], block_n=32 if "gqa" in case else 16,
                                                 full_run=full_run, heads_per_chunk=0 if full_run else 3),
              TOL[torch.float16])


@st.composite
def listed_specs(draw):
    """(q, k, v, spec): 1..48 tokens, documents (ids per batch row) or not, key padding (a boolean row or lengths)
    or not, a boolean mask broadcast over any dims or not (at least one of the three), a band or not, GQA 1/2/4,
    either layout; bf16, rows without keys filled with the mean of v."""
    n = draw(st.integers(1, 48))
    b = draw(st.sampled_from([1, 2]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    hq = 2 * draw(st.sampled_from([1, 2, 4]))
    terms = dict(draw(st.sampled_from([{}, {"causal": True}, {"window": Window(5, 2)},
                                       {"causal": True, "window": Window(6, 0)}])))
    kinds = draw(st.sets(st.sampled_from(["documents", "padding", "lengths", "mask"]), min_size=1, max_size=3))
    if "documents" in kinds:
        terms.update(_doc_pair(b, n, g, min(n, draw(st.integers(1, 6)))))
    if "lengths" in kinds:
        terms["key_padding"] = torch.randint(0, n + 1, (b,), generator=g)
    elif "padding" in kinds:
        terms["key_padding"] = torch.rand(b, n, generator=g) > 0.2
    if "mask" in kinds:
        shape = draw(st.sampled_from([(1, 1, n, n), (b, 1, n, n), (b, hq, n, n), (b, 1, 1, n), "striped"]))
        terms["mask"] = _striped_mask(n, n) if shape == "striped" else _blocky_mask(shape, g)
    q, k, v, spec = make_inputs(b, hq, 2, n, n, 16, torch.bfloat16, terms, transposed=draw(st.booleans()),
                                fill=Fill.FINITE)
    return q, k, v, terms_on_device(spec)


@st.composite
def listed_problems(draw):
    """``listed_specs`` and a variant: heads packed or not (where the tile lists allow), descriptors or not, 16- or
    32-row tiles, the full-tile run on or off."""
    q, k, v, spec = draw(listed_specs())
    pack = draw(st.booleans()) and not tma.per_head_lists(spec)
    variant = dataclasses.replace(SWITCHES["desc_pack" if pack else "desc"], descriptors=draw(st.booleans()),
                                  block_m=draw(st.sampled_from([16, 32])), block_n=draw(st.sampled_from([16, 32])),
                                  full_run=draw(st.booleans()), lazy_rescale=draw(st.booleans()))
    return q, k, v, spec, variant


@settings(max_examples=12, deadline=None)
@given(problem=listed_problems())
def test_random_listed_specs(problem):
    q, k, v, spec, variant = problem
    check(q, k, v, spec, variant, TOL[spec.dtype])


@pytest.mark.parametrize("terms", [{}, {"causal": True}, {"window": Window(20, 0)}], ids=["none", "causal", "window"])
@pytest.mark.parametrize("switches", ["ptr_lazy", "desc_pack_lazy"])
def test_lazy_rescale_while_the_row_maximum_grows_and_falls(switches, terms):
    """Keys whose norms grow along the row, then fall: a tile's maximum often lies far above the last (more than
    2^8: the rescale runs), later ones below it (skipped). In float16, whose range p = exp2(s - m) must stay in,
    the output and log-sum-exp equal float64's."""
    q, k, v, spec = make_inputs(2, 4, 2, 40, 96, 16, torch.float16, terms)
    growth = torch.cat([torch.linspace(0.5, 6.0, 64), torch.linspace(6.0, 0.5, 32)]).to(k.device)
    k = (k.float() * growth[:, None]).to(k.dtype)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * spec.scale / math.log(2)
    first, fourth = scores[..., :16].amax(-1), scores[..., 48:64].amax(-1)  # log2 units, as the kernel's maximum
    assert (fourth - first).max() > 2 * tma.RESCALE_SLACK.value  # rows whose maximum moves more than once
    check(q, k, v, spec, SWITCHES[switches], TOL[torch.float16])


def test_unsupported_specs_and_variants_are_refused():
    q, k, v, spec = make_inputs(1, 6, 2, 16, 16, 16, torch.float16, {})
    with pytest.raises(ValueError, match="tile lists; use triton_flash"):  # an additive mask's values enter the scores
        tma.forward(q, k, v, spec.with_(mask=torch.zeros(16, 16, device=DEVICE)), variant={})
    with pytest.raises(ValueError, match="differs per head"):
        per_head = spec.with_(q_heads=8, mask=torch.ones(1, 8, 16, 16, dtype=torch.bool, device=DEVICE))
        q8 = torch.randn(1, 8, 16, 16, device=DEVICE).half()
        tma.forward(q8, k, v, per_head, variant={"pack_gqa": True, "block_m": 16})
    with pytest.raises(ValueError, match="warp_specialize needs descriptors"):
        tma.forward(q, k, v, spec, variant={"warp_specialize": True})
    with pytest.raises(ValueError, match="group size"):  # 3 query heads per kv head cannot be packed
        tma.forward(q, k, v, spec, variant={"pack_gqa": True, "block_m": 16})
    with pytest.raises(ValueError, match="block_n=24"):
        tma.forward(q, k, v, spec, variant={"block_n": 24})
    with pytest.raises(ValueError, match="dtype torch.float32"):
        q32, k32, v32 = (t.float() for t in (q, k, v))
        tma.forward(q32, k32, v32, AttentionSpec.from_tensors(q32, k32, v32), variant={})
    with pytest.raises(TypeError, match="block_size"):
        tma.forward(q, k, v, spec, variant={"block_size": 64})
    with pytest.raises(ValueError, match="heads_per_chunk=-1 must be 0"):
        tma.forward(q, k, v, spec, variant={"heads_per_chunk": -1})
    # a view starting 2 bytes into its storage: fine for pointers, not for a descriptor
    wide = torch.randn(1, 6, 16, 24, device=DEVICE).half()
    shifted = wide[..., 1:17]
    assert tma.unsupported_reasons(shifted, k, v, spec, tma.Variant(block_m=16, block_n=16)) == []
    with pytest.raises(ValueError, match="cannot be read through a descriptor"):
        tma.forward(shifted, k, v, spec, variant=tma.Variant(descriptors=True))


@pytest.mark.parametrize("fill", [Fill.SAFE, Fill.NEG_INF, Fill.FINITE])
def test_no_keys_at_all(fill):
    """Nk = 0: the original's ``softmax(s) @ v`` sums over no key, so every row is 0 whatever the fill."""
    q, k, v, spec = make_inputs(1, 4, 2, 5, 0, 16, torch.float16, {"causal": True, "align": Align.BOTTOM_RIGHT},
                                fill=fill)
    out, lse = tma.forward(q, k, v, spec, variant=SWITCHES["desc_pack"])
    assert out.shape == (1, 4, 5, 16) and lse.isneginf().all()
    assert (out == 0).all()


def test_a_users_triton_allocator_is_kept():
    """The descriptors' scratch memory: attnopt gives Triton its allocator only where none is set, and keeps one
    the user set (run in an empty context, as a new thread starts: no allocator)."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    def run():
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
        tma.use_scratch_allocator()
        assert _allocation._allocator.get() is tma._scratch

        def mine(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        triton.set_allocator(mine)
        tma.use_scratch_allocator()
        assert _allocation._allocator.get() is mine

    contextvars.Context().run(run)


def test_candidate_variants_cover_every_switch():
    variants = tma.candidate_variants(128, group_size=4)
    # warp specialization is left out: it does not compile for this kernel on sm_90 (test below)
    assert {(v.descriptors, v.warp_specialize, v.pack_gqa) for v in variants} == {
        (False, False, False), (True, False, False), (False, False, True), (True, False, True)}
    assert not any(v.pack_gqa for v in tma.candidate_variants(64, group_size=1))
    assert not any(v.lazy_rescale for v in variants)
    lazy = tma.candidate_variants(128, group_size=4, lazy=True)
    assert {v for v in lazy if v.lazy_rescale} == {dataclasses.replace(v, lazy_rescale=True) for v in variants}
    assert all(v.num_warps < 8 or v.block_m * v.block_n >= 128 * 64 for v in variants)


def test_warp_specialize_is_refused_on_cuda():
    """Every warp-specialized variant failed in Triton's pass manager on an H200 (triton 3.6): on a CUDA
    call the switch is refused with that reason before a launch; the interpreter runs it (ignoring it)."""
    q, k, v, spec = make_inputs(1, 2, 2, 16, 16, 16, torch.float16, {"causal": True}, device="cpu")
    assert tma.unsupported_reasons(q, k, v, spec, SWITCHES["desc_ws"]) == []
    on_cuda = [types.SimpleNamespace(is_cuda=True, stride=t.stride, data_ptr=lambda: 0, element_size=t.element_size)
               for t in (q, k, v)]
    cuda = spec.with_(device=torch.device("cuda"))
    assert any("pass manager" in r for r in tma.unsupported_reasons(*on_cuda, cuda, SWITCHES["desc_ws"]))
    assert tma.unsupported_reasons(*on_cuda, cuda, SWITCHES["desc"]) == []


def test_measured_variants_by_head_dim_band_and_row_length(monkeypatch):
    """The table's rules: band specs in half precision at D 64/128 on the GPU it was measured on; 128-row
    tiles for long rows (a window's rows are as long as its width, not as the sequence); query heads packed
    where the group is a power of two dividing the tile; anything else keeps triton_flash's own forward."""
    monkeypatch.setattr(tma, "_capability", lambda device: tma.MEASURED_ON)

    def variant(nq, nk, d, terms, hq=8, hkv=8, dtype=torch.bfloat16, **extra):
        q = torch.empty(1, hq, nq, d, dtype=dtype)
        k = torch.empty(1, hkv, nk, d, dtype=dtype)
        return tma.measured_variant(AttentionSpec.from_tensors(q, k, k, **terms, **extra))

    # a causal row's heaviest query tiles start first, a few heads at a time; no band and windows keep the grid
    chunk = tma.CAUSAL_HEADS_PER_CHUNK
    assert variant(4096, 4096, 128, {"causal": True}) == tma.Variant(block_m=64, block_n=64, heads_per_chunk=chunk)
    assert variant(16384, 16384, 128, {"causal": True}) == tma.Variant(block_m=128, block_n=64, num_warps=8,
                                                                       heads_per_chunk=chunk)
    assert variant(300, 1000, 64, {"causal": True}, align=Align.BOTTOM_RIGHT).heads_per_chunk == chunk
    assert variant(16384, 16384, 128, {}) == tma.Variant(block_m=128, block_n=128, num_warps=8)
    assert variant(16384, 16384, 64, {}) == tma.Variant(block_m=128, block_n=128, num_warps=4)
    assert variant(1, 16384, 64, {}).block_m == 128  # a decode row over 16k keys is a long row
    window = {"causal": True, "window": Window(1023, 0)}
    assert variant(32768, 32768, 128, window) == tma.Variant(block_m=64, block_n=64)
    assert variant(4096, 4096, 128, {"causal": True}, hq=32, hkv=8).pack_gqa
    assert not variant(4096, 4096, 128, {"causal": True}, hq=24, hkv=8).pack_gqa  # a group of 3
    assert variant(4096, 4096, 128, {"causal": True}, dtype=torch.float32) is None
    assert variant(4096, 4096, 96, {"causal": True}) is None
    assert variant(4096, 4096, 128, {"causal": True}, dropout_p=0.1) is None
    # key padding, documents: the listed table's own tiles, whatever the band; a dense boolean mask: its tiles
    padded = {"causal": True, "key_padding": torch.tensor([7])}
    assert variant(4096, 4096, 128, padded) == tma.Variant(block_m=64, block_n=64) == variant(
        32768, 32768, 128, {**window, "key_padding": torch.tensor([7])})
    ids = torch.zeros(1, 4096, dtype=torch.long)
    documents = {"q_doc": ids, "kv_doc": ids}
    assert variant(4096, 4096, 128, {**padded, **documents}) == tma.Variant(block_m=64, block_n=64)
    dense = torch.ones(1, 1, 4096, 4096, dtype=torch.bool)
    assert variant(4096, 4096, 128, {"mask": dense}) == tma.Variant(block_m=128, block_n=64, num_warps=8)
    assert variant(4096, 4096, 128, {"mask": dense, **documents}) == tma.LISTED_VARIANTS[(128, "mask")]
    assert variant(4096, 4096, 128, {"mask": torch.zeros(1, 1, 4096, 4096)}) is None  # additive
    assert variant(4096, 4096, 128, {"causal": True}, hq=32, hkv=8,
                   mask=torch.ones(1, 1, 4096, 4096, dtype=torch.bool)).pack_gqa
    assert not variant(4096, 4096, 128, {"causal": True}, hq=32, hkv=8,
                       mask=torch.ones(1, 32, 4096, 4096, dtype=torch.bool)).pack_gqa  # lists differ per head
    monkeypatch.setattr(tma, "_capability", lambda device: (8, 0))
    assert variant(4096, 4096, 128, {"causal": True}) is None  # measured on sm_90 only


@pytest.mark.parametrize("terms, d", [({"causal": True}, 64), ({"window": Window(9, 2)}, 128), ({}, 64)],
                         ids=["causal", "window", "none"])
def test_triton_flash_forward_runs_the_measured_variant(monkeypatch, terms, d):
    """``triton_flash``'s forward takes the band forward's measured variant where there is one: the same
    output and log-sum-exp as calling it directly, right against float64, in q's layout."""
    from attnopt.kernels import get

    monkeypatch.setattr(tma, "_capability", lambda device: tma.MEASURED_ON)
    ran = []
    run_forward = tma.run_forward
    monkeypatch.setattr(tma, "run_forward", lambda *a: ran.append(a[-1]) or run_forward(*a))
    q, k, v, spec = make_inputs(2, 4, 2, 40, 48, d, torch.bfloat16, terms)
    out, lse = get("triton_flash").forward(q, k, v, spec, 0)
    assert ran == [tma.measured_variant(spec)] and ran[0].pack_gqa
    direct_out, direct_lse = check(q, k, v, spec, ran[0], TOL[torch.bfloat16])
    assert torch.equal(out, direct_out) and torch.equal(lse, direct_lse)
    assert out.transpose(1, 2).is_contiguous()  # HF's [B, N, H, D] layout, as the general forward makes it
    ran.clear()
    padded = spec.with_(key_padding=torch.tensor([48, 30], device=DEVICE))
    out, lse = get("triton_flash").forward(q, k, v, padded, 0)
    assert ran == [tma.measured_variant(padded)]  # key padding: the tile lists
    direct_out, direct_lse = check(q, k, v, padded, ran[0], TOL[torch.bfloat16])
    assert torch.equal(out, direct_out) and torch.equal(lse, direct_lse)
    ran.clear()
    get("triton_flash").forward(q, k, v, spec.with_(mask=torch.zeros(40, 48, device=DEVICE)), 0)
    assert ran == []  # an additive mask: the general forward


@pytest.mark.parametrize("fill, terms, nk", [(Fill.SAFE, {}, 200), (Fill.FINITE_ADDED, {"causal": True}, 40)],
                         ids=["safe_full_200", "finite_added_causal_40"])
def test_triton_flash_prepared_call_is_its_inference_for_every_call_of_its_plan(monkeypatch, fill, terms, nk):
    """``triton_flash.prepare`` picks and checks the band variant once; each call of the plan (new padding values,
    rows left without a key in the second call, the same padding written in place, a call without padding, lengths
    in place of a boolean row) is right against float64 and gives ``infer``'s output bit for bit, through the
    variant's prepared forward. The padding written in place between two calls changes both what its tile lists
    say (200 keys: whole tiles become empty) and which rows need their fill (causal: rows see no key)."""
    from attnopt.kernels import get

    monkeypatch.setattr(tma, "_capability", lambda device: tma.MEASURED_ON)
    q, k, v, spec = make_inputs(2, 4, 2, 40, nk, 64, torch.bfloat16, terms, fill=fill)
    kernel = get("triton_flash")
    padded = spec.with_(key_padding=torch.ones(2, nk, dtype=torch.bool, device=DEVICE))
    run = kernel.prepare(padded)
    assert isinstance(run, tma.PreparedForward) and run.variant == tma.measured_variant(padded)
    padding = torch.ones(2, nk, dtype=torch.bool, device=DEVICE)
    calls = []
    for kept in ([nk, 3 * nk // 4], [nk // 2, nk]):
        call = spec.with_(key_padding=torch.ones(2, nk, dtype=torch.bool, device=DEVICE))
        call.key_padding[0, : nk - kept[0]] = False  # left padding: with causal, row 0's first queries see no key
        call.key_padding[1, : nk - kept[1]] = False
        calls.append(call)
    calls.append(spec.with_(key_padding=padding))
    calls.append(calls[-1])  # the same tensor again (the next layer: the last call's answer)
    calls.append(spec)
    calls.append(spec.with_(key_padding=torch.tensor([nk, 7], device=DEVICE)))
    for i, call in enumerate(calls):
        if i == 3:
            padding[1, : 2 * nk // 3] = False  # written in place between two calls: its version moves
        got = run(q, k, v, call)
        want = naive_attention(q, k, v, call).cpu()
        assert not got.isnan().any() and not want.isnan().any()  # neither fill gives NaN
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= TOL[torch.bfloat16] * max(1.0, want.abs().max().item()), f"call {i}: max abs error {err:.3g}"
        torch.testing.assert_close(got, kernel.infer(q, k, v, call), atol=0, rtol=0)
    assert kernel.prepare(spec.with_(dropout_p=0.1)) == kernel.infer


# ------------------------------------------------------------------------------------ GPU
def _check_all(q, k, v, spec, variants, tol):
    """Every variant checked; one failure message listing each variant that failed, with its error."""
    failures = []
    for variant in variants:
        try:
            check(q, k, v, spec, variant, tol)
        except Exception as exc:  # a variant Triton cannot build for this GPU fails with its error
            failures.append(f"{variant.name}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_every_variant_at_1k(d):
    """Every candidate variant at N = 1024, causal (masked edge and unmasked middle loops): GQA 8/2 in
    HF's transposed layout, bf16, against float64. About 25 compilations per head dim."""
    q, k, v, spec = make_inputs(2, 8, 2, 1024, 1024, d, torch.bfloat16, {"causal": True})
    _check_all(q, k, v, spec, tma.candidate_variants(d, spec.group_size), TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_every_switch_at_1k_full(d):
    q, k, v, spec = make_inputs(2, 8, 2, 1024, 1024, d, torch.bfloat16, {})
    _check_all(q, k, v, spec, tma.candidate_variants(d, spec.group_size, [(128, 64, 4, 3)]), TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("terms", [
    {"causal": True, "window": Window(255, 0)},
    {"causal": True, "align": Align.BOTTOM_RIGHT},  # Nq < Nk below: a KV-cache prefill
    {"window": Window(100, 37), "align": Align.BOTTOM_RIGHT},
], ids=["window_causal", "causal_bottom_right", "window_two_sided"])
def test_gpu_bands_and_lengths_not_multiples_of_tiles(terms):
    """Windows and bottom-right bands, lengths that end mid-tile, fp16: each switch once (128x64 tiles)."""
    q, k, v, spec = make_inputs(1, 8, 2, 300, 1000, 128, torch.float16, terms)
    _check_all(q, k, v, spec, tma.candidate_variants(128, spec.group_size, [(128, 64, 4, 3)]), TOL[torch.float16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [
    (2, 8, 2, 700, 700, 128, {"causal": True}),  # 64-row tiles, GQA packed
    (1, 4, 4, 333, 1000, 64, {"causal": True, "align": Align.BOTTOM_RIGHT}),
    (1, 4, 2, 200, 12400, 128, {}),  # long rows: 128x128 tiles, 8 warps
    (1, 4, 1, 130, 12400, 64, {"causal": True, "align": Align.BOTTOM_RIGHT}),  # long rows, GQA 4 packed
    (2, 4, 4, 600, 600, 128, {"causal": True, "window": Window(127, 0)}),
], ids=["causal_gqa", "prefill_d64", "long_full", "long_causal_d64", "window"])
def test_gpu_triton_flash_forward_takes_the_measured_variant(monkeypatch, case):
    """On the GPU the table was measured on, ``triton_flash``'s forward runs the band forward's measured
    variant for band specs (elsewhere its own forward): right against float64 in HF's layout, lengths
    that end mid-tile."""
    from attnopt.kernels import get

    b, hq, hkv, nq, nk, d, terms = case
    q, k, v, spec = make_inputs(b, hq, hkv, nq, nk, d, torch.bfloat16, terms)
    ran = []
    run_forward = tma.run_forward
    monkeypatch.setattr(tma, "run_forward", lambda *a: ran.append(a[-1]) or run_forward(*a))
    out, lse = get("triton_flash").forward(q, k, v, spec, 0)
    measured = tma.measured_variant(spec)
    assert ran == ([measured] if measured is not None else [])
    if tma._capability(q.device) == tma.MEASURED_ON:
        assert measured is not None
    want = naive_attention(q, k, v, spec).cpu()
    err = (out.double().cpu() - want).abs().max().item()
    assert err <= TOL[torch.bfloat16] * max(1.0, want.abs().max().item()), f"out: max abs error {err:.3g}"
    want_lse = oracle_lse(q, k, spec).cpu()
    assert (lse.double().cpu() - want_lse).abs().max().item() <= 1e-3 * max(1.0, want_lse.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(GPU_LISTED))
def test_gpu_tile_list_terms(monkeypatch, case):
    """Documents, key padding and dense boolean masks through the tile lists, GQA 8/2, bf16, against float64, at
    lengths that end mid-tile: at D = 64 and 128, the measured variant (what ``triton_flash``'s forward runs, heads
    packed where the lists allow), the same with descriptors, and 128-row tiles with 8 warps and the full-tile run
    switched."""
    from attnopt.kernels import get

    b, n, terms = GPU_LISTED[case]
    ran = []
    run_forward = tma.run_forward
    monkeypatch.setattr(tma, "run_forward", lambda *a: ran.append(a[-1]) or run_forward(*a))
    for d in (64, 128):
        q, k, v, spec = make_inputs(b, 8, 2, n, n, d, torch.bfloat16, terms(torch.Generator().manual_seed(5)),
                                    fill=Fill.FINITE_ADDED)
        spec = terms_on_device(spec)
        measured = tma.measured_variant(spec)
        assert measured is not None and measured.pack_gqa != tma.per_head_lists(spec)
        assert measured.full_run  # every tile-list kind walks its full run as a range (tile_lists.md)
        variants = [measured, dataclasses.replace(measured, descriptors=tma.HAS_DESCRIPTORS),
                    dataclasses.replace(measured, block_m=128, block_n=64, num_warps=8, full_run=not measured.full_run)]
        _check_all(q, k, v, spec, variants, TOL[torch.bfloat16])
        ran.clear()
        out, lse = get("triton_flash").forward(q, k, v, spec, 0)
        assert ran == [measured]
        direct_out, direct_lse = tma.forward(q, k, v, spec, variant=measured)
        assert torch.equal(out, direct_out) and torch.equal(lse, direct_lse)
