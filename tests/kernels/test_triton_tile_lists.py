"""The tile lists one Triton kernel builds (``kernels/triton_tile_lists.py``) against ``TileLists.from_state`` of
``block_map.tile_state`` (itself checked against the terms score by score in ``test_triton_flash.py``): every
field, bit for bit, the column order past each count included, for every term the kernel reads (band, boolean key
padding, key lengths, documents, a dense mask's states) and both orientations. On a CPU under the interpreter
(tests/conftest.py), on a GPU for real (``-m gpu``)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.kernels import block_map
from attnopt.kernels import triton_tile_lists as kernel
from attnopt.kernels.spec import Align, AttentionSpec, Window

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = [f.name for f in dataclasses.fields(block_map.TileLists)]


def spec_of(batch, heads, n_q, n_k, causal, align, window, padding, documents, mask, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(batch, heads, n_q, 8, device=DEVICE)
    k = torch.zeros(batch, 1, n_k, 8, device=DEVICE)
    terms = {}
    if padding == "bool":  # scattered keys: partial tiles
        terms["key_padding"] = (torch.rand(batch, n_k, generator=g) > 0.3).to(DEVICE)
    elif padding == "runs":  # runs of 40 kept and 20 dropped keys: full and empty tiles, full runs broken by gaps
        offset = torch.randint(0, 60, (batch, 1), generator=g)
        terms["key_padding"] = ((torch.arange(n_k) + offset) % 60 < 40).to(DEVICE)
    elif padding == "left":
        keep = torch.arange(n_k)[None, :] >= torch.randint(0, n_k + 1, (batch, 1), generator=g)
        terms["key_padding"] = keep.to(DEVICE)
    elif padding == "lengths":
        terms["key_padding"] = torch.randint(0, n_k + 1, (batch,), generator=g).to(DEVICE)
    if documents:
        docs = batch if documents == "batched" else 1
        terms["q_doc"] = torch.sort(torch.randint(0, 4, (docs, n_q), generator=g), dim=1).values.to(DEVICE)
        terms["kv_doc"] = torch.sort(torch.randint(0, 4, (docs, n_k), generator=g), dim=1).values.to(DEVICE)
    if mask == "bool":
        terms["mask"] = (torch.rand(batch, 1, n_q, n_k, generator=g) > 0.2).to(DEVICE)
    elif mask == "per_head_rows":
        terms["mask"] = (torch.rand(1, heads, n_q, 1, generator=g) > 0.2).to(DEVICE)
    elif mask == "additive":
        terms["mask"] = torch.where(torch.rand(batch, 1, n_q, n_k, generator=g) > 0.2, 0.0,
                                    float("-inf")).to(DEVICE)
    return AttentionSpec.from_tensors(q, k, k, causal=causal, align=align, window=window, **terms)


def assert_same_lists(spec, block_m, block_n, transposed):
    state = block_map.tile_state(spec, block_m, block_n)
    want = block_map.TileLists.from_state(state.transpose(-1, -2) if transposed else state)
    extra = None if spec.mask is None else block_map._state(*block_map._mask_any_all(spec.mask, block_m, block_n))
    got = block_map.TileLists(*kernel.build(spec, block_m, block_n, transposed, extra))
    for name in FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        assert g.is_contiguous(), name
        assert torch.equal(g.cpu(), w.cpu()), (name, g.cpu(), w.cpu())
    assert got.strides() == want.strides()


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), heads=st.sampled_from([1, 2]), n_q=st.integers(1, 90), n_k=st.integers(1, 90),
       band=st.sampled_from(["none", "causal", "causal_bottom_right", "window", "window_left"]),
       padding=st.sampled_from([None, "bool", "runs", "left", "lengths"]),
       documents=st.sampled_from([None, "batched", "shared"]),
       mask=st.sampled_from([None, None, "bool", "per_head_rows", "additive"]),
       tiles=st.sampled_from([(16, 16), (32, 16), (16, 32)]), transposed=st.booleans(), seed=st.integers(0, 99))
def test_built_lists_are_from_states_lists(batch, heads, n_q, n_k, band, padding, documents, mask, tiles,
                                           transposed, seed):
    """Columns in chunks of 16: most rows take several."""
    causal = band.startswith("causal")
    align = Align.BOTTOM_RIGHT if band in ("causal_bottom_right", "window_left") else Align.TOP_LEFT
    window = {"window": Window(20, 5), "window_left": Window(13, None)}.get(band)
    spec = spec_of(batch, heads, n_q, n_k, causal, align, window, padding, documents, mask, seed)
    with chunks_of(16):
        assert_same_lists(spec, *tiles, transposed)


@contextlib.contextmanager
def chunks_of(columns: int):
    """Maps built ``columns`` column tiles at a time (at 16 x 16 tiles)."""
    before = kernel.MAX_CHUNK_ELEMENTS
    kernel.MAX_CHUNK_ELEMENTS = 16 * columns
    try:
        yield
    finally:
        kernel.MAX_CHUNK_ELEMENTS = before


@pytest.mark.parametrize("transposed", [False, True])
def test_rows_of_many_chunks_and_tiles_past_the_end(transposed):
    """A map wider than one chunk of columns (the count, the order and the run carried from chunk to chunk),
    lengths that end mid-tile, and a full run broken by a padded gap."""
    spec = spec_of(2, 1, 700, 1500, True, Align.BOTTOM_RIGHT, None, "runs", None, None, 4)
    with chunks_of(16):
        assert_same_lists(spec, 16, 16, transposed)


def test_tile_lists_take_the_kernel_on_its_devices(monkeypatch):
    """``block_map.tile_lists`` builds with the kernel on ``KERNEL_DEVICES``: the same lists, cached as before."""
    spec = spec_of(2, 2, 70, 50, True, Align.TOP_LEFT, None, "bool", "batched", "bool", 1)
    monkeypatch.setattr(block_map, "KERNEL_DEVICES", {spec.device.type})
    calls = []
    build = kernel.build
    monkeypatch.setattr(kernel, "build", lambda *a: calls.append(a) or build(*a))
    got = block_map.tile_lists(spec, 16, 32, transposed=True)
    assert len(calls) == 1 and block_map.tile_lists(spec, 16, 32, transposed=True) is got
    monkeypatch.setattr(block_map, "KERNEL_DEVICES", set())
    block_map._CACHE._entries.clear()
    want = block_map.tile_lists(spec, 16, 32, transposed=True)
    assert len(calls) == 1
    for name in FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("tiles", [(128, 128), (64, 128), (128, 64)])
@pytest.mark.parametrize("case", ["left_causal", "documents_window", "mask_lengths"])
def test_gpu_built_lists_at_the_kernels_tiles(tiles, case):
    """The kernels' own tile shapes on long rows (many chunks), compiled for real."""
    terms = {"left_causal": (True, Align.BOTTOM_RIGHT, None, "left", None, None),
             "documents_window": (True, Align.TOP_LEFT, Window(1024, 0), "runs", "batched", None),
             "mask_lengths": (False, Align.TOP_LEFT, None, "lengths", None, "bool")}[case]
    for transposed in (False, True):
        spec = spec_of(3, 2, 4000, 8192, *terms, seed=7)
        assert_same_lists(spec, *tiles, transposed)


