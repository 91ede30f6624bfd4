"""The reference kernel equals the float64 oracle on any spec, forward and backward."""

from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnopt
from attnopt.kernels import reference
from attnopt.kernels.naive import naive_attention
from attnopt.kernels.spec import Align, AttentionSpec, Fill, Window

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


@contextmanager
def small_tiles(k_block=8, tile_elements=256):
    """Force many query chunks and key blocks so chunking and block skipping are exercised."""
    saved = reference.K_BLOCK, reference.TILE_ELEMENTS
    reference.K_BLOCK, reference.TILE_ELEMENTS = k_block, tile_elements
    try:
        yield
    finally:
        reference.K_BLOCK, reference.TILE_ELEMENTS = saved


@contextmanager
def fused_tiles(fuse: bool):
    """The CPU tiles through ATen's fused attention (``reference.fused``) or through the kernel's own ops."""
    saved = reference.FUSED_CPU
    reference.FUSED_CPU = fuse
    try:
        yield
    finally:
        reference.FUSED_CPU = saved


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """A random attention call: shapes, GQA, cross lengths, and any combination of mask terms."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    q_len = draw(st.integers(1, 33))
    kv_len = draw(st.integers(1, 33))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    v_dim = draw(st.sampled_from([head_dim, 6]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q = randn(batch, kv_heads * group, q_len, head_dim)
    k = randn(batch, kv_heads, kv_len, head_dim)
    v = randn(batch, kv_heads, kv_len, v_dim)
    # Fill.FINITE_REPLACED_ADDED is made of a band and key padding only: tests/passes/test_detect_round4.py
    terms = dict(fill=draw(st.sampled_from([f for f in Fill if f != Fill.FINITE_REPLACED_ADDED])))
    causal = draw(st.sampled_from([None, Align.TOP_LEFT, Align.BOTTOM_RIGHT]))
    if causal is not None:
        terms.update(causal=True, align=causal)
    if draw(st.booleans()):
        terms["window"] = Window(draw(st.one_of(st.none(), st.integers(0, 9))), draw(st.one_of(st.none(), st.integers(0, 9))))
        terms.setdefault("align", draw(st.sampled_from(list(Align))))
    if draw(st.booleans()):
        if draw(st.booleans()):
            terms["key_padding"] = torch.randint(0, kv_len + 1, (batch,), generator=gen)
        else:
            terms["key_padding"] = torch.rand(batch, kv_len, generator=gen) > 0.3
    if draw(st.booleans()):
        q_doc = torch.sort(torch.randint(0, 3, (batch, q_len), generator=gen)).values
        terms["q_doc"] = q_doc
        terms["kv_doc"] = q_doc if q_len == kv_len else torch.sort(torch.randint(0, 3, (batch, kv_len), generator=gen)).values
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(batch, kv_heads * group, q_len, kv_len), (1, kv_heads * group, 1, kv_len), (q_len, kv_len)]))
        terms["bias"] = randn(*shape)
    mask_kind = draw(st.sampled_from([None, "bool", "additive"]))
    if mask_kind == "bool":
        terms["mask"] = torch.rand(batch, 1, q_len, kv_len, generator=gen) > 0.4
    elif mask_kind == "additive":
        terms["mask"] = randn(1, 1, q_len, kv_len)
    if draw(st.booleans()):
        terms["softcap"] = draw(st.sampled_from([1.0, 5.0]))
    if draw(st.booleans()):
        terms["scale"] = draw(st.sampled_from([0.1, 1.0]))
    return q, k, v, AttentionSpec.from_tensors(q, k, v, **terms)


def assert_matches_oracle(out, ref, dtype):
    assert out.dtype == dtype
    assert torch.equal(out.isnan(), ref.isnan()), "NaN rows differ from the oracle"
    torch.testing.assert_close(out.double(), ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype], equal_nan=True)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "own_ops"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_forward_matches_float64_oracle(problem, fuse):
    q, k, v, spec = problem
    spec.validate()
    with small_tiles(), fused_tiles(fuse):
        out, lse = reference.ReferenceKernel().forward(q, k, v, spec, seed=0)
    assert_matches_oracle(out, naive_attention(q, k, v, spec), q.dtype)
    assert lse.shape == q.shape[:-1]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "own_ops"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(dtypes=(torch.float64,)))
def test_gradients_match_autograd_through_the_oracle(problem, fuse):
    q, k, v, spec = problem
    bias_needs_grad = spec.bias is not None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    bias = spec.bias.clone().requires_grad_() if bias_needs_grad else None
    mask = spec.mask.clone().requires_grad_() if spec.mask is not None and spec.mask.is_floating_point() else spec.mask
    oracle_spec = spec.with_(bias=bias, mask=mask)
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    ref = naive_attention(*leaves, oracle_spec)
    inputs = leaves + [t for t in (bias, mask) if t is not None and t.requires_grad]
    expected = torch.autograd.grad(ref, inputs, grad_out, allow_unused=True)

    kernel = reference.ReferenceKernel()
    with small_tiles(), fused_tiles(fuse):
        out, lse = kernel.forward(q, k, v, spec, seed=0)
        got = kernel.backward(grad_out, q, k, v, out, lse, spec, 0, bias_needs_grad, mask is not None and mask.is_floating_point())
    got = [g for g in got if g is not None]
    for name, g, e in zip(["dq", "dk", "dv", "dbias/dmask", "dmask"], got, expected):
        e = torch.zeros_like(g) if e is None else e
        torch.testing.assert_close(g, e, atol=1e-8, rtol=1e-6, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fill", list(Fill))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fully_masked_rows_follow_the_fill(fill, dtype):
    q, k, v = (torch.randn(2, 2, 6, 8, dtype=dtype) for _ in range(3))
    padding = torch.tensor([[True] * 6, [False] * 6])  # batch 1 sees no key at all
    out = attnopt.attention(q, k, v, key_padding_mask=padding, fill=fill.value, kernel="reference")
    masked = out[1].float()
    if fill in (Fill.NEG_INF, Fill.NEG_INF_ADDED):
        assert masked.isnan().all()
    elif fill == Fill.SAFE:
        assert (masked == 0).all()
    else:
        torch.testing.assert_close(masked, v[1].float().mean(1, keepdim=True).expand_as(masked), atol=TOLERANCE[dtype], rtol=0)
    assert not out[0].isnan().any()


def test_half_precision_additive_mask_saturates_like_eager():
    """A fp16 finfo.min mask added to fp16 scores saturates: fully masked rows average uniformly."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float16) * 3 for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float16)
    mask[..., 2, :] = torch.finfo(torch.float16).min
    eager = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + mask, dim=-1) @ v
    out = attnopt.attention(q, k, v, attn_mask=mask, kernel="reference")
    torch.testing.assert_close(out, eager, atol=2e-3, rtol=2e-3)


