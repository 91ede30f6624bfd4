"""triton_flash against the float64 oracle, for every term, dtype, layout and head dim it claims.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on tiny shapes
that still cross tiles (interpreter tiles are 16, tile maps 32); GPU tests
(``-m gpu``) use realistic shapes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt
from attnopt.kernels import triton_flash
from attnopt.kernels.block_map import EMPTY, FULL, PARTIAL, TileLists, tile_state
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.reference import add_term
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: max abs error on unit-variance inputs, scaled by max(1, |reference|) for gradients
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)


def _doc_ids(b, n, g):
    return torch.sort(torch.randint(0, 3, (b, n), generator=g), dim=1).values


#: every mask term the kernel claims: name -> spec terms for (B, Hq, Nq, Nk, dtype)
TERMS = {
    "none": lambda b, h, nq, nk, dt, g: {},
    "causal": lambda b, h, nq, nk, dt, g: {"causal": True},
    "causal_bottom_right": lambda b, h, nq, nk, dt, g: {"causal": True, "align": Align.BOTTOM_RIGHT},
    "window": lambda b, h, nq, nk, dt, g: {"window": Window(7, 3)},
    "window_left_only": lambda b, h, nq, nk, dt, g: {"window": Window(None, 2), "align": Align.BOTTOM_RIGHT},
    "window_causal": lambda b, h, nq, nk, dt, g: {"window": Window(20, None), "causal": True},
    "key_lengths": lambda b, h, nq, nk, dt, g: {"key_padding": torch.randint(1, nk + 1, (b,), generator=g)},
    "key_padding_bool": lambda b, h, nq, nk, dt, g: {"key_padding": torch.rand(b, nk, generator=g) > 0.3},
    "key_padding_prefix": lambda b, h, nq, nk, dt, g: {
        "key_padding": torch.arange(nk)[None, :] < torch.randint(1, nk + 1, (b, 1), generator=g)},
    "document": lambda b, h, nq, nk, dt, g: {"q_doc": _doc_ids(b, nq, g), "kv_doc": _doc_ids(1, nk, g)},
    "bias_broadcast": lambda b, h, nq, nk, dt, g: {"bias": torch.randn(h, 1, nk, generator=g)},
    "bias_half": lambda b, h, nq, nk, dt, g: {"bias": torch.randn(b, 1, nq, nk, generator=g).to(dt)},
    "mask_bool": lambda b, h, nq, nk, dt, g: {"mask": torch.rand(nq, nk, generator=g) > 0.4},
    "mask_additive": lambda b, h, nq, nk, dt, g: {
        "mask": torch.where(torch.rand(b, h, nq, nk, generator=g) > 0.3, 0.0, torch.finfo(dt).min).to(dt)},
    "softcap_scale": lambda b, h, nq, nk, dt, g: {"softcap": 3.0, "scale": 0.3},
}
#: (B, Hq, Hkv, Nq, Nk): grouped-query self-attention, and cross attention with one kv head (MQA). 48 crosses the
#: interpreter's 16-row tiles and ends inside a 32-wide tile-map tile (a partial one), at about half the
#: interpreter time of 64
LAYOUTS = {"gqa": (2, 4, 2, 48, 48), "cross": (1, 2, 1, 17, 64)}


def make_inputs(layout, d, dtype, term, seed=0, fill=Fill.SAFE, dv=None, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, nq, nk = layout
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(b, hkv, nk, dv or d, generator=g, dtype=torch.float32).to(dtype)
    g_terms = torch.Generator().manual_seed(seed + 1)  # the terms do not depend on the value width
    terms = TERMS[term](b, hq, nq, nk, dtype, g_terms) if isinstance(term, str) else dict(term)
    terms = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in terms.items()}
    q, k, v = q.to(device), k.to(device), v.to(device)
    return q, k, v, AttentionSpec.from_tensors(q, k, v, fill=fill, **terms)


def grad_oracle(q, k, v, spec: AttentionSpec, drop: torch.Tensor | None = None) -> torch.Tensor:
    """float64 attention written as the replaced model would be, so autograd gives its gradients:
    an eager -inf fill or added -inf (NaN rows), a finfo.min fill (uniform rows), SDPA's safe softmax (zero rows)."""
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(spec.group_size, 1)
    v = v.repeat_interleave(spec.group_size, 1)
    s = (q @ k.transpose(-1, -2)) * spec.scale
    if spec.softcap is not None:
        s = torch.tanh(s / spec.softcap) * spec.softcap
    if spec.fill == Fill.FINITE_REPLACED_ADDED:  # the oracle's own arithmetic is differentiable
        return naive_attention(q, k, v, spec.with_(kv_heads=spec.q_heads))  # k, v repeated above
    keep, additive = spec.materialize()
    for term in additive:
        s = add_term(s, term.to(s.device), spec.dtype)
    keep = torch.ones_like(s, dtype=torch.bool) if keep is None else keep.to(s.device).expand_as(s)
    empty = (~keep).all(-1, keepdim=True)
    if spec.fill == Fill.FINITE:
        p = torch.softmax(s.masked_fill(~keep, torch.finfo(torch.float64).min), -1)
    elif spec.fill == getattr(Fill, "FINITE_ADDED", None):
        p = torch.softmax(s + (~keep).double() * torch.finfo(torch.float64).min, -1)
    elif spec.fill == Fill.NEG_INF:
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    elif spec.fill == Fill.NEG_INF_ADDED:  # added: the NaN rows' gradient passes to q and k too
        p = torch.softmax(s + torch.zeros_like(s).masked_fill(~keep, float("-inf")), -1)
    else:
        p = torch.softmax(s.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if drop is not None:
        p = p * drop / (1.0 - spec.dropout_p)
    return p @ v


def run_kernel(q, k, v, spec, grad_out, seed=0, atomic_dq=False):
    kernel = triton_flash.TritonFlashKernel(atomic_dq=atomic_dq)
    out, lse = kernel.forward(q, k, v, spec, seed)
    dq, dk, dv, _, _ = kernel.backward(grad_out, q, k, v, out, lse, spec, seed, False, False)
    return out, lse, (dq, dk, dv)


def assert_close(name, got, want, tol):
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN positions differ"
    scale = max(1.0, want.nan_to_num(0).abs().max().item())
    err = (got - want).nan_to_num(0).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol * scale:.3g}"


