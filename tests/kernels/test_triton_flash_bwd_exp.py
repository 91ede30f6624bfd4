"""The experimental band backward (``triton_flash_bwd_exp``) against float64 autograd, for every variant.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) with 16-row tiles on shapes that
cross tiles and end mid-tile; the interpreter runs descriptor loads too. The forward is
``triton_flash``'s, whose ``(out, lse)`` the backward takes. GPU tests (``-m gpu``) run every candidate
variant at N = 1024.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.kernels import get
from attnopt.kernels import triton_flash_bwd_exp as bwd
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window
from test_triton_flash_tma import (CASES, DEVICE, GPU_LISTED, MAP_CASES, listed_specs, make_inputs,
                                   terms_on_device)

#: max abs error of a gradient, scaled by max(1, |reference|)
TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
TILES16 = dict(block_m1=16, block_n1=16, block_m2=16, block_n2=16, num_warps=4, num_stages=1)
#: each switch on and off once; 16-row tiles (32 for one kernel) so the tiny shapes below cross several
SWITCHES = {
    "ptr": bwd.Variant(**TILES16),
    "nosplit": bwd.Variant(**TILES16, split=False),
    "perhead": bwd.Variant(**TILES16, gqa_in_program=False),
    "desc": bwd.Variant(**TILES16, descriptors=True),
    "desc_perhead_wide": bwd.Variant(**{**TILES16, "block_n1": 32, "block_m2": 32}, descriptors=True,
                                     gqa_in_program=False),
    "fused": bwd.Variant(**{**TILES16, "block_n1": 32}, fused=True),
    "fused_perhead": bwd.Variant(**{**TILES16, "block_m2": 32}, fused=True, gqa_in_program=False),
    # heavy tiles first, a few heads at a time (3 does not divide the head slots: a smaller last chunk)
    "chunk3": bwd.Variant(**TILES16, heads_per_chunk=3),
    "perhead_chunk2": bwd.Variant(**TILES16, gqa_in_program=False, heads_per_chunk=2),
}


def reference_grads(q, k, v, grad_out, spec):
    """float64 ``(dq, dk, dv)`` by autograd through the oracle."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = naive_attention(q64, k64, v64, spec)
    out.backward(grad_out.double())
    return q64.grad, k64.grad, v64.grad


def forward_and_reference(q, k, v, spec, seed=1):
    """``(out, lse)`` of triton_flash's forward, a random grad_out, and the float64 gradients."""
    out, lse = get("triton_flash").forward(q, k, v, spec, 0)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g).to(q.dtype).to(q.device)
    return out, lse, grad_out, reference_grads(q, k, v, grad_out, spec)


def check(q, k, v, spec, variant, tol, forward=None):
    out, lse, grad_out, reference = forward or forward_and_reference(q, k, v, spec)
    grads = bwd.backward(grad_out, q, k, v, out, lse, spec, variant=variant)
    for name, got, want, t in zip("qkv", grads, reference, (q, k, v)):
        assert got.shape == t.shape and got.dtype == t.dtype, f"d{name}: {got.shape} {got.dtype}"
        got = got.double()
        assert torch.equal(got.isnan(), want.isnan()), f"d{name}: NaN entries differ"
        err = (got - want).nan_to_num(0).abs().max().item()
        scale = max(1.0, want.nan_to_num(0).abs().max().item())
        assert err <= tol * scale, f"d{name}: max abs error {err:.3g} (scale {scale:.3g})"
    return grads


# ------------------------------------------------------------------------------------ CPU (interpreter)
@pytest.mark.parametrize(("switches", "case"), [(s, c) for s in SWITCHES for c in CASES])
def test_variants_match_autograd(switches, case):
    """Each band family with Nq != Nk both ways and GQA 4/2, 8/2, in HF's transposed layout; bf16 for
    the pointer variants, fp16 for the rest."""
    *shape, terms = CASES[case]
    dtype = torch.float16 if SWITCHES[switches].descriptors else torch.bfloat16
    q, k, v, spec = make_inputs(*shape, 16, dtype, terms)
    assert q.stride(-1) == 1 and not q.is_contiguous()
    check(q, k, v, spec, SWITCHES[switches], TOL[dtype])