def test_memory_stays_linear_in_sequence_length():
    """The workspace is a few tiles: 4x the length does not grow it, where [Nq, Nk] grows 16x."""

    def workspace(n):
        q = torch.empty(1, 2, n, 16, device="meta")
        return reference.ReferenceKernel().memory_bytes(AttentionSpec.from_tensors(q, q, q, causal=True))

    assert workspace(4 * 16384) <= 1.1 * workspace(16384)  # past the tile cap it stops growing
    assert workspace(8192) <= workspace(16384) < 8192 * 8192 * 2 * 4


def test_causal_skips_blocks_above_the_diagonal():
    q, k, v = (torch.randn(1, 1, 64, 8) for _ in range(3))
    spec = AttentionSpec.from_tensors(q, k, v, causal=True)
    with small_tiles(k_block=8, tile_elements=64):
        skipper = reference._Skipper(spec)
        visited = list(reference._key_blocks(spec, skipper, 0, 8))
    assert visited == [(0, 8)]


def test_dropout_backward_regenerates_the_forward_mask():
    """The gradient of f(q, k, v) = kernel output with a fixed seed passes gradcheck."""
    kernel = reference.ReferenceKernel()
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, dropout_p=0.3)

    class Fixed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = kernel.forward(q, k, v, spec, seed=1234)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            return kernel.backward(grad_out, q, k, v, out, lse, spec, 1234, False, False)[:3]

    out = Fixed.apply(q, k, v)
    no_drop = kernel.forward(q, k, v, spec.with_(dropout_p=0.0), seed=0)[0]
    assert not torch.allclose(out, no_drop), "dropout had no effect"
    assert torch.autograd.gradcheck(Fixed.apply, (q, k, v))