def check_against_oracles(q, k, v, spec, tol, atomic_dq=False, seed=1):
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(seed)).to(
        q.dtype).to(q.device)
    out, lse, grads = run_kernel(q, k, v, spec, grad_out, atomic_dq=atomic_dq)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert_close("out", out, naive_attention(q, k, v, spec), tol)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(grad_oracle(*leaves, spec), leaves, grad_out.double())
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want):
        assert_close(name, got, ref, tol * 4)


# ------------------------------------------------------------------------------------ CPU (interpreter)
#: (term, dtype) pairs of the interpreter's term test: every term in float32 and in one half precision, the
#: half precisions alternating over the terms, so that each meets both layouts and about half the terms
#: (the interpreter runs a term in float16 and bfloat16 by the same code; the GPU tests run both on hardware)
TERM_DTYPES = [(term, dtype) for i, term in enumerate(TERMS)
               for dtype in (torch.float32, (torch.float16, torch.bfloat16)[i % 2])]


def test_every_term_meets_every_dtype_somewhere():
    assert {t for t, _ in TERM_DTYPES} == set(TERMS) and {d for _, d in TERM_DTYPES} == set(DTYPES)
    halves = [d for _, d in TERM_DTYPES if d != torch.float32]
    assert abs(halves.count(torch.float16) - halves.count(torch.bfloat16)) <= 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("term, dtype", TERM_DTYPES, ids=lambda x: str(x))
def test_terms_dtypes_layouts(term, dtype, layout):
    q, k, v, spec = make_inputs(LAYOUTS[layout], 16, dtype, term)
    check_against_oracles(q, k, v, spec, TOL[dtype])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("term", ["none", "causal", "window", "document", "mask_bool", "bias_half"])
def test_head_dim_80_padded(term, layout):
    q, k, v, spec = make_inputs(LAYOUTS[layout], 80, torch.float16, term)
    check_against_oracles(q, k, v, spec, TOL[torch.float16])