@pytest.mark.parametrize("fill", [Fill.NEG_INF, Fill.SAFE, Fill.FINITE, Fill.FINITE_ADDED])
def test_rows_without_keys_follow_fill(fill):
    """Bottom-right causal with Nq > Nk: the first Nq - Nk rows see no key. Their gradient is the fill's:
    none (safe), dO / Nk into dV (finite), that plus a uniform softmax's dq/dk (finite added), NaN dV
    (-inf)."""
    q, k, v, spec = make_inputs(1, 4, 2, 40, 17, 16, torch.float16, {"causal": True, "align": Align.BOTTOM_RIGHT},
                                fill=fill)
    assert spec.rows_may_be_empty()
    dq, dk, dv = check(q, k, v, spec, SWITCHES["perhead"], TOL[torch.float16])
    assert dv.isnan().all() if fill == Fill.NEG_INF else dv.isfinite().all()
    assert (dq[:, :, :23] == 0).all() == (fill != Fill.FINITE_ADDED)


#: band families of the random specs: keyword terms of AttentionSpec
BANDS = [{}, {"causal": True}, {"window": Window(5, 2)}, {"window": Window(3, None)},
         {"window": Window(4, None), "causal": True}]


@st.composite
def band_problems(draw):
    """(q, k, v, spec, variant): 1..40 rows and keys, any band and alignment, GQA groups 1/2/4, either
    layout, every switch, 16- or 32-row query tiles in the dK/dV kernel."""
    terms = dict(draw(st.sampled_from(BANDS)), align=draw(st.sampled_from(list(Align))))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    shape = (1, 2 * draw(st.sampled_from([1, 2, 4])), 2, draw(st.integers(1, 40)), draw(st.integers(1, 40)),
             draw(st.sampled_from([16, 32])), dtype)
    q, k, v, spec = make_inputs(*shape, terms, transposed=draw(st.booleans()), fill=Fill.FINITE)
    variant = dataclasses.replace(SWITCHES[draw(st.sampled_from(list(SWITCHES)))],
                                  block_m1=draw(st.sampled_from([16, 32])))
    return q, k, v, spec, variant


@settings(max_examples=12, deadline=None)
@given(problem=band_problems())
def test_random_band_specs(problem):
    q, k, v, spec, variant = problem
    check(q, k, v, spec, variant, TOL[spec.dtype])


@pytest.mark.parametrize("fill", [Fill.SAFE, Fill.FINITE_ADDED])
@pytest.mark.parametrize("case", list(MAP_CASES))
def test_tile_list_terms_match_autograd(case, fill):
    """Key padding (a boolean row, left padding, lengths), documents (HF's packed ids, and ids in any order) and
    dense boolean masks over causal, no band and a window, GQA, in HF's layout: float64 gradients, including
    rows that see no key (fully padded and left-padded rows, all-false mask rows, under either fill)."""
    b, hq, hkv, nq, nk, terms = MAP_CASES[case]
    g = torch.Generator().manual_seed(3)
    q, k, v, spec = make_inputs(b, hq, hkv, nq, nk, 16, torch.float16, terms(g), fill=fill)
    spec = terms_on_device(spec)
    variant = dataclasses.replace(SWITCHES["ptr"], block_n1=32) if hq // hkv == 4 else SWITCHES["perhead"]
    # the listed indices loaded ahead or not, in one launch or two (two: in the chunked order of the tiles)
    variant = dataclasses.replace(variant, prefetch=fill == Fill.SAFE, fused=fill != Fill.SAFE,
                                  heads_per_chunk=3 if fill == Fill.SAFE else 0)
    assert not bwd.unsupported_reasons(q, q, k, v, spec, variant)
    check(q, k, v, spec, variant, TOL[torch.float16])


@st.composite
def listed_problems(draw):
    """(q, k, v, spec, variant): the forward's random tile-list specs (documents, key padding, boolean masks over
    any band), 16- or 32-row tiles in either kernel, dK/dV per kv head or per query head, the full-tile run on or
    off, the listed tiles' indices loaded ahead or not."""
    q, k, v, spec = draw(listed_specs())
    tiles = {name: draw(st.sampled_from([16, 32])) for name in ("block_m1", "block_n1", "block_m2", "block_n2")}
    return q, k, v, spec, dataclasses.replace(SWITCHES[draw(st.sampled_from(["ptr", "perhead"]))], **tiles,
                                              full_run=draw(st.booleans()), prefetch=draw(st.booleans()),
                                              fused=draw(st.booleans()))