def test_dropout_keeps_the_expected_mean():
    q, k = torch.zeros(1, 1, 256, 4), torch.zeros(1, 1, 256, 4)
    v = torch.ones(1, 1, 256, 4)
    out = attnopt.attention(q, k, v, dropout_p=0.25, kernel="reference")
    assert abs(out.mean().item() - 1.0) < 0.02


def _visited(spec: AttentionSpec) -> tuple[int, int]:
    """(key blocks, score entries per (batch, head)) the forward visits, counted from ``_key_blocks``."""
    q_chunk, _ = reference.chunk_sizes(spec)
    skipper = reference._Skipper(spec)
    blocks = entries = 0
    for q0 in range(0, spec.q_len, q_chunk):
        q1 = min(q0 + q_chunk, spec.q_len)
        for k0, k1 in reference._key_blocks(spec, skipper, q0, q1):
            blocks += 1
            entries += (q1 - q0) * (k1 - k0)
    return blocks, entries


class _NoSkipping(reference._Skipper):
    """Every key of every chunk, every tile masked: the kernel as if it knew nothing of the band."""

    def key_range(self, q0, q1):
        return 0, self.spec.kv_len

    def unmasked(self, q0, q1, k0, k1):
        return False

    def empty(self, q0, q1, k0, k1):
        return False


@pytest.mark.parametrize("window,align", [((16, 0), Align.TOP_LEFT), ((5, 7), Align.TOP_LEFT), ((16, 0), Align.BOTTOM_RIGHT),
                                          ((None, 0), Align.TOP_LEFT), ((0, None), Align.BOTTOM_RIGHT)])
def test_band_skipping_equals_the_unskipped_result_and_visits_fewer_blocks(window, align, monkeypatch):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 200, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 230, 8, dtype=torch.float64) for _ in range(2))
    spec = AttentionSpec.from_tensors(q, k, v, window=Window(*window), align=align, fill=Fill.SAFE)
    with small_tiles(k_block=32, tile_elements=2 * 4 * 32 * 32):
        skipped, unskipped = _skipping_changes_nothing(q, k, v, spec, monkeypatch)
    assert skipped[0] < unskipped[0] and skipped[1] < unskipped[1], (skipped, unskipped)


def _skipping_changes_nothing(q, k, v, spec: AttentionSpec, monkeypatch) -> tuple[tuple[int, int], tuple[int, int]]:
    """Forward and backward with the skipping and without it (every key visited) agree, and equal the oracle.
    Returns what each visited (``_visited``)."""
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    kernel = reference.ReferenceKernel()
    out, lse = kernel.forward(q, k, v, spec, seed=0)
    grads = kernel.backward(grad_out, q, k, v, out, lse, spec, 0, False, False)
    skipped = _visited(spec)
    with monkeypatch.context() as m:
        m.setattr(reference, "_Skipper", _NoSkipping)
        full_out, full_lse = kernel.forward(q, k, v, spec, seed=0)
        full_grads = kernel.backward(grad_out, q, k, v, full_out, full_lse, spec, 0, False, False)
        unskipped = _visited(spec)
    torch.testing.assert_close(out, full_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, full_lse, atol=1e-12, rtol=1e-12)
    for got, want in zip(grads[:3], full_grads[:3]):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, naive_attention(q, k, v, spec), atol=1e-10, rtol=1e-10)
    return skipped, unskipped