@pytest.mark.parametrize("fill", list(Fill))
@pytest.mark.parametrize("term", [
    {"key_padding": torch.tensor([0, 9])},  # a batch with no key at all
    {"causal": True, "align": Align.BOTTOM_RIGHT},  # Nq > Nk: the first rows see nothing
    {"window": Window(2, 0), "key_padding": torch.rand(2, 17) > 0.5},
    {"mask": torch.rand(2, 1, 40, 17) > 0.8},
])
def test_rows_without_keys_follow_fill(term, fill):
    q, k, v, spec = make_inputs((2, 4, 2, 40, 17), 16, torch.float32, term, fill=fill)
    assert spec.rows_may_be_empty()
    if fill == Fill.FINITE_REPLACED_ADDED and "mask" in term:  # detection makes it of a band and padding only
        with pytest.raises(NotImplementedError, match="band and key padding only"):
            run_kernel(q, k, v, spec, torch.randn(q.shape[:-1] + (v.shape[-1],)).to(q))
        return
    check_against_oracles(q, k, v, spec, TOL[torch.float32])


def test_no_empty_rows_proved_for_plain_bands():
    q, k, v, spec = make_inputs((1, 2, 1, 17, 64), 16, torch.float32, {"causal": True})
    assert not spec.rows_may_be_empty()
    assert spec.with_(align=Align.BOTTOM_RIGHT, q_len=70).rows_may_be_empty()


@pytest.mark.parametrize("term", ["causal", "document", "key_padding_bool"])
def test_atomic_dq_option_matches_and_default_repeats(term):
    """The default dQ kernel repeats bit for bit; the atomic-dQ option gives the same gradients."""
    q, k, v, spec = make_inputs(LAYOUTS["gqa"], 16, torch.float32, term)
    check_against_oracles(q, k, v, spec, TOL[torch.float32], atomic_dq=True)
    grad_out = torch.randn_like(q)
    first = run_kernel(q, k, v, spec, grad_out)[2]
    again = run_kernel(q, k, v, spec, grad_out)[2]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("d,dtype,terms,fill", [
    (64, torch.float16, {"causal": True}, Fill.SAFE),
    (128, torch.bfloat16, {}, Fill.SAFE),
    (64, torch.bfloat16, {"causal": True, "align": Align.BOTTOM_RIGHT}, Fill.NEG_INF),  # Nq > Nk: empty rows
    (128, torch.bfloat16, {"causal": True, "q_doc": _doc_ids(1, 40, torch.Generator().manual_seed(1)),
                           "kv_doc": _doc_ids(1, 40, torch.Generator().manual_seed(1))}, Fill.FINITE_ADDED),
    # left padding under causal: the first 10 rows see no key
    (64, torch.float16, {"causal": True, "key_padding": torch.tensor([[False] * 10 + [True] * 30])},
     Fill.FINITE_ADDED),
    (64, torch.float16, {"key_padding": torch.tensor([27])}, Fill.FINITE),
    (64, torch.float16, {"causal": True, "window": Window(8, 0)}, Fill.SAFE),
    (128, torch.bfloat16, {"window": Window(5, 3)}, Fill.SAFE),
    # a window over left padding: the first 10 rows see no key, the next ones only part of their window
    (64, torch.bfloat16, {"causal": True, "window": Window(6, 0),
                          "key_padding": torch.tensor([[False] * 10 + [True] * 30])}, Fill.FINITE_ADDED),
    (128, torch.float16, {"causal": True, "window": Window(11, 0),
                          "q_doc": _doc_ids(1, 40, torch.Generator().manual_seed(2)),
                          "kv_doc": _doc_ids(1, 40, torch.Generator().manual_seed(2))}, Fill.SAFE),
    # a boolean mask a model built: rows and tiles all false, tiles all true
    (64, torch.bfloat16, {"mask": (torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(4)) > 0.4)
                          & (torch.arange(40)[:, None] % 7 != 3)}, Fill.FINITE_ADDED),
], ids=["d64_causal", "d128_none", "d64_bottom_right_empty_rows", "d128_documents", "d64_left_padding_empty_rows",
        "d64_key_lengths", "d64_causal_window", "d128_two_sided_window", "d64_window_left_padding_empty_rows",
        "d128_window_documents", "d64_dense_bool_mask"])