@settings(max_examples=10, deadline=None)
@given(problem=listed_problems())
def test_random_listed_specs(problem):
    q, k, v, spec, variant = problem
    check(q, k, v, spec, variant, TOL[spec.dtype])


def test_unsupported_specs_and_variants_are_refused():
    q, k, v, spec = make_inputs(1, 6, 2, 16, 16, 16, torch.float16, {})
    out, lse = get("triton_flash").forward(q, k, v, spec, 0)

    def run(variant, spec=spec, q=q, grad_out=out):
        return bwd.backward(grad_out, q, k, v, out, lse, spec, variant=variant)

    with pytest.raises(ValueError, match="tile lists; use triton_flash"):
        run({}, spec.with_(softcap=30.0))
    with pytest.raises(ValueError, match="heads_per_chunk=-1"):
        run({"heads_per_chunk": -1})
    with pytest.raises(ValueError, match="0 with fused=True"):  # one launch orders its programs itself
        run({"heads_per_chunk": 4, "fused": True})
    with pytest.raises(ValueError, match="tile lists; use triton_flash"):
        run({}, spec.with_(key_padding=torch.tensor([3]), softcap=30.0))
    with pytest.raises(ValueError, match="tile lists; use triton_flash"):  # an additive mask's values enter the scores
        run({}, spec.with_(mask=torch.zeros(16, 16, device=DEVICE)))
    with pytest.raises(ValueError, match="block_n2=24"):
        run({"block_n2": 24})
    with pytest.raises(ValueError, match="num_warps=3"):
        run({"num_warps": 3})
    with pytest.raises(TypeError, match="block_size"):
        run({"block_size": 64})
    with pytest.raises(TypeError, match="Variant or a dict"):
        run(("ptr",))
    # a view starting 2 bytes into its storage: fine for pointers, not for a descriptor
    shifted = torch.randn(1, 6, 16, 24, device=DEVICE).half()[..., 1:17]
    assert bwd.unsupported_reasons(shifted, q, k, v, spec, SWITCHES["ptr"]) == []
    with pytest.raises(ValueError, match="grad_out with strides"):
        run(SWITCHES["desc"], grad_out=shifted)
    with pytest.raises(ValueError, match="q with strides"):
        run(SWITCHES["desc"], q=shifted)


@pytest.mark.parametrize("fill", [Fill.SAFE, Fill.FINITE])
def test_no_keys_at_all(fill):
    q, k, v, spec = make_inputs(1, 4, 2, 5, 0, 16, torch.float16, {"causal": True, "align": Align.BOTTOM_RIGHT},
                                fill=fill)
    out, lse = get("triton_flash").forward(q, k, v, spec, 0)
    dq, dk, dv = bwd.backward(torch.ones_like(out), q, k, v, out, lse, spec, variant=SWITCHES["ptr"])
    assert dq.shape == q.shape and (dq == 0).all() and dk.numel() == 0 and dv.numel() == 0


def test_measured_variants_start_a_causal_rows_heaviest_tiles_first():
    """The measured table's order of the programs: chunked for a causal row at D 128 (the measured one), the grid's
    own for no band, a window, D 64 (not measured) and tile lists (one launch, which orders its own programs)."""
    def variant(d, terms):
        q = torch.empty(1, 8, 4096, d, dtype=torch.bfloat16)
        return bwd.measured_variant(AttentionSpec.from_tensors(q, q, q, **terms))

    assert variant(128, {"causal": True}).heads_per_chunk == bwd.CAUSAL_HEADS_PER_CHUNK[128]
    assert variant(128, {"causal": True, "align": Align.BOTTOM_RIGHT}).heads_per_chunk
    assert variant(128, {}).heads_per_chunk == 0
    assert variant(128, {"causal": True, "window": Window(1023, 0)}).heads_per_chunk == 0
    assert variant(64, {"causal": True}).heads_per_chunk == 0
    listed = variant(128, {"causal": True, "key_padding": torch.tensor([7])})
    assert listed.fused and listed.heads_per_chunk == 0