def test_a_narrow_window_visits_about_twice_its_width_per_row():
    """Causal window 128 at N = 8192: ~2 x 129 keys per row are visited, not N / 2."""
    n, width = 8192, 129
    q = torch.empty(1, 4, n, 32, device="meta")
    spec = AttentionSpec.from_tensors(q, q, q, causal=True, window=Window(width - 1, 0))
    blocks, entries = _visited(spec)
    per_row = entries / n
    assert width <= per_row <= 2 * width, per_row
    assert blocks == -(-n // reference.chunk_sizes(spec)[0])  # one key block per query chunk
    elements, tiles, _ = reference.visits(spec)
    assert elements == entries * 4 and tiles == blocks  # the cost model counts what the kernel visits


def test_causal_visits_about_half_the_scores():
    q = torch.empty(1, 4, 4096, 32, device="meta")
    spec = AttentionSpec.from_tensors(q, q, q, causal=True)
    _, entries = _visited(spec)
    assert entries < 0.6 * 4096 * 4096, entries / 4096**2


def test_packed_documents_visit_their_own_keys_only(monkeypatch):
    """Packed documents (sorted ids) bound each chunk's keys to its documents' span: same result, fewer keys."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 300, 8, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([[40, 100, 60, 100], [150, 50, 90, 10]])
    doc = torch.stack([torch.repeat_interleave(torch.arange(4), row) for row in lengths])  # [2, 300]
    spec = AttentionSpec.from_tensors(q, k, v, q_doc=doc, kv_doc=doc, fill=Fill.FINITE)
    with small_tiles(k_block=64, tile_elements=2 * 2 * 32 * 64):
        bounded, unbounded = _skipping_changes_nothing(q, k, v, spec, monkeypatch)
    assert bounded[1] < 0.6 * unbounded[1], (bounded, unbounded)


def test_memory_estimate_follows_the_band():
    """A narrow window's tiles are about twice its width wide, not a whole key block."""
    q = torch.empty(1, 8, 8192, 64, device="meta")
    kernel = reference.ReferenceKernel()
    causal = AttentionSpec.from_tensors(q, q, q, causal=True)
    window = causal.with_(window=Window(127, 0))
    q_chunk, k_block = reference.chunk_sizes(window)
    tile, rows = 8 * q_chunk * (q_chunk + 127) * 4, 8 * q_chunk * (64 + 64 + 2) * 4  # a score tile, row state
    assert 3 * tile <= kernel.memory_bytes(window) <= 3 * tile + 2 * rows
    assert kernel.memory_bytes(window) < kernel.memory_bytes(causal) / 2


def _counting(monkeypatch) -> dict:
    """Count the calls of ATen's fused forward and backward that the reference kernel makes."""
    calls = {"forward": 0, "backward": 0}
    for name, key in (("flash_attention_cpu", "forward"), ("flash_attention_cpu_backward", "backward")):
        real = getattr(reference, name)

        def counted(*args, real=real, key=key, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(reference, name, counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("terms", ["window", "window_padding_bias", "documents", "bool_mask_empty_rows", "finfo_min"])
def test_fused_tiles_equal_the_kernels_own_ops_and_the_oracle(terms, dtype, monkeypatch):
    """On the CPU the tiles go through ATen's fused attention, forward and backward, over several key blocks per
    chunk (merged by their log-sum-exps), grouped heads and rows without keys; a row whose scores sit near a
    huge fill falls back to the kernel's own ops. Both paths give the oracle's output and gradients."""
    torch.manual_seed(0)
    b, hq, hkv, n, d = 2, 4, 2, 150, 16
    q = torch.randn(b, hq, n, d, dtype=dtype)
    k, v = (torch.randn(b, hkv, n, d, dtype=dtype) for _ in range(2))
    kw = dict(fill=Fill.FINITE)
    if terms.startswith("window"):
        kw.update(causal=True, window=Window(60, 0))
    if terms == "window_padding_bias":
        kw.update(key_padding=torch.tensor([n, 97]), bias=torch.randn(1, hq, n, n))  # float32 bias: fused
    if terms == "documents":
        doc = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 70, 40]))[None].expand(b, n)
        kw.update(q_doc=doc, kv_doc=doc)
    if terms == "bool_mask_empty_rows":
        mask = torch.rand(b, 1, n, n) > 0.5
        mask[:, :, 7] = False  # row 7 sees no key
        kw.update(mask=mask)
    if terms == "finfo_min":  # HF's finite fill: padded keys at finfo.min, a row with every key there
        mask = torch.zeros(b, 1, n, n)
        mask[1, :, :, 100:] = torch.finfo(torch.float32).min
        mask[1, :, 5] = torch.finfo(torch.float32).min
        kw.update(mask=mask, fill=Fill.NEG_INF)
    spec = AttentionSpec.from_tensors(q, k, v, **kw)
    assert reference.fused(spec)
    grad_out = torch.randn(b, hq, n, d, dtype=dtype)
    kernel = reference.ReferenceKernel()
    results = {}
    for fuse in (True, False):
        calls = _counting(monkeypatch)
        with small_tiles(k_block=32, tile_elements=b * hq * 32 * 32), fused_tiles(fuse):
            out, lse = kernel.forward(q, k, v, spec, seed=0)
            grads = kernel.backward(grad_out, q, k, v, out, lse, spec, 0, False, False)[:3]
        results[fuse] = (out, lse, *grads)
        if not fuse:
            assert calls == {"forward": 0, "backward": 0}
        elif terms == "finfo_min":  # batch row 1's lse is near finfo.min: those chunks take the own ops
            assert calls["forward"] > 0
        else:
            assert calls["forward"] > 0 and calls["backward"] > 0, calls
    tol = dict(atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype] * 10)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results[True], results[False]):
        torch.testing.assert_close(got, want, equal_nan=True, **tol, msg=lambda m: f"{name}: {m}")
    ref = naive_attention(q, k, v, spec)
    torch.testing.assert_close(results[True][0].double(), ref, equal_nan=True, **tol)
    if dtype == torch.float64:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = torch.autograd.grad(naive_attention(*leaves, spec), leaves, grad_out)
        for name, got, want in zip(("dq", "dk", "dv"), results[True][2:], expected):
            torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fused_only_where_aten_computes_the_same_function():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    spec = AttentionSpec.from_tensors(q, k, v, causal=True)
    assert reference.fused(spec)
    assert not reference.fused(spec.with_(dropout_p=0.1))  # the kernel's own dropout, per tile
    assert not reference.fused(spec.with_(softcap=5.0))
    assert not reference.fused(AttentionSpec.from_tensors(q, k, torch.randn(1, 2, 8, 6)))  # two head dims
    half = [t.bfloat16() for t in (q, k, v)]
    assert not reference.fused(AttentionSpec.from_tensors(*half, bias=torch.randn(8, 8, dtype=torch.bfloat16)))
    assert reference.fused(AttentionSpec.from_tensors(*half, bias=torch.randn(8, 8)))
    meta = torch.empty(1, 2, 8, 4, device="meta")
    assert not reference.fused(AttentionSpec.from_tensors(meta, meta, meta))