def test_measured_band_backward_serves_its_specs(d, dtype, terms, fill, monkeypatch):
    """Causal, windowed or no band at D 64/128 in half precision, with key padding, documents or a boolean mask
    on top: the backward is the band backward's measured variant (benchmarks/results/backward_sweep.md,
    kernels.md), with the original's gradients, GQA and rows without keys."""
    calls = []
    run = triton_flash.band_bwd.run_backward
    monkeypatch.setattr(triton_flash.band_bwd, "run_backward", lambda *a: calls.append(a[-1]) or run(*a))
    nq = 40 if terms.get("align") is None else 48
    q, k, v, spec = make_inputs((1, 4, 2, nq, 40), d, dtype, terms, fill=fill)
    check_against_oracles(q, k, v, spec, TOL[dtype])
    measured = triton_flash.band_bwd.MEASURED_VARIANTS[(d, bool(terms.get("causal")))]
    if ("q_doc" in terms or "key_padding" in terms) and d == 128:  # lists, indices ahead, one launch
        measured = dataclasses.replace(measured, full_run=False, prefetch=True, fused=True)
    assert calls == [measured]


@pytest.mark.parametrize("case", ["window_softcap", "softcap", "additive_mask", "float32", "head_dim_32",
                                  "atomic_dq"])
def test_general_backward_keeps_the_specs_not_measured(case, monkeypatch):
    """Other terms (softcap, an additive mask), float32, other head dims and the atomic-dQ option keep the
    general backward."""
    monkeypatch.setattr(triton_flash.band_bwd, "run_backward", lambda *a: pytest.fail("band backward used"))
    d = 32 if case == "head_dim_32" else 64
    dtype = torch.float32 if case == "float32" else torch.float16
    terms = {"window_softcap": {"causal": True, "window": Window(8, 0), "softcap": 20.0},
             "softcap": {"causal": True, "softcap": 20.0, "key_padding": torch.tensor([40, 25])},
             "additive_mask": {"mask": torch.randn(2, 1, 40, 40, generator=torch.Generator().manual_seed(0))}
             }.get(case, {"causal": True})
    q, k, v, spec = make_inputs((2, 4, 2, 40, 40), d, dtype, terms)
    check_against_oracles(q, k, v, spec, TOL[dtype], atomic_dq=case == "atomic_dq")


@pytest.mark.parametrize("term", ["none", "causal", "mask_bool"])
def test_dropout_mask_regenerated_by_backward(term):
    """With v = I the output row is the dropped probability row: read the Philox mask back out,
    then check forward and gradients on random v against the oracle under that same mask."""
    layout, p_drop, seed = (1, 2, 1, 17, 64), 0.25, 1234
    q, k, eye, spec = make_inputs(layout, 16, torch.float32, term, dv=64)
    eye = torch.eye(64, device=q.device)[None, None]
    spec = spec.with_(dropout_p=p_drop)
    kernel = triton_flash.TritonFlashKernel()
    probs, _ = kernel.forward(q, k, eye, spec.with_(v_head_dim=64), seed)
    drop = (probs != 0).double().cpu()
    visible = naive_attention(q, k, eye, spec.with_(dropout_p=0.0, v_head_dim=64)).cpu() != 0
    kept = drop[visible].mean().item()
    assert abs(kept - (1 - p_drop)) < 0.06, kept

    v = torch.randn(1, 1, 64, 16, device=q.device)
    spec = spec.with_(v_head_dim=16)
    grad_out = torch.randn(1, 2, 17, 16, device=q.device)
    out, _, grads = run_kernel(q, k, v, spec, grad_out, seed=seed)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    cpu_spec = make_inputs(layout, 16, torch.float32, term, device="cpu")[3].with_(dropout_p=p_drop)
    ref = grad_oracle(*leaves, cpu_spec, drop=drop)
    assert_close("out", out, ref, 1e-4)
    want = torch.autograd.grad(ref, leaves, grad_out.double().cpu())
    for name, got, r in zip(("dq", "dk", "dv"), grads, want):
        assert_close(name, got, r, 4e-4)


