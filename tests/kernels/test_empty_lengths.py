"""Calls with no query row or no key (Nq = 0 or Nk = 0), as a dynamic-shape model may make them: every exact
kernel that takes the call gives what the original gives, and none stops the process."""

import subprocess
import sys

import pytest
import torch

from attnopt.kernels import AttentionSpec, Fill, registry

#: the fills the original may write masked scores with (``_fill_value``: the value it writes)
FILLS = (Fill.NEG_INF, Fill.FINITE, Fill.FINITE_ADDED, Fill.SAFE)


def _fill_value(fill: Fill, dtype: torch.dtype) -> float:
    """The masked scores' value in the original: its dtype's finite minimum, or -inf."""
    return torch.finfo(dtype).min if fill in (Fill.FINITE, Fill.FINITE_ADDED) else float("-inf")


def _original(q, k, v, keep, fill: Fill):
    """The replaced model's attention: scores, key padding written with the fill, softmax, ``@ v``."""
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    masked = ~keep[:, None, None, :]
    if fill == Fill.FINITE_ADDED:
        s = s + masked.to(s.dtype) * _fill_value(fill, s.dtype)
    else:
        s = s.masked_fill(masked, _fill_value(fill, s.dtype))
    if fill == Fill.SAFE:  # SDPA's safe softmax
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    return torch.softmax(s, dim=-1) @ v


def _takes(kernel, device: str, dtype: torch.dtype) -> bool:
    """Whether ``kernel`` takes a training call like the test's on ``device`` (asked on a 1-row call)."""
    q, k, v = (torch.zeros(2, h, 1, 16, dtype=dtype, device=device) for h in (4, 2, 2))
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=torch.ones(2, 1, dtype=torch.bool, device=device),
                                      fill=Fill.NEG_INF, requires_grad=True)
    return not kernel.not_supported_reasons(spec)


def _cases(kernels):
    for nq, nk in ((5, 0), (0, 5), (0, 0)):
        for fill in FILLS:
            for name in kernels:
                yield pytest.param(name, nq, nk, fill, id=f"{name}-q{nq}-k{nk}-{fill.value}")


#: the exact kernels that train on this machine's CPU (the CUDA ones: the GPU test below)
CPU_KERNELS = [k.name for k in registry.all_kernels() if k.exact and _takes(k, "cpu", torch.float32)]


def _check(name, nq, nk, fill, device, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, nq, 16, generator=g).to(device, dtype)
    k, v = (torch.randn(2, 2, nk, 16, generator=g).to(device, dtype) for _ in range(2))
    keep = torch.ones(2, nk, dtype=torch.bool, device=device)
    spec = AttentionSpec.from_tensors(q, k, v, key_padding=keep, fill=fill, requires_grad=True)
    kernel = registry.get(name)
    if kernel.not_supported_reasons(spec):
        return False
    out, lse = kernel.forward(q, k, v, spec, 0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = _original(*leaves, keep, fill)
    assert out.shape == want.shape and not out.isnan().any()
    torch.testing.assert_close(out, want.detach(), atol=0, rtol=0)
    grad = torch.randn(want.shape, generator=g).to(device, dtype)
    got = kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)[:3]
    want_grads = torch.autograd.grad(want, leaves, grad, allow_unused=True)
    for x, w, t in zip(got, want_grads, (q, k, v)):
        assert x.shape == t.shape
        torch.testing.assert_close(x, torch.zeros_like(t) if w is None else w, atol=0, rtol=0)
    return True


@pytest.mark.parametrize("name,nq,nk,fill", list(_cases(CPU_KERNELS)))
def test_empty_lengths_give_the_originals_output_and_gradients(name, nq, nk, fill):
    assert _check(name, nq, nk, fill, "cpu", torch.float32)


#: the exact kernels that train in bfloat16 on this machine's GPU (none without one)
CUDA_KERNELS = [k.name for k in registry.all_kernels()
                if k.exact and torch.cuda.is_available() and _takes(k, "cuda", torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,nq,nk,fill", list(_cases(CUDA_KERNELS)))
def test_empty_lengths_on_cuda(name, nq, nk, fill):
    """The same on CUDA in bfloat16, for every exact kernel that trains there."""
    assert _check(name, nq, nk, fill, "cuda", torch.bfloat16)


def test_cpu_sdpa_on_empty_lengths_does_not_stop_the_process():
    """ATen's CPU flash attention divides by zero on Nq = 0 or Nk = 0 (SIGFPE): the kernel never calls it there."""
    code = ("import torch\nfrom attnopt.kernels import AttentionSpec, get\n"
            "for nq, nk in ((0, 4), (4, 0), (0, 0)):\n"
            "    q, k, v = torch.randn(1, 2, nq, 8), torch.randn(1, 2, nk, 8), torch.randn(1, 2, nk, 8)\n"
            "    spec = AttentionSpec.from_tensors(q, k, v, causal=True, requires_grad=True)\n"
            "    kernel = get('sdpa_cpu')\n"
            "    out, lse = kernel.forward(q, k, v, spec, 0)\n"
            "    kernel.infer(q, k, v, spec)\n"
            "    kernel.backward(torch.ones_like(out), q, k, v, out, lse, spec, 0, False, False)\n"
            "print('done')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "done" in result.stdout, (result.returncode, result.stderr[-2000:])