def _forward_backward_match_oracle(q, k, v, spec, grad_out, atol=1e-10, grad_atol=1e-8, grad_rtol=1e-6):
    """``reference``'s forward and backward on these inputs equal autograd through the float64 oracle."""
    kernel = reference.ReferenceKernel()
    out, lse = kernel.forward(q, k, v, spec, seed=0)
    dq, dk, dv = kernel.backward(grad_out, q, k, v, out, lse, spec, 0, False, False)[:3]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*leaves, spec)
    torch.testing.assert_close(out, ref.detach(), atol=atol, rtol=atol)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), torch.autograd.grad(ref, leaves, grad_out)):
        torch.testing.assert_close(got, want, atol=grad_atol, rtol=grad_rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("reads_groups", [True, False])
def test_fused_tiles_take_hf_layouts_and_repeat_groups_where_aten_does_not_read_them(reads_groups, monkeypatch):
    """Queries, keys and values as HF hands them (``[B, N, H, D]`` transposed views) and, where ATen reads no groups
    itself, K/V repeated per query head and their gradients summed back: the oracle's output and gradients."""
    from attnopt.kernels import aten_cpu

    monkeypatch.setattr(aten_cpu, "_CPU_GROUPS", [reads_groups])
    torch.manual_seed(0)
    q = torch.randn(2, 70, 6, 16, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(2, 70, 2, 16, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, window=Window(20, 0), key_padding=torch.tensor([70, 50]))
    grad_out = torch.randn(2, 6, 70, 16, dtype=torch.float64)
    calls = _counting(monkeypatch)
    with small_tiles(k_block=16, tile_elements=2 * 6 * 16 * 16):
        _forward_backward_match_oracle(q, k, v, spec, grad_out)
    assert calls["forward"] > 0 and calls["backward"] > 0


def test_fused_chunks_end_where_packed_documents_end():
    """Where every batch row packs the same documents, a fused chunk ends at a document's end once it has
    ``FUSED_DOCUMENT_MIN`` rows (a short document joins the next), a long one is cut at the chunk size; output and
    gradients stay the oracle's. Rows whose documents differ keep the plain chunks."""
    torch.manual_seed(0)
    lengths = torch.tensor([40, 100, 60, 400, 20])
    n = int(lengths.sum())
    doc = torch.repeat_interleave(torch.arange(5), lengths)[None].expand(2, n)
    q, k, v = (torch.randn(2, 4, n, 16, dtype=torch.float64) for _ in range(3))
    # documents seen both ways (no causal cut), with a key padding that keeps every key: no document is whole
    # (``_whole_documents``), so none is a run of its own
    spec = AttentionSpec.from_tensors(q, k, v, q_doc=doc, kv_doc=doc, key_padding=torch.ones(2, n, dtype=torch.bool))
    q_chunk, _ = reference.chunk_sizes(spec)
    assert q_chunk == reference.FUSED_DOCUMENT_CHUNK == 256 and reference.FUSED_DOCUMENT_MIN == 64
    # 40 rows join the next document; 60 + 400 rows are cut at 256; the last 20 rows close the call
    assert reference._chunks(spec) == [(0, 140, 0), (140, 396, 0), (396, 600, 0), (600, 620, 0)]
    other = doc.clone()
    other[1, :10] = 7
    assert reference._chunks(spec.with_(q_doc=other, kv_doc=other)) == [(0, 256, 0), (256, 512, 0), (512, 620, 0)]
    _forward_backward_match_oracle(q, k, v, spec, torch.randn_like(q))


@contextmanager
def _counted_runs():
    """Counts ``reference._document_run`` calls and the runs whose backward fell back to plain chunks."""
    counts = {"runs": 0, "backward": 0, "fallback": 0}
    run, run_backward = reference._document_run, reference._document_run_backward

    def counted(*args):
        counts["runs"] += 1
        return run(*args)

    def counted_backward(*args):
        dq = run_backward(*args)
        counts["backward" if dq is not None else "fallback"] += 1
        return dq

    reference._document_run, reference._document_run_backward = counted, counted_backward
    try:
        yield counts
    finally:
        reference._document_run, reference._document_run_backward = run, run_backward


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("transposed", [False, True])
def test_whole_documents_of_one_length_are_one_call(monkeypatch, causal, heads, transposed):
    """Packed documents that attend to themselves alone run as runs of equal lengths, one ATen call each with a
    document per batch entry (``_document_run``); a short or over-long document takes plain chunks. Output and
    gradients equal the oracle's, with grouped K/V heads and HF's ``[B, N, H, D]`` layout too."""
    monkeypatch.setattr(reference, "FUSED_DOCUMENT_RUN", 256)
    torch.manual_seed(1)
    lengths = torch.tensor([10, 40, 100, 100, 100, 60, 300, 20])
    n = int(lengths.sum())
    doc = torch.repeat_interleave(torch.arange(8), lengths)[None].expand(2, n)
    q, k, v = (torch.randn(2, n, h, 16, dtype=torch.float64).transpose(1, 2) for h in (heads[0], *heads[1:] * 2))
    if not transposed:
        q, k, v = (t.contiguous() for t in (q, k, v))
    spec = AttentionSpec.from_tensors(q, k, v, causal=causal, q_doc=doc, kv_doc=doc)
    # 10 rows are below a run's FUSED_RUN_MIN; the 100s pair up to the run's 256 rows; 300 rows are more than a run
    # takes: plain chunks, cut at the chunk size (causal: a ninth of the call)
    q_chunk, _ = reference.chunk_sizes(spec)
    chunks = reference._chunks(spec)
    assert chunks[:5] == [(0, 10, 0), (10, 50, 40), (50, 250, 100), (250, 350, 100), (350, 410, 60)]
    assert chunks[-1] == (710, 730, 20)
    plain = chunks[5:-1]
    assert plain[0][0] == 410 and plain[-1][1] == 710 and all(a[1] == b[0] for a, b in zip(plain, plain[1:]))
    assert all(length == 0 and q1 - q0 <= q_chunk for q0, q1, length in plain)
    with _counted_runs() as counts:
        _forward_backward_match_oracle(q, k, v, spec, torch.randn_like(q))
    assert counts == {"runs": 5, "backward": 5, "fallback": 0}


def test_documents_that_are_not_whole_take_plain_chunks():
    """Runs only where each document attends to itself alone: an id used by two documents apart joins them, a
    window, key padding, other key ids or a batch row with other documents keep plain chunks (and the oracle's
    result)."""
    torch.manual_seed(2)
    n = 384
    whole = torch.arange(n)[None] // 128  # three documents of 128
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, q_doc=whole, kv_doc=whole)
    assert reference._chunks(spec) == [(0, 384, 128)]
    assert reference._chunks(spec.with_(kv_doc=whole.clone())) == [(0, 384, 128)]  # equal ids, other memory
    apart = whole % 2  # documents 0 and 2 share id 0: one document around the middle one
    kept = torch.ones(1, n, dtype=torch.bool)
    for other in (spec.with_(q_doc=apart, kv_doc=apart), spec.with_(window=Window(64, 0)),
                  spec.with_(key_padding=kept), spec.with_(kv_doc=whole.flip(-1))):
        assert all(length == 0 for _, _, length in reference._chunks(other))
        out, _ = reference.ReferenceKernel().forward(q, k, v, other, seed=0)
        torch.testing.assert_close(out, naive_attention(q, k, v, other), atol=1e-10, rtol=1e-10, equal_nan=True)


def test_document_run_backward_falls_back_on_large_log_sum_exps():
    """A run whose log-sum-exps pass ``LSE_EXACT_LIMIT`` recomputes its gradients in plain chunks."""
    torch.manual_seed(3)
    n = 256
    doc = torch.arange(n)[None] // 128
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    q = q * 400  # scores in the thousands
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, q_doc=doc, kv_doc=doc)
    with _counted_runs() as counts:
        _forward_backward_match_oracle(q, k, v, spec, torch.randn_like(q), atol=1e-9, grad_atol=1e-6)
    assert counts == {"runs": 1, "backward": 0, "fallback": 1}
