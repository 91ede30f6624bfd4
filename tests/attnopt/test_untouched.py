"""A model whose every site stays as it was runs its own forward: after the first call of a kind (the arguments'
shapes, dtypes and devices, the grad mode, the training flag), calls of that kind skip the compiled forward
(``attnopt/api.py: _OptimizedForward._call_key``); any other call, and every call once a site runs a kernel,
go through it."""

from __future__ import annotations

import torch
import torch.nn as nn

import attnopt
from attnopt.passes import plan


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, 4, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        s = q @ k.transpose(-1, -2) * 8**-0.5
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], torch.finfo(s.dtype).min)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 32)


def optimized_counting(monkeypatch, replace: bool):
    monkeypatch.setattr(plan, "versus_original", lambda best, original, n=1: (replace, "decided by the test"))
    torch.manual_seed(0)
    model = Attention()
    original = Attention()
    original.load_state_dict(model.state_dict())
    optimized = attnopt.optimize(model, tune=False, keep_original=True)
    forward = optimized.forward
    compiled_calls = []
    compiled = forward.compiled
    forward.compiled = lambda *a, **k: compiled_calls.append(1) or compiled(*a, **k)
    return original, optimized, compiled_calls


def test_calls_of_a_kind_seen_run_the_models_own_forward(monkeypatch):
    original, optimized, compiled_calls = optimized_counting(monkeypatch, replace=False)
    x, mask = torch.randn(2, 16, 32), torch.rand(2, 16) > 0.3
    mask[:, 0] = True
    for _ in range(3):
        torch.testing.assert_close(optimized(x, mask), original(x, mask), atol=0, rtol=0)
    assert len(compiled_calls) == 1 and not optimized.attnopt_report.replaced
    assert optimized.attnopt_report.sites, "the site was found and left as it was"
    # another kind of call: another length, another grad mode, another dtype, a missing argument, train/eval
    with torch.no_grad():
        optimized(x, mask)
    optimized(torch.randn(2, 24, 32), torch.ones(2, 24, dtype=torch.bool))
    optimized(x)
    optimized.eval()
    optimized(x, mask)
    assert len(compiled_calls) == 5
    optimized(x, mask)
    with torch.no_grad():
        optimized.train()(x, mask)
    optimized(torch.randn(2, 24, 32), torch.ones(2, 24, dtype=torch.bool))
    assert len(compiled_calls) == 5


def test_every_call_is_compiled_once_a_site_runs_a_kernel(monkeypatch):
    original, optimized, compiled_calls = optimized_counting(monkeypatch, replace=True)
    x = torch.randn(2, 16, 32)
    for _ in range(3):
        torch.testing.assert_close(optimized(x), original(x), atol=1e-5, rtol=1e-5)
    assert len(compiled_calls) == 3 and optimized.attnopt_report.replaced


def test_a_site_replaced_later_ends_the_plain_calls(monkeypatch):
    """Kinds of call seen while every site stayed as it was go through the compiled forward again once a new
    graph replaces one."""
    original, optimized, compiled_calls = optimized_counting(monkeypatch, replace=False)
    x = torch.randn(2, 16, 32)
    optimized(x)
    optimized(x)
    assert len(compiled_calls) == 1
    monkeypatch.setattr(plan, "versus_original", lambda best, original, n=1: (True, "decided by the test"))
    optimized(torch.randn(2, 40, 32))  # a new graph (or a recompile) whose site is replaced
    assert optimized.attnopt_report.replaced
    torch.testing.assert_close(optimized(x), original(x), atol=1e-5, rtol=1e-5)
    assert len(compiled_calls) == 3


def test_calls_with_other_arguments_always_go_through_the_compiled_forward(monkeypatch):
    class WithList(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Attention()

        def forward(self, xs):
            return self.inner(xs[0])

    monkeypatch.setattr(plan, "versus_original", lambda best, original, n=1: (False, "decided by the test"))
    optimized = attnopt.optimize(WithList(), tune=False, keep_original=True)
    forward = optimized.forward
    compiled_calls = []
    compiled = forward.compiled
    forward.compiled = lambda *a, **k: compiled_calls.append(1) or compiled(*a, **k)
    x = torch.randn(2, 16, 32)
    optimized([x])
    optimized([x])
    assert len(compiled_calls) == 2