@pytest.mark.parametrize("mask", ["bool_per_head_query", "bool_transposed_view", "additive"])
def test_tile_state_is_sound_against_brute_force(mask):
    g = torch.Generator().manual_seed(3)
    b, h, nq, nk = 2, 3, 70, 45
    q = torch.zeros(b, h, nq, 8)
    k = torch.zeros(b, 1, nk, 8)
    mask = {"bool_per_head_query": lambda: torch.rand(1, h, nq, 1, generator=g) > 0.1,
            # a mask read through strides (built key-major, handed over transposed), a quarter of its tiles empty
            "bool_transposed_view": lambda: ((torch.rand(b, 1, nk, nq, generator=g) > 0.1)
                                             & (torch.arange(nk)[:, None] % 16 < 12)).transpose(-1, -2),
            "additive": lambda: torch.where(torch.rand(b, 1, nq, nk, generator=g) > 0.2, 0.0, float("-inf"))}[mask]()
    spec = AttentionSpec.from_tensors(
        q, k, k, causal=True, align=Align.BOTTOM_RIGHT, window=Window(30, None),
        key_padding=torch.rand(b, nk, generator=g) > 0.2, q_doc=_doc_ids(b, nq, g), kv_doc=_doc_ids(b, nk, g),
        mask=mask,
    )
    state = tile_state(spec, 16, 8)
    keep = spec.keep_tile(0, nq, 0, nk).expand(b, h, nq, nk)
    for qt in range(state.shape[2]):
        for kt in range(state.shape[3]):
            tile = keep[:, :, qt * 16:(qt + 1) * 16, kt * 8:(kt + 1) * 8]
            full = tile.flatten(2).all(-1) & ((kt + 1) * 8 <= nk)
            want = torch.where(full, FULL, torch.where(tile.flatten(2).any(-1), PARTIAL, EMPTY))
            got = state[:, :, qt, kt].expand(b, h).long()
            # sound: never skips a visible score, never drops the mask on a masked one; full is exact,
            # empty may be conservative (terms are classified one by one, then combined)
            assert torch.equal(got == FULL, want == FULL), (qt, kt)
            assert bool(((got != EMPTY) | (want == EMPTY)).all()), (qt, kt)


