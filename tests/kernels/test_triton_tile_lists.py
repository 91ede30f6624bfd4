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
