"""PyTorch SDPA as attnopt kernels: exact where they claim to be, honest reasons where not."""

import pytest
import torch

from attnopt.kernels import AttentionSpec, Fill, Window, get

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _qkv(device="cpu", dtype=torch.float32, hkv=2, nq=64, nk=64, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, nq, 32, generator=g).to(device, dtype)
    k, v = (torch.randn(2, hkv, nk, 32, generator=g).to(device, dtype) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


TERMS = {
    "none": {},
    "causal": {"causal": True},
    "window": {"causal": True, "window": Window(8, 0)},
    "bias": {"bias": torch.randn(1, 4, 64, 64)},
    "key_padding_safe": {"key_padding": torch.tensor([64, 10]), "fill": Fill.SAFE},
}


@pytest.mark.parametrize("term", list(TERMS))
def test_cpu_matches_reference_forward_and_backward(term):
    q, k, v = _qkv(requires_grad=True)
    spec = AttentionSpec.from_tensors(q.detach(), k.detach(), v.detach(), **TERMS[term])
    kernel = get("sdpa_cpu")
    assert kernel.not_supported_reasons(spec) == []
    reference = get("reference")
    out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), spec, 0)
    ref, ref_lse = reference.forward(q.detach(), k.detach(), v.detach(), spec, 0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    grads = kernel.backward(g, q.detach(), k.detach(), v.detach(), out, lse, spec, 0, False, False)
    want = reference.backward(g, q.detach(), k.detach(), v.detach(), ref, ref_lse, spec, 0, False, False)
    for got, ref_grad in zip(grads[:3], want[:3]):
        torch.testing.assert_close(got, ref_grad, atol=1e-4, rtol=1e-4)


def test_reasons():
    q, k, v = _qkv()
    cpu = get("sdpa_cpu")
    assert any("softcap" in r for r in cpu.not_supported_reasons(AttentionSpec.from_tensors(q, k, v, softcap=20.0)))
    padded = AttentionSpec.from_tensors(q, k, v, key_padding=torch.tensor([64, 0]))  # -inf fill: NaN rows
    assert any("rows with no visible key" in r for r in cpu.not_supported_reasons(padded))
    assert cpu.not_supported_reasons(padded.with_(fill=Fill.SAFE)) == []
    # top-left causal with Nq <= Nk never empties a row: exact under any fill
    assert cpu.not_supported_reasons(AttentionSpec.from_tensors(q, k, v, causal=True)) == []
    assert any("dropout" in r for r in cpu.not_supported_reasons(AttentionSpec.from_tensors(q, k, v, dropout_p=0.1)))
    # ATen's CPU backward differs from autograd of the original on rows an added finfo.min fills entirely
    trained = AttentionSpec.from_tensors(q, k, v, bias=torch.randn(1, 4, 64, 64), requires_grad=True)
    assert any("gradients through an additive mask" in r for r in cpu.not_supported_reasons(trained))
    assert any("cuda" in r for r in get("sdpa_flash").not_supported_reasons(AttentionSpec.from_tensors(q, k, v)))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn"])
@pytest.mark.parametrize("term", ["none", "causal", "bias"])
def test_cuda_backends(name, term):
    q, k, v = _qkv("cuda", torch.bfloat16, requires_grad=True)
    terms = {t: (x.cuda().bfloat16() if isinstance(x, torch.Tensor) else x) for t, x in TERMS[term].items()}
    spec = AttentionSpec.from_tensors(q, k, v, **terms)
    kernel = get(name)
    reasons = kernel.not_supported_reasons(spec)
    if reasons:
        # a half bias is one the original added in half precision: SDPA adds it in float32
        assert term == "bias" and (name in ("sdpa_flash", "sdpa_cudnn") or any("precision" in r for r in reasons)), reasons
        return
    out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), spec, 0)
    ref, ref_lse = get("reference").forward(q.detach(), k.detach(), v.detach(), spec, 0)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
    g = torch.randn_like(out)
    grads = kernel.backward(g, q.detach(), k.detach(), v.detach(), out, lse, spec, 0, False, False)
    want = get("reference").backward(g, q.detach(), k.detach(), v.detach(), ref, ref_lse, spec, 0, False, False)
    for got, ref_grad in zip(grads[:3], want[:3]):
        torch.testing.assert_close(got.float(), ref_grad.float(), atol=6e-2, rtol=6e-2)