@settings(max_examples=40, deadline=None)
@given(state=st.lists(st.lists(st.sampled_from([EMPTY, PARTIAL, FULL]), min_size=1, max_size=12), min_size=1,
                      max_size=6).filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_tile_lists_of_any_state(state):
    """Per row: the partial and full tiles listed in ascending order, counted, and ``full_run`` the number of
    consecutive full tiles from the first (what the band kernels walk as a range of columns)."""
    grid = torch.tensor(state, dtype=torch.int8)[None, None]
    lists = TileLists.from_state(grid)
    for r, row in enumerate(state):
        for kind, count, index in ((PARTIAL, lists.partial_count, lists.partial_index),
                                   (FULL, lists.full_count, lists.full_index)):
            cols = [c for c, s_ in enumerate(row) if s_ == kind]
            assert count[0, 0, r].item() == len(cols) and index[0, 0, r, : len(cols)].tolist() == cols
        full = [c for c, s_ in enumerate(row) if s_ == FULL]
        run = next((i for i, c in enumerate(full) if c != full[0] + i), len(full))
        assert lists.full_run[0, 0, r].item() == run


def test_a_masks_tiles_pooled_from_its_grain_are_its_tiles_scanned_directly(monkeypatch):
    """The forward's and the backward kernels' tile maps of a dense mask are pooled from one scan at
    ``block_map.GRAIN``: per tile, the same (any, all) as a scan at the kernel's own tiles, for boolean and
    additive masks, broadcast dims, lengths that end mid-tile, tiles of several grains each; one scan serves
    every tile shape, and an in-place change of the mask is seen."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from attnopt.kernels import block_map

    @settings(max_examples=40, deadline=None)
    @given(shape=st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 3]), st.sampled_from([1, 5, 40, 70]),
                           st.sampled_from([1, 16, 45, 64])),
           tiles=st.lists(st.tuples(st.sampled_from([16, 32, 48, 64]), st.sampled_from([16, 32, 64])), min_size=1,
                          max_size=3),
           additive=st.booleans(), seed=st.integers(0, 1000))
    def check(shape, tiles, additive, seed):
        g = torch.Generator().manual_seed(seed)
        blocks = torch.rand(*shape[:2], -(-shape[2] // 16), -(-shape[3] // 16), generator=g) > 0.4
        mask = blocks.repeat_interleave(16, 2).repeat_interleave(16, 3)[..., :shape[2], :shape[3]]
        mask = mask & (torch.rand(shape, generator=g) > 0.1)  # whole tiles kept, dropped, partly kept
        if additive:
            mask = torch.where(mask, torch.where(torch.rand(shape, generator=g) > 0.5, 0.0, -1.5), float("-inf"))
        for block_m, block_n in tiles:
            got = block_map._mask_any_all(mask, block_m, block_n)
            want = block_map._mask_tiles(mask, block_m, block_n)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (block_m, block_n)

    check()
    mask = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    scans = []
    direct = block_map._mask_tiles
    monkeypatch.setattr(block_map, "_mask_tiles", lambda *a: scans.append(a[1:]) or direct(*a))
    for tiles in ((32, 32), (16, 64), (64, 16)):
        assert bool(block_map._mask_any_all(mask, *tiles)[1].all())
    assert scans == [(16, 16)]  # one scan at the grain for the three tile shapes
    mask[0, 0, 5, 60] = False  # written in place: the next map sees it
    assert not bool(block_map._mask_any_all(mask, 32, 32)[1][0, 0, 0, 1])


def test_through_the_public_op_with_autograd():
    q, k, v, spec = make_inputs(LAYOUTS["gqa"], 16, torch.float32, "window_causal")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attnopt.attention(*leaves, causal=True, window=(20, None), kernel="triton_flash")
    out.backward(torch.ones_like(out))
    ref_leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
    grad_oracle(*ref_leaves, spec).backward(torch.ones_like(out, dtype=torch.float64))
    assert_close("out", out, naive_attention(q, k, v, spec), 1e-4)
    for got, ref in zip(leaves, ref_leaves):
        assert_close("grad", got.grad, ref.grad, 4e-4)


@pytest.mark.parametrize("term", ["causal", "document", "key_padding_bool"])
def test_output_laid_out_like_hugging_face_queries(term):
    """q, k, v as a Hugging Face layer passes them (``[B, H, N, D]`` views of ``[B, N, H, D]`` projections):
    the output is made in the queries' layout, so the layer's ``transpose(1, 2).reshape`` is a view and a
    training step keeps no copy of it beside the saved output; values and gradients against float64, with
    the output's gradient in that layout as it then arrives."""
    b, hq, hkv, n, d = 2, 4, 2, 40, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, n, h, d, generator=g).to(DEVICE).transpose(1, 2) for h in (hq, hkv, hkv))
    terms = TERMS[term](b, hq, n, n, torch.float32, torch.Generator().manual_seed(4))
    if term == "document":
        terms["kv_doc"] = terms["q_doc"]
    spec = AttentionSpec.from_tensors(q, k, v, **{name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t
                                                 for name, t in terms.items()})
    grad_out = torch.randn(b, n, hq, d, generator=g).to(DEVICE).transpose(1, 2)
    out, lse, grads = run_kernel(q, k, v, spec, grad_out)
    merged = out.transpose(1, 2).reshape(b, n, hq * d)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None, "the layer's reshape copied"
    assert_close("out", out, naive_attention(q, k, v, spec), 1e-4)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(grad_oracle(*leaves, spec), leaves, grad_out.double())
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want):
        assert_close(name, got, ref, 4e-4)
    # queries already contiguous in [B, H, N, D]: the output is too
    out, _ = triton_flash.TritonFlashKernel().forward(q.contiguous(), k, v, spec, 0)
    assert out.is_contiguous()


def test_bias_grad_falls_back_to_the_exact_reference():
    q, k, v, spec = make_inputs(LAYOUTS["cross"], 16, torch.float32, "bias_broadcast")
    kernel = triton_flash.TritonFlashKernel()
    out, lse = kernel.forward(q, k, v, spec, 0)
    dq, dk, dv, dbias, dmask = kernel.backward(torch.ones_like(out), q, k, v, out, lse, spec, 0, True, False)
    assert dbias is not None and dbias.shape == spec.bias.shape and dmask is None


