"""attnopt.attention: argument semantics (against SDPA) and argument errors."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import attnopt


def qkv(b=2, hq=4, hkv=4, nq=9, nk=9, d=8, dtype=torch.float32, requires_grad=False):
    q = torch.randn(b, hq, nq, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(b, hkv, nk, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(b, hkv, nk, d, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True, "top_left"])
def test_matches_sdpa(causal):
    q, k, v = qkv(nq=7, nk=11)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
    torch.testing.assert_close(attnopt.attention(q, k, v, causal=causal), expected)


def test_bottom_right_causal_is_a_kv_cache():
    q, k, v = qkv(nq=3, nk=10)
    keep = torch.ones(3, 10, dtype=torch.bool).tril(diagonal=7)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(attnopt.attention(q, k, v, causal="bottom_right"), expected)


def test_gqa_matches_sdpa_enable_gqa():
    q, k, v = qkv(hq=6, hkv=2)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attnopt.attention(q, k, v, causal=True), expected)


def test_key_padding_and_additive_mask_and_window():
    q, k, v = qkv(nq=12, nk=12)
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, 8:] = False
    add = torch.randn(12, 12)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    window = (j >= i - 3) & (j <= i + 1)
    dense = torch.where(window & pad[:, None, None, :], add, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    out = attnopt.attention(q, k, v, window=(3, 1), key_padding_mask=pad, attn_mask=add)
    torch.testing.assert_close(out, expected)


def test_gradients_flow_to_q_k_v_and_bias():
    q, k, v = qkv(requires_grad=True, dtype=torch.float64)
    bias = torch.randn(1, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attnopt.attention(q, k, v, bias=b, causal=True), (q, k, v, bias)
    )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(causal="sideways"), ValueError, "causal"),
        (dict(window=(3,)), ValueError, "window"),
        (dict(window=(-1, 0)), ValueError, "non-negative"),
        (dict(attn_mask=torch.ones(9, 9, dtype=torch.int32)), TypeError, "attn_mask"),
        (dict(attn_mask=torch.ones(3, 9, 9, 9)), ValueError, "broadcast"),
        (dict(fill="zero"), ValueError, "fill"),
        (dict(kernel="nope"), ValueError, "nope"),
        (dict(dropout_p=1.5), ValueError, "dropout_p"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    q, k, v = qkv()
    with pytest.raises(error, match=message):
        attnopt.attention(q, k, v, **kwargs)


def test_bad_tensors_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="multiple"):
        attnopt.attention(q, k[:, :3], v[:, :3])
    with pytest.raises(TypeError, match="int64"):
        attnopt.attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        attnopt.attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="dtypes differ"):
        attnopt.attention(q, k.double(), v)


def test_op_is_opaque_to_compile_and_export():
    q, k, v = qkv()

    def f(q, k, v):
        return attnopt.attention(q, k, v, causal=True) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return f(q, k, v)

    exported = torch.export.export(M(), (q, k, v))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.attnopt.attention.default in targets


def test_key_padding_mask_error_shows_the_full_expected_shape():
    q, k, v = qkv(nq=5, nk=12)
    with pytest.raises(ValueError, match=r"bool \[B, Nk\] = \[2, 12\] mask .* integer lengths \[B\] = \[2\]"):
        attnopt.attention(q, k, v, key_padding_mask=torch.ones(2, 12))


def test_bottom_right_with_more_queries_than_keys_warns_once_per_shape(monkeypatch):
    from attnopt import functional

    monkeypatch.setattr(functional, "_WARNED_BOTTOM_RIGHT", set())
    q, k, v = qkv(nq=7, nk=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attnopt.attention(q, k, v, causal="bottom_right")
        attnopt.attention(q, k, v, causal="bottom_right")  # the same shape: already said
    (warning,) = caught
    assert warning.category is UserWarning and warning.filename == __file__
    text = str(warning.message)
    for needed in ("Nq=7 > Nk=4", "rows 0..2 see no key", "i - 3", "fill='safe': zeros", "causal=True"):
        assert needed in text, text
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    keep = torch.ones(7, 4, dtype=torch.bool).tril(diagonal=-3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out[:, :, 3:], expected[:, :, 3:])

    with pytest.warns(UserWarning, match=r"row 0 sees no key .* fill='-inf': NaN"):
        out = attnopt.attention(*qkv(nq=5, nk=4), causal="bottom_right", fill="-inf")
    assert out[:, :, 0].isnan().all() and not out[:, :, 1:].isnan().any()
    with pytest.warns(UserWarning, match="the mean of v"):
        attnopt.attention(q, k, v, causal="bottom_right", fill="finite")  # another fill: another warning


def test_no_warning_when_every_row_sees_a_key():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnopt.attention(*qkv(nq=4, nk=4), causal="bottom_right")
        attnopt.attention(*qkv(nq=3, nk=10), causal="bottom_right")
        attnopt.attention(*qkv(nq=9, nk=4), causal=True)


@pytest.mark.parametrize("through_the_op", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_named_kernel_that_cannot_compute_the_call_is_refused(through_the_op, requires_grad):
    """A named kernel never computes another function than the call's: ``sdpa_cpu`` has no dropout, so
    ``dropout_p=0.5`` with it is refused with that reason (it once ran without the dropout), on the lean
    path and through the op alike; the reference kernel applies it."""
    from attnopt import ops
    from attnopt.kernels.spec import AttentionSpec

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=g) for _ in range(3))
    q.requires_grad_(requires_grad)
    with pytest.raises(ValueError, match=r"'sdpa_cpu' cannot compute.*dropout.*kernel='auto'"):
        if through_the_op:
            spec = AttentionSpec.from_tensors(q, k, v, dropout_p=0.5)
            torch.ops.attnopt.attention(*ops.op_args(q, k, v, spec, "sdpa_cpu"))
        else:
            attnopt.attention(q, k, v, dropout_p=0.5, kernel="sdpa_cpu")
    dropped = attnopt.attention(q, k, v, dropout_p=0.5, kernel="reference")
    assert (dropped - attnopt.attention(q, k, v, kernel="reference")).abs().max() > 0.1


def test_the_training_backward_takes_the_dropout_seed_without_reading_the_device(monkeypatch):
    """A training call's backward gets the seed its forward drew as a host int (a read of the seed tensor
    would be a host sync per layer on a GPU); the same torch seed gives the same output and gradients."""
    from attnopt.kernels import registry

    seeds = []
    kernel = registry.get("reference")
    train_backward = kernel.train_backward

    def spy(residual, grad_out, q, k, v, out, lse, spec, seed, *args):
        seeds.append(seed)
        return train_backward(residual, grad_out, q, k, v, out, lse, spec, seed, *args)

    monkeypatch.setattr(kernel, "train_backward", spy)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("the seed was read back from its tensor"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=g).requires_grad_(True) for _ in range(3))
    torch.manual_seed(7)
    out = attnopt.attention(q, k, v, dropout_p=0.5, kernel="reference")
    out.backward(torch.ones_like(out))
    assert len(seeds) == 1 and isinstance(seeds[0], int) and seeds[0] != 0
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(7)  # the same seed: the same dropout, now with the backward reading nothing else
    again = attnopt.attention(q, k, v, dropout_p=0.5, kernel="reference")
    assert torch.equal(again, out)
    again.backward(torch.ones_like(again))
    for got, want in zip((q.grad, k.grad, v.grad), grads):
        torch.testing.assert_close(got, want)


def test_a_compiled_autograd_backward_regenerates_each_calls_dropout():
    """A training call keeps its dropout seed on ``ctx`` as a host int; a backward that compiled autograd
    runs still hands each call's own seed to the backward (not the first call's, traced as a constant): the
    gradients are the eager backward's for every seed, from one capture."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=g) for _ in range(3))

    def grads(seed: int, compiled: bool):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        torch.manual_seed(seed)
        out = attnopt.attention(*leaves, dropout_p=0.5, kernel="reference")
        assert type(out.grad_fn).__name__ == "_EagerAttentionBackward"
        if compiled:
            with compiled_autograd._enable(torch.compile(backend="eager")):
                out.backward(torch.ones_like(out))
        else:
            out.backward(torch.ones_like(out))
        return [t.grad for t in leaves]

    torch._dynamo.reset()
    counters.clear()
    seen = []
    for seed in (1, 2, 3):
        eager, compiled = grads(seed, False), grads(seed, True)
        for got, want in zip(compiled, eager):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        seen.append(eager[0])
    assert not torch.equal(seen[0], seen[1])  # the seeds' dropouts differ, so the check above could fail
    assert counters["compiled_autograd"]["captures"] == 1
