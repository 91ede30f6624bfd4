"""Attention whose q, k, v reach the products in other dtypes: upcasts before the products, autocast.

* ``q.float() @ k.float().mT`` on half inputs (inductor's float32-softmax patterns): the op reads the
  half tensors, which the kernels accumulate in float32 as the float32 product of the same values does;
* under ``torch.autocast`` the products run in bfloat16 while q, k, v are float32 tensors (RoPE in
  float32, a bfloat16 projection for v): the op reads them cast to bfloat16, as autocast did.

Each is replaced, and as accurate as eager against a float64 evaluation of the same program.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.passes import plan


@pytest.fixture(autouse=True)
def replace_every_site(monkeypatch):
    """The planner may keep a tiny site's original code as faster: these tests are about the rewrite."""
    monkeypatch.setattr(plan, "versus_original", lambda best, original, n=1: (True, "replaced for the test"))


class Upcast(nn.Module):
    def forward(self, q, k, v):
        s = q.float() @ k.float().transpose(-1, -2) * 0.25
        return torch.softmax(s, -1).to(q.dtype) @ v


class SoftmaxInFloat32(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) * 0.25
        return F.softmax(s, dim=-1, dtype=torch.float32).type_as(v) @ v


class Autocast(nn.Module):
    """A projection under bfloat16 autocast, q scaled in float32 (as RoPE is), hand-written or SDPA."""

    def __init__(self, sdpa: bool):
        super().__init__()
        self.sdpa = sdpa
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.dtype != torch.float64):
            q, k, v = self.qkv(x).view(2, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)  # each [B, H, N, D]
            wide = torch.float64 if x.dtype == torch.float64 else torch.float32  # the float64 truth stays float64
            q = q.to(wide) * 1.5
            if self.sdpa:
                return F.scaled_dot_product_attention(q, k.to(wide), v, is_causal=True)
            s = q @ k.transpose(-1, -2) * 0.3
            keep = torch.ones(8, 8, dtype=torch.bool, device=x.device).tril()
            return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def _check(model, args, args64):
    expected = model(*args)
    truth = copy.deepcopy(model).double()(*args64).float()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    got = optimized(*args)
    sites = optimized.attnopt_report.sites
    assert len(sites) == 1 and sites[0].replaced, str(optimized.attnopt_report)
    assert got.dtype == expected.dtype
    eager_error = (expected.float() - truth).abs().max().item()
    error = (got.float() - truth).abs().max().item()
    assert error <= 2 * eager_error + 1e-3, (error, eager_error)


@pytest.mark.parametrize("model", [Upcast(), SoftmaxInFloat32()], ids=["upcast", "softmax_float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_upcast_before_the_products(model, dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16, dtype=dtype) for _ in range(3))
    _check(model, (q, k, v), tuple(t.double() for t in (q, k, v)))


@pytest.mark.parametrize("sdpa", [False, True], ids=["hand_written", "sdpa"])
def test_autocast_products_read_the_cast_inputs(sdpa):
    torch.manual_seed(0)
    model = Autocast(sdpa)
    x = torch.randn(2, 8, 16)
    _check(model, (x,), (x.double(),))


class UpcastRouter(nn.Module):
    """A mixture-of-experts router in float32 on half activations: a softmax over products, not attention."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 4, bias=False)

    def forward(self, x):
        logits = x.float() @ self.gate.weight.float().t()  # [B, N, experts]
        weights, experts = torch.softmax(logits, -1).topk(2, dim=-1)
        return weights.to(x.dtype), experts


def test_upcast_router_is_left_alone():
    model = UpcastRouter().to(torch.bfloat16)
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    expected = model(x)
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    for got, want in zip(optimized(x), expected):
        torch.testing.assert_close(got, want)
    assert not any(s.replaced for s in optimized.attnopt_report.sites), str(optimized.attnopt_report)
