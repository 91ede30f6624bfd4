"""The Triton kernel of the row-wise gradients of rows without keys (``kernels/triton_fill_rows.py``) against
``fills._row_grads`` (itself checked against the written model's float64 autograd in ``test_fills.py``): every
fill it takes, softcap, dropout (the same draws), GQA, left padding, and rows empty in some heads only. On a CPU
under the interpreter (tests/conftest.py), on a GPU for real (``-m gpu``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.kernels import fills
from attnopt.kernels import triton_fill_rows as kernel
from attnopt.kernels.spec import AttentionSpec, Fill, Window

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(batch, q_heads, kv_heads, n, head_dim, fill, softcap, dropout_p, window, pads, dtype, heads_only, seed):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    q, k, v = rand(batch, q_heads, n, head_dim), rand(batch, kv_heads, n, head_dim), rand(batch, kv_heads, n, head_dim)
    grad_out = rand(batch, q_heads, n, head_dim)
    keep = torch.ones(batch, n, dtype=torch.bool)
    for b, pad in enumerate(pads):
        keep[b, :pad] = False
    spec = AttentionSpec.from_tensors(q, k, v, causal=True, window=window, key_padding=keep.to(DEVICE), fill=fill,
                                      softcap=softcap, dropout_p=dropout_p)
    empty = fills.rows_without_keys(spec)[:, None, :].expand(batch, q_heads, n).clone()
    if heads_only:  # rows empty in some heads only (a per-head mask): the others take nothing
        empty[:, 1::2] = False
    return q, k, v, grad_out, empty, spec


def check(q, k, v, grad_out, empty, spec, seed):
    assert kernel.supported(spec, q, False, False)
    dropped = spec.dropout_p > 0.0
    want = fills._row_grads(q, k, v, grad_out, empty, spec, seed if dropped else None, False, False)[:3]
    got = kernel.row_grads(q, k, v, grad_out, empty, spec, seed if dropped else None)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        if w is None:
            assert g is None, name
            continue
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("fill, softcap, dropout_p, window", [
    (Fill.FINITE_ADDED, 30.0, 0.0, None),
    (Fill.FINITE_ADDED, None, 0.25, None),
    (Fill.FINITE_ADDED, 5.0, 0.25, None),
    (Fill.FINITE_REPLACED_ADDED, None, 0.0, None),
    (Fill.FINITE_REPLACED_ADDED, None, 0.1, Window(6, 0)),
    (Fill.FINITE, None, 0.25, None),
], ids=["softcap", "dropout", "softcap_dropout", "band", "window_band_dropout", "replaced_dropout"])
def test_the_kernel_gives_the_pytorch_fills_gradients(fill, softcap, dropout_p, window):
    args = case(2, 4, 2, 40, 16, fill, softcap, dropout_p, window, (0, 13), torch.float32, False, 1)
    check(*args, seed=1234567)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 3), group=st.sampled_from([1, 2]), kv_heads=st.integers(1, 2), n=st.integers(5, 70),
    fill=st.sampled_from([Fill.FINITE_ADDED, Fill.FINITE_REPLACED_ADDED, Fill.FINITE]),
    softcap=st.sampled_from([None, 7.0]), dropout_p=st.sampled_from([0.0, 0.3]), heads_only=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), data=st.data(),
)
def test_the_kernel_on_random_calls(batch, group, kv_heads, n, fill, softcap, dropout_p, heads_only, dtype, data):
    if not fills.row_wise_grads(AttentionSpec.from_tensors(
            torch.empty(1, 1, 1, 16), torch.empty(1, 1, 1, 16), torch.empty(1, 1, 1, 16), fill=fill,
            softcap=softcap, dropout_p=dropout_p), False, False) or (fill == Fill.FINITE and dropout_p == 0.0):
        return  # a factored fill: not this kernel's
    pads = tuple(data.draw(st.integers(0, n)) for _ in range(batch))
    args = case(batch, group * kv_heads, kv_heads, n, 16, fill, softcap, dropout_p, None, pads, dtype, heads_only,
                data.draw(st.integers(0, 10_000)))
    check(*args, seed=data.draw(st.integers(1, 2**62)))


@pytest.mark.parametrize("fill, window", [(Fill.FINITE_ADDED, None), (Fill.FINITE, None),
                                          (Fill.FINITE_REPLACED_ADDED, Window(6, 0))], ids=["added", "replaced", "band"])
@pytest.mark.parametrize("first_row, n_rows", [(0, 40), (9, 17)], ids=["all_rows", "a_chunk"])
def test_the_forward_kernel_gives_the_pytorch_fills_dropped_rows(fill, window, first_row, n_rows):
    """The dropped-out uniform rows of a forward, on every row or on a chunk of rows (the reference kernel's)."""
    q, k, v, grad_out, empty, spec = case(2, 4, 2, 40, 16, fill, None, 0.3, window, (0, 13), torch.float32, True, 4)
    out = torch.randn(2, 4, n_rows, 16, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    chunk = empty[:, :, first_row:first_row + n_rows]
    want = fills._dropped_uniform_rows(out, chunk, v, spec, first_row, 4242)
    got = kernel.dropped_rows(out, chunk, v, spec, first_row, 4242)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, equal_nan=True)
    assert bool(chunk.any()) and torch.equal(got[~chunk], out[~chunk])


def test_the_dropout_constants_are_splitmix64s():
    """The kernel's multipliers, handed over unsigned, are the PyTorch fill's (signed int64) ones."""
    assert [c & kernel._U64 for c in (fills._GOLDEN, fills._MIX1, fills._MIX2)] == [
        0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB]


def test_what_the_kernel_does_not_take():
    q = torch.empty(1, 2, 8, 16, device=DEVICE)
    spec = AttentionSpec.from_tensors(q, q, q, causal=True, fill=Fill.FINITE_ADDED, softcap=5.0)
    assert kernel.supported(spec, q, False, False)
    assert not kernel.supported(spec.with_(fill=Fill.SAFE), q, False, False)
    assert not kernel.supported(spec, q.double(), False, False)  # float64 fills are float64
    bias = spec.with_(bias=torch.zeros(1, 2, 8, 8))
    assert not kernel.supported(bias, q, True, False) and kernel.supported(bias, q, False, False)
    narrow = torch.empty(1, 2, 8, 8, device=DEVICE)
    assert not kernel.supported(AttentionSpec.from_tensors(narrow, narrow, narrow, fill=Fill.FINITE_ADDED), narrow,
                                False, False)


def test_a_nan_key_reaches_the_same_gradients_as_in_the_pytorch_fills():
    """A NaN in k or v spreads to the gradients of rows that take it, in both, and to no row that saw a key."""
    q, k, v, grad_out, empty, spec = case(2, 4, 2, 40, 16, Fill.FINITE_ADDED, 30.0, 0.25, None, (0, 13),
                                          torch.float32, True, 3)
    v[1, 0, 20, 3] = float("nan")
    k[1, 1, 7, 0] = float("nan")
    check(q, k, v, grad_out, empty, spec, seed=99)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("fill, softcap, dropout_p", [
    (Fill.FINITE_ADDED, 50.0, 0.0), (Fill.FINITE_ADDED, None, 0.1), (Fill.FINITE_REPLACED_ADDED, None, 0.1),
    (Fill.FINITE, None, 0.1)])
def test_gpu_the_kernel_gives_the_pytorch_fills_gradients(head_dim, fill, softcap, dropout_p):
    if DEVICE != "cuda":
        pytest.skip("needs a GPU")
    args = case(4, 8, 2, 300, head_dim, fill, softcap, dropout_p, None, (0, 40, 150, 299), torch.bfloat16, False, 5)
    check(*args, seed=31337)


@pytest.mark.gpu
@pytest.mark.parametrize("fill", [Fill.FINITE_ADDED, Fill.FINITE_REPLACED_ADDED], ids=["added", "band"])
def test_gpu_the_forward_kernel_gives_the_pytorch_fills_dropped_rows(fill):
    if DEVICE != "cuda":
        pytest.skip("needs a GPU")
    q, k, v, grad_out, empty, spec = case(4, 8, 2, 300, 128, fill, None, 0.1, None, (0, 40, 150, 299),
                                          torch.bfloat16, False, 6)
    out = torch.randn_like(q)
    want = fills._dropped_uniform_rows(out, empty, v, spec, 0, 777)
    torch.testing.assert_close(kernel.dropped_rows(out, empty, v, spec, 0, 777), want, atol=1e-2, rtol=1e-2)


def test_the_switch_routes_the_fills_through_the_kernels(monkeypatch):
    """On a device of ``fills.ROW_KERNEL``, ``empty_row_grads`` and ``fill_empty_rows`` give the kernels'
    results."""
    q, k, v, grad_out, empty, spec = case(2, 4, 2, 40, 16, Fill.FINITE_ADDED, 30.0, 0.25, None, (0, 13),
                                          torch.float32, False, 7)
    monkeypatch.setattr(fills, "ROW_KERNEL", {DEVICE})
    calls = []
    for name in ("row_grads", "dropped_rows"):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    grads = fills.empty_row_grads(q, k, v, grad_out, empty, spec, seed=5)
    want = fills._row_grads(q, k, v, grad_out, empty, spec, 5, False, False)
    for g, w in zip(grads[:3], want[:3]):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    out = torch.zeros_like(q)
    torch.testing.assert_close(fills.fill_empty_rows(out, empty, v, spec, seed=5),
                               fills._dropped_uniform_rows(out, empty, v, spec, 0, 5), atol=2e-6, rtol=1e-5)
    assert calls == ["row_grads", "dropped_rows"]
    with pytest.raises(ValueError, match="dropout seed"):
        fills.fill_empty_rows(out, empty, v, spec, seed=0)