def test_candidate_variants_cover_every_switch():
    variants = bwd.candidate_variants(128, group_size=4)
    assert {v.split for v in variants} == {True, False}
    assert {v.fused for v in variants} == {True, False}
    assert {v.gqa_in_program for v in variants} == {True, False}
    assert {v.descriptors for v in variants} == ({False, True} if bwd.HAS_DESCRIPTORS else {False})
    assert all(v.gqa_in_program for v in bwd.candidate_variants(64, group_size=1))
    assert len({v.name for v in variants}) == len(variants)


# ------------------------------------------------------------------------------------ GPU
def _check_all(q, k, v, spec, variants, tol):
    """Every variant checked; one failure message listing each variant that failed, with its error."""
    failures, forward = [], forward_and_reference(q, k, v, spec)
    for variant in variants:
        try:
            check(q, k, v, spec, variant, tol, forward)
        except Exception as exc:  # a variant Triton cannot build for this GPU fails with its error
            failures.append(f"{variant.name}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)


#: the default variant's tiles: (block_m1, block_n1, block_m2, block_n2, num_warps, num_stages)
DEFAULT_TILES = dataclasses.astuple(bwd.Variant())[:6]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("d", "causal"), [(64, True), (128, True), (64, False), (128, False)])
def test_gpu_at_1k(d, causal):
    """N = 1024, GQA 8/2 in HF's transposed layout, bf16, against float64. Causal (masked edge and visible
    middle loops): every candidate variant, about 20 compilations per head dim; no band: every switch on
    the default tiles."""
    q, k, v, spec = make_inputs(2, 8, 2, 1024, 1024, d, torch.bfloat16, {"causal": causal})
    variants = bwd.candidate_variants(d, spec.group_size, None if causal else [DEFAULT_TILES])
    _check_all(q, k, v, spec, variants, TOL[torch.bfloat16])


#: name -> (Nq, Nk, terms): windows and bottom-right bands on lengths that end mid-tile
GPU_BANDS = {
    "window_causal": (1000, 1000, {"causal": True, "window": Window(255, 0)}),
    "causal_bottom_right_empty_rows": (1000, 300, {"causal": True, "align": Align.BOTTOM_RIGHT}),
    "window_two_sided": (300, 1000, {"window": Window(100, 37), "align": Align.BOTTOM_RIGHT}),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("band", list(GPU_BANDS))
def test_gpu_bands_and_lengths_not_multiples_of_tiles(band):
    """fp16, the default tiles with each switch off once (split, dK/dV per GQA group, descriptors when
    present); rows without keys get the safe fill's zero gradient."""
    nq, nk, terms = GPU_BANDS[band]
    q, k, v, spec = make_inputs(1, 8, 2, nq, nk, 128, torch.float16, terms)
    variants = [bwd.Variant(), bwd.Variant(split=False, gqa_in_program=False),
                bwd.Variant(descriptors=bwd.HAS_DESCRIPTORS)]
    _check_all(q, k, v, spec, variants, TOL[torch.float16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(GPU_LISTED))
def test_gpu_tile_list_terms(case):
    """Documents, key padding and dense boolean masks through the tile lists, GQA 8/2, bf16, against float64: the
    measured variant of D = 64 and 128, the same with descriptors when present, dK/dV per query head and the
    full-tile run switched, the lists alone with the indices loaded ahead switched, and in one launch or two."""
    b, n, terms = GPU_LISTED[case]
    for d in (64, 128):
        q, k, v, spec = make_inputs(b, 8, 2, n, n, d, torch.bfloat16, terms(torch.Generator().manual_seed(5)),
                                    fill=Fill.FINITE_ADDED)
        spec = terms_on_device(spec)
        measured = bwd.measured_variant(spec)
        # documents and key padding at D 128: the lists alone, indices ahead, one launch
        # (backward_sweep_documents.md); D 64 and a boolean mask: the full run in two launches
        switched = (False, True, True) if bwd.listed_kind(spec) != "mask" and d == 128 else (True, False, False)
        assert (measured.full_run, measured.prefetch, measured.fused) == switched
        variants = [measured, dataclasses.replace(measured, descriptors=bwd.HAS_DESCRIPTORS, gqa_in_program=False,
                                                  full_run=not measured.full_run),
                    dataclasses.replace(measured, prefetch=not measured.prefetch, full_run=False),
                    dataclasses.replace(measured, fused=not measured.fused, full_run=False, prefetch=True)]
        _check_all(q, k, v, spec, variants, TOL[torch.bfloat16])
