"""Approximate kernels: exact where their sparsity covers everything, gradients of the function they compute."""

import pytest
import torch

GEN = torch.Generator().manual_seed(1)


def _like(t):
    """Random tensor like t without touching the global RNG (other tests' draws stay put)."""
    return torch.randn(t.shape, generator=GEN, dtype=t.dtype)

from attnopt.kernels import AttentionSpec, get
from attnopt.kernels.approx_local_global import LocalGlobalKernel
from attnopt.kernels.approx_performer import PerformerKernel

APPROX = ["approx_local_global", "approx_bigbird", "approx_performer"]


def _qkv(n=200, hkv=2, requires_grad=False, scale=1.0):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n, 16, generator=g, dtype=torch.float64) * scale
    k, v = (torch.randn(2, hkv, n, 16, generator=g, dtype=torch.float64) * scale for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize("causal", [False, True])
def test_full_coverage_is_exact(causal):
    q, k, v = _qkv()
    spec = AttentionSpec.from_tensors(q, k, v, causal=causal)
    ref, _ = get("reference").forward(q, k, v, spec, 0)
    out, _ = LocalGlobalKernel(window=400, n_global=0).forward(q, k, v, spec, 0)
    torch.testing.assert_close(out, ref)
    out, _ = get("approx_bigbird").forward(q, k, v, spec, 0)  # 4 blocks: window + global + random cover all
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_converges_on_small_scores(causal):
    q, k, v = _qkv(n=256, scale=0.2)
    spec = AttentionSpec.from_tensors(q, k, v, causal=causal)
    ref, _ = get("reference").forward(q, k, v, spec, 0)
    out, lse = PerformerKernel(n_features=256).forward(q, k, v, spec, 0)
    assert ((out - ref).norm() / ref.norm()) < 0.05
    assert lse.isnan().all()


def _imposed_local_global(kernel, spec):
    """The approximate function as dense masked attention: the oracle for gradients."""
    n = spec.q_len
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = ((j - i).abs() <= kernel.window) | (j < kernel.n_global) | (i < kernel.n_global)
    if spec.causal:
        keep &= j <= i
    return keep


@pytest.mark.parametrize("causal", [False, True])
def test_local_global_gradients_match_dense_oracle(causal):
    kernel = LocalGlobalKernel(window=20, n_global=3)
    q, k, v = _qkv(n=150, requires_grad=True)
    spec = AttentionSpec.from_tensors(q, k, v, causal=causal)
    keep = _imposed_local_global(kernel, spec)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * spec.scale
    want = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
    out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), spec, 0)
    torch.testing.assert_close(out, want.detach())
    g = _like(out)
    dq, dk, dv, _, _ = kernel.backward(g, q.detach(), k.detach(), v.detach(), out, lse, spec, 0, False, False)
    wq, wk, wv = torch.autograd.grad(want, (q, k, v), g)
    for got, ref in ((dq, wq), (dk, wk), (dv, wv)):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("name", APPROX)
@pytest.mark.parametrize("causal", [False, True])
def test_backward_is_gradient_of_forward(name, causal):
    kernel = get(name)
    q, k, v = _qkv(n=96, requires_grad=True, scale=0.5)
    spec = AttentionSpec.from_tensors(q, k, v, causal=causal)
    out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), spec, 0)
    g = _like(out)
    dq, dk, dv, _, _ = kernel.backward(g, q.detach(), k.detach(), v.detach(), out, lse, spec, 0, False, False)
    eps = 1e-6
    direction = [_like(t) for t in (q, k, v)]
    plus = kernel.forward(*(t.detach() + eps * d for t, d in zip((q, k, v), direction)), spec, 0)[0]
    minus = kernel.forward(*(t.detach() - eps * d for t, d in zip((q, k, v), direction)), spec, 0)[0]
    numeric = ((plus - minus) * g).sum() / (2 * eps)
    analytic = sum((grad * d).sum() for grad, d in zip((dq, dk, dv), direction))
    assert torch.isclose(numeric, analytic, rtol=1e-2), (numeric, analytic)


def test_honest_reasons():
    q, k, v = _qkv()
    mask = torch.rand(200, 200, generator=GEN) > 0.5
    spec = AttentionSpec.from_tensors(q, k, v, mask=mask, softcap=30.0)
    assert any("dense" in r for r in get("approx_performer").not_supported_reasons(spec))
    assert any("softcap" in r for r in get("approx_performer").not_supported_reasons(spec))
    assert get("approx_local_global").not_supported_reasons(spec) == []
    cross = AttentionSpec.from_tensors(q, k[:, :, :50], v[:, :, :50])
    assert any("self-attention" in r for r in get("approx_bigbird").not_supported_reasons(cross))
    for name in APPROX:
        assert not get(name).exact