def test_capabilities_are_honest(monkeypatch):
    kernel = triton_flash.TritonFlashKernel()
    spec = make_inputs(LAYOUTS["cross"], 16, torch.float32, "none", device="cpu")[3]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("CUDA" in r for r in kernel.not_supported_reasons(spec))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel.not_supported_reasons(spec) == []
    assert kernel.cost(spec) >= triton_flash.INTERPRETER_COST
    assert any("float64" in r for r in kernel.not_supported_reasons(spec.with_(dtype=torch.float64)))
    assert any("head_dim" in r for r in kernel.not_supported_reasons(spec.with_(head_dim=512)))
    mask_spec = make_inputs(LAYOUTS["gqa"], 16, torch.float32, "mask_bool", device="cpu")[3]
    assert kernel.memory_bytes(mask_spec) > 0 == kernel.memory_bytes(spec)


# ------------------------------------------------------------------------------------ GPU
MAP_TERMS = {"map_terms": lambda b, h, nq, nk, dt, g: {
    **TERMS["document"](b, h, nq, nk, dt, g), **TERMS["key_padding_bool"](b, h, nq, nk, dt, g),
    **TERMS["mask_bool"](b, h, nq, nk, dt, g)}}
#: (terms, dtype, head dim, atomic dQ): each distinct term set compiles its own kernels
GPU_CASES = [
    ("none", torch.bfloat16, 128, False), ("causal", torch.float16, 64, True),
    ("window_causal", torch.bfloat16, 128, False), ("map_terms", torch.bfloat16, 128, False),
    ("map_terms", torch.bfloat16, 128, True), ("none", torch.float32, 64, False),
    ("softcap_scale", torch.bfloat16, 96, False),
    # the band backward's measured variants (causal or no band, D 64/128, half precision)
    ("causal", torch.bfloat16, 64, False), ("causal", torch.float16, 128, False),
]