def dense_mask(batch, heads, n_r, n_c, kind, layout, seed, device=DEVICE):
    """A mask ``[batch, heads, n_r, n_c]`` whose tiles come out empty, partial and full: a causal-like band of
    kept scores with a few scores flipped. ``kind``: bool, or an additive float32 / bfloat16 mask of 0, a finite
    value and ``-inf``; ``layout``: contiguous, transposed (the key dim not innermost) or batch-expanded."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.arange(n_r)[:, None], torch.arange(n_c)[None, :]
    shift = torch.randint(-20, 20, (batch, heads, 1, 1), generator=g)
    keep = (cols <= rows + shift) & (torch.rand(batch, heads, n_r, n_c, generator=g) > 0.02)
    if kind == "bool":
        mask = keep
    else:
        bias = torch.where(torch.rand(batch, heads, n_r, n_c, generator=g) > 0.9, -1.5, 0.0)
        mask = torch.where(keep, bias, float("-inf")).to(torch.float32 if kind == "float32" else torch.bfloat16)
    if layout == "transposed":
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "expanded":
        mask = mask[:1].expand(batch, -1, -1, -1)
    return mask.to(device)


def assert_same_mask_tiles(mask, tile_r, tile_c):
    got = kernel.mask_any_all(mask, tile_r, tile_c)
    want = block_map._mask_tiles_torch(mask, tile_r, tile_c)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype == torch.bool, (g.shape, w.shape, g.dtype)
        assert torch.equal(g.cpu(), w.cpu()), (g.cpu(), w.cpu())


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 2), heads=st.sampled_from([1, 3]), n_r=st.sampled_from([1, 5, 16, 37, 80]),
       n_c=st.sampled_from([1, 9, 32, 50, 90]), kind=st.sampled_from(["bool", "float32", "bfloat16"]),
       layout=st.sampled_from(["contiguous", "transposed", "expanded"]),
       tiles=st.sampled_from([(16, 16), (32, 16), (16, 64), (64, 32)]), seed=st.integers(0, 99))
def test_dense_mask_tiles_are_pytorchs(batch, heads, n_r, n_c, kind, layout, tiles, seed):
    """``mask_any_all`` equals ``_mask_tiles_torch`` bit for bit: tiles past the mask's end, dims of size 1
    (a query-only or key-only mask), broadcast and transposed strides, boolean and additive masks."""
    mask = dense_mask(batch, heads, n_r, n_c, kind, layout, seed)
    assert_same_mask_tiles(mask, *tiles)


def test_dense_mask_tiles_take_the_kernel_on_its_devices(monkeypatch):
    """``block_map._mask_tiles`` reduces with the kernel on ``KERNEL_DEVICES`` for tiles of powers of 2, and with
    PyTorch for other tiles: the same tiles either way, and the tile lists of a spec with that mask too."""
    mask = dense_mask(2, 1, 70, 90, "bool", "contiguous", 3)
    monkeypatch.setattr(block_map, "KERNEL_DEVICES", {mask.device.type})
    calls = []
    reduce = kernel.mask_any_all
    monkeypatch.setattr(kernel, "mask_any_all", lambda *a: calls.append(a) or reduce(*a))
    got = block_map._mask_tiles(mask, 16, 32)
    assert len(calls) == 1
    block_map._mask_tiles(mask, 24, 32)  # not a power of 2: PyTorch's
    assert len(calls) == 1
    monkeypatch.setattr(kernel, "MAX_MAPS", 1)  # more batch x head maps than the kernel's grid takes: PyTorch's
    assert all(torch.equal(g, w) for g, w in zip(block_map._mask_tiles(mask, 16, 32), got))
    assert len(calls) == 1
    want = block_map._mask_tiles_torch(mask, 16, 32)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    spec = spec_of(2, 1, 70, 90, True, Align.TOP_LEFT, None, None, None, "bool", 5)
    assert_same_lists(spec, 16, 16, transposed=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["bool", "float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "expanded"])
def test_gpu_dense_mask_tiles(kind, layout):
    """The grain the CUDA kernels pool from (64 x 64) and the kernels' own tiles, on 4000 x 8192 masks."""
    mask = dense_mask(2, 2, 4000, 8192, kind, layout, 11, device="cuda")
    for tiles in ((64, 64), (128, 64), (64, 128)):
        assert_same_mask_tiles(mask, *tiles)
    row = dense_mask(2, 1, 1, 8192, kind, "contiguous", 12, device="cuda")  # a key-only mask
    assert_same_mask_tiles(row, 64, 64)