# ------------------------------------------------------------------ scaling, padding, settings
@pytest.mark.parametrize("name", ["approx_local_global", "approx_bigbird"])
@pytest.mark.parametrize("causal", [False, True])
def test_gathered_keys_per_row_do_not_grow_with_n(name, causal):
    """O(N * w): every block of queries gathers the same number of keys at N = 1k and 16k, and the cost
    model doubles (within the fixed per-call part) when N doubles."""
    kernel = get(name)
    widths = []
    for n in (1024, 16384):
        q = torch.empty(1, 2, n, 32, device="meta")
        spec = AttentionSpec.from_tensors(q, q, q, causal=causal).with_(device=torch.device("cpu"))
        sparse = kernel.layouts(spec, torch.device("cpu"))[0]
        widths.append(sparse.cols.shape[1])
        assert sparse.rows.numel() < n + sparse.rows.shape[1]
    assert widths[0] == widths[1]
    costs = []
    for n in (8192, 16384):
        q = torch.empty(1, 2, n, 32, device="meta")
        costs.append(kernel.cost(AttentionSpec.from_tensors(q, q, q).with_(device=torch.device("cpu"))))
    assert 1.8 < costs[1] / costs[0] < 2.2


def test_local_global_keeps_key_padding_and_documents_exactly():
    """The spec's own terms are evaluated on the gathered keys: with a window covering the sequence the
    kernel equals exact attention under padding and document masks."""
    q, k, v = _qkv(n=130)
    keep = torch.ones(2, 130, dtype=torch.bool)
    keep[0, 100:] = False
    docs = (torch.arange(130) >= 70).long()[None]
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=keep, q_doc=docs, kv_doc=docs)
    ref, _ = get("reference").forward(q, k, v, spec, 0)
    out, _ = LocalGlobalKernel(window=130, n_global=2).forward(q, k, v, spec, 0)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_key_padding_ignores_padded_keys(causal):
    q, k, v = _qkv(n=256, scale=0.2)
    keep = torch.ones(2, 256, dtype=torch.bool)
    keep[1, 200:] = False
    spec = AttentionSpec.from_tensors(q, k, v, causal=causal, key_padding=keep)
    assert get("approx_performer").not_supported_reasons(spec) == []
    ref, _ = get("reference").forward(q, k, v, spec, 0)
    kernel = PerformerKernel(n_features=256)
    out, _ = kernel.forward(q, k, v, spec, 0)
    assert ((out - ref).norm() / ref.norm()) < 0.05
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 200:] += 5.0
    v2[1, :, 200:] -= 3.0
    torch.testing.assert_close(kernel.forward(q, k2, v2, spec, 0)[0], out)


def test_performer_features_are_redrawn_per_call_seed_deterministically():
    q, k, v = _qkv(n=64, scale=0.5)
    spec = AttentionSpec.from_tensors(q, k, v)
    kernel = PerformerKernel(n_features=64)
    first, again, other = (kernel.forward(q, k, v, spec, s)[0] for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_performer_error_falls_with_more_features():
    q, k, v = _qkv(n=256, scale=0.5)
    spec = AttentionSpec.from_tensors(q, k, v)
    ref, _ = get("reference").forward(q, k, v, spec, 0)
    errors = [((PerformerKernel(n_features=m).forward(q, k, v, spec, 0)[0] - ref).norm() / ref.norm()).item()
              for m in (16, 256)]
    assert errors[1] < errors[0] / 2 and errors[1] < 0.25, errors


def test_settings_are_registered_under_names_that_state_them():
    from attnopt.kernels.approx_base import configured
    from attnopt.passes.plan import candidates

    kernel = configured(get("approx_local_global"), window=64, n_global=1)
    assert kernel.name == "approx_local_global[window=64,n_global=1]" and get(kernel.name) is kernel
    assert (kernel.window, kernel.n_global) == (64, 1) and kernel.family == "approx_local_global"
    assert configured(get("approx_local_global"), window=64, n_global=1) is kernel
    q, k, v = _qkv()
    names = [c.kernel for c in candidates(AttentionSpec.from_tensors(q, k, v), exact=False)]
    assert "approx_local_global" in names and kernel.name not in names  # listed once, as the family


def test_calibrated_variant_rebuilt_from_its_name():
    """A graph names an approximate kernel with its settings; a fresh registry rebuilds it from the name."""
    from attnopt.kernels import registry

    name = "approx_local_global[window=96,n_global=3]"
    registry._KERNELS.pop(name, None)
    kernel = registry.get(name)
    assert kernel.name == name and kernel.settings() == {"window": 96, "n_global": 3}
    for bad in ("approx_local_global[depth=2]", "approx_local_global[window=x]", "reference[window=4]"):
        with pytest.raises(ValueError, match="unknown attention kernel"):
            registry.get(bad)