@pytest.fixture
def one_config(monkeypatch):
    """Autotuning compiles every config of every term set: the tests need one."""
    from attnopt.kernels import triton_flash_bwd, triton_flash_fwd

    for tuner in (triton_flash_fwd._attn_fwd, triton_flash_bwd._attn_bwd_dkdv, triton_flash_bwd._attn_bwd_dq):
        monkeypatch.setattr(tuner, "configs", tuner.configs[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("term,dtype,d,atomic_dq", GPU_CASES, ids=lambda x: str(x))
def test_gpu_realistic(term, dtype, d, atomic_dq, one_config, monkeypatch):
    monkeypatch.setitem(TERMS, "map_terms", MAP_TERMS["map_terms"])
    q, k, v, spec = make_inputs((2, 8, 2, 1024, 2048), d, dtype, term, seed=5)
    if term == "window_causal":
        spec = spec.with_(window=Window(300, None), align=Align.BOTTOM_RIGHT)
    tol = 3e-3 if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else TOL[dtype]
    check_against_oracles(q, k, v, spec, tol, atomic_dq=atomic_dq)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_sdpa_at_4k():
    q, k, v = (torch.randn(1, 16, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ours = attnopt.attention(q, k, v, causal=True, kernel="triton_flash")
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert (ours.float() - ref).abs().max().item() < 2e-2


def test_tile_lists_cached_per_mask_tensor_and_version():
    from attnopt.kernels.block_map import tile_lists

    q, k, v, spec = make_inputs(LAYOUTS["gqa"], 16, torch.float32, "mask_bool")
    first = tile_lists(spec, 32, 32)
    assert tile_lists(spec, 32, 32) is first
    spec.mask.zero_()  # in place: the version counter moves, the lists are rebuilt
    rebuilt = tile_lists(spec, 32, 32)
    assert rebuilt is not first and int(rebuilt.partial_count.sum() + rebuilt.full_count.sum()) == 0
    check_against_oracles(q, k, v, spec.with_(fill=Fill.FINITE), TOL[torch.float32])


def test_autotuners_key_on_length_buckets():
    """The autotuners key on power-of-two length buckets: a length that changes every call (generation,
    variable batches) reuses the tuned configuration instead of benchmarking again."""
    from attnopt.kernels.triton_flash import tune_bucket
    from attnopt.kernels.triton_flash_bwd import _attn_bwd_dkdv, _attn_bwd_dq
    from attnopt.kernels.triton_flash_fwd import _attn_fwd

    assert [tune_bucket(n) for n in (0, 1, 127, 128, 129, 1000, 1024, 1025, 32768)] == [
        128, 128, 128, 128, 256, 1024, 1024, 2048, 32768]
    for kernel in (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq):
        assert "Nq" not in kernel.keys and "Nk" not in kernel.keys and {"NQ_TUNE", "NK_TUNE"} <= set(kernel.keys)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bound_launch_gives_tritons_results(monkeypatch):
    """``launch.BOUND``: every call after a signature's first goes to the compiled kernel's launcher directly.
    Forward and backward, bitwise the results of Triton's own launch path, across new specializations:
    lengths (16 divides or not, 1), a misaligned query tensor, dtypes, mask terms, GQA; and the bindings
    were made (the launch convention of this Triton was recognized, not refused)."""
    from attnopt.kernels import launch

    kernel = attnopt.kernels.get("triton_flash")
    cases = [((2, 8, 2, 256, 256), torch.bfloat16, "causal"), ((2, 8, 2, 255, 257), torch.bfloat16, "causal"),
             ((1, 4, 4, 1, 300), torch.float16, "none"), ((2, 8, 2, 128, 128), torch.float16, "map_terms")]
    monkeypatch.setitem(TERMS, "map_terms", MAP_TERMS["map_terms"])

    def run(q, k, v, spec):
        out, lse = kernel.forward(q, k, v, spec, 0)
        grads = kernel.backward(torch.ones_like(out), q, k, v, out, lse, spec.with_(requires_grad=True), 0, False,
                                False)
        return [out, lse, *grads[:3]]

    for misaligned in (False, True):
        for layout, dtype, term in cases:
            q, k, v, spec = make_inputs(layout, 64, dtype, term, seed=3, device="cuda")
            if misaligned:  # the same values 2 elements past a 16-byte boundary
                q = torch.empty(q.numel() + 2, dtype=dtype, device="cuda")[2:].view(q.shape).copy_(q)
                assert q.data_ptr() % 16 != 0
            launch.forget()
            monkeypatch.setattr(launch, "BOUND", False)
            want = [run(q, k, v, spec) for _ in range(2)][-1]
            monkeypatch.setattr(launch, "BOUND", True)
            got = [run(q, k, v, spec) for _ in range(3)][-1]  # bind (Triton's path, watched), then bound
            assert not any(state.unbindable for state in launch._KERNELS.values()), "Triton's launch convention was not recognized"
            assert launch._BOUND, "nothing was bound"
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


@settings(max_examples=8, deadline=None)
@given(n=st.sampled_from([70, 130, 200]), group=st.sampled_from([1, 2]), documents=st.integers(1, 6),
       padding=st.sampled_from(["none", "left", "lengths"]), window=st.sampled_from([None, 37]),
       seed=st.integers(0, 2 ** 16))
def test_measured_backward_on_tile_lists_of_any_layout(n, group, documents, padding, window, seed):
    """Documents at random boundaries, with left padding (rows without a key), key lengths or neither, and a
    causal window or none, GQA or not, over several tiles of D = 128 in bfloat16: the backward is the registered
    one-launch variant with the listed indices loaded ahead (``LISTED``), with the original's gradients."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n - 1, generator=g)[:documents - 1] + 1
    doc = torch.zeros(n, dtype=torch.long)
    doc[cuts] = 1
    doc = doc.cumsum(0)[None]
    terms = {"causal": True, "q_doc": doc, "kv_doc": doc}
    if window is not None:
        terms["window"] = Window(window, 0)
    if padding == "left":
        start = int(torch.randint(1, n // 2, (1,), generator=g))
        terms["key_padding"] = (torch.arange(n) >= start)[None]
    elif padding == "lengths":
        terms["key_padding"] = torch.randint(n // 2, n + 1, (1,), generator=g)
    q, k, v, spec = make_inputs((1, 2 * group, 2, n, n), 128, torch.bfloat16, terms, seed=seed,
                                fill=Fill.FINITE_ADDED)
    calls = []
    run = triton_flash.band_bwd.run_backward
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_flash.band_bwd, "run_backward", lambda *a: calls.append(a[-1]) or run(*a))
        check_against_oracles(q, k, v, spec, TOL[torch.bfloat16], seed=seed)
    measured = triton_flash.band_bwd.MEASURED_VARIANTS[(128, True)]
    assert calls == [dataclasses.replace(measured, **triton_flash.band_bwd.LISTED[128])]
