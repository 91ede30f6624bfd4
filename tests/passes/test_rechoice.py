"""A graph with symbolic lengths chooses each site's kernel per shape bucket, not once at its first length.

dynamo compiles one graph for every sequence length after its first automatic-dynamic recompile. The plan is
made at that graph's first length; calls whose lengths fall in another bucket (powers of two, as the tuning
cache keys its measurements) choose their kernel on their first call, without a recompile.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import attnopt
from attnopt.kernels import registry

from .models import assert_same_function


class Causal(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.heads = nn.Linear(d, 3 * d), heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        i = torch.arange(n, device=x.device)
        scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(i[None, :] > i[:, None], float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


@pytest.fixture
def short_and_long(monkeypatch):
    """The cost models say ``reference`` is the faster kernel up to 64 query rows and ``sdpa_cpu`` beyond; every
    kernel's prepared inference call and training forward is recorded by name."""
    used = []
    reference, sdpa = registry.get("reference"), registry.get("sdpa_cpu")
    monkeypatch.setattr(reference, "cost", lambda spec: 1e-6 if spec.q_len <= 64 else 1.0)
    monkeypatch.setattr(sdpa, "cost", lambda spec: 1e-3)
    for kernel in (reference, sdpa):
        prepare, train = kernel.prepare, kernel.train_forward

        def recording_prepare(spec, kernel=kernel, prepare=prepare):
            run = prepare(spec)
            return lambda *args: used.append(kernel.name) or run(*args)

        def recording_train(*args, kernel=kernel, train=train, **kwargs):
            used.append(kernel.name)
            return train(*args, **kwargs)

        monkeypatch.setattr(kernel, "prepare", recording_prepare)
        monkeypatch.setattr(kernel, "train_forward", recording_train)
    return used


def test_each_bucket_chooses_its_kernel_without_a_recompile(short_and_long):
    torch.manual_seed(0)
    model = Causal()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    with torch.no_grad():
        for n in (8, 24, 40, 200, 300, 30):
            x = torch.randn(2, n, 16)
            torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)
    report = optimized.attnopt_report
    assert report.graphs == 2, str(report)  # the first length, then one symbolic graph for every other
    symbolic = [s for s in report.sites if s.graph == 1]
    assert [s.kernel for s in symbolic] == ["reference"] and "other shape buckets" in symbolic[0].reason
    # 8: the static graph; 24, 40, 30: buckets of at most 64 rows (the plan's own, then one chosen again);
    # 200 and 300: the bucket of 256 rows and the one of 512
    assert short_and_long == ["reference", "reference", "reference", "sdpa_cpu", "sdpa_cpu", "reference"]


def test_training_calls_choose_per_bucket_too(short_and_long):
    torch.manual_seed(0)
    model = Causal()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    for n in (8, 24, 200):
        assert_same_function(optimized, model, torch.randn(2, n, 16))
    assert optimized.attnopt_report.graphs == 2
    assert short_and_long[-1] == "sdpa_cpu" and short_and_long[-2] == "reference"


def test_a_memory_budget_keeps_the_fitted_plan(short_and_long):
    """Under ``max_mem`` the plan was fitted to the budget at its length: it is kept for every length."""
    torch.manual_seed(0)
    model = Causal()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False, max_mem="4GB")
    with torch.no_grad():
        for n in (8, 24, 200):
            x = torch.randn(2, n, 16)
            torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)
    assert short_and_long == ["reference"] * 3
    assert all("other shape buckets" not in s.reason for s in optimized.attnopt_report.sites)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_buckets_on_cuda_and_under_capture():
    """On CUDA each bucket's chosen kernel gives the original's output, and a call of another bucket, warmed up
    and then captured in a CUDA graph as users capture, replays correctly with its bucket's kernel."""
    torch.manual_seed(0)
    model = Causal(d=64, heads=4).cuda().half()
    optimized = attnopt.optimize(copy.deepcopy(model))
    with torch.no_grad():
        for n in (8, 24, 200, 3000):
            x = torch.randn(2, n, 64, device="cuda", dtype=torch.half)
            torch.testing.assert_close(optimized(x), model(x), atol=2e-3, rtol=2e-3)
        assert optimized.attnopt_report.graphs == 2, str(optimized.attnopt_report)
        x = torch.randn(2, 700, 64, device="cuda", dtype=torch.half)  # the bucket of 1024 rows: not met yet
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: the bucket's kernel is chosen here, outside the capture
                optimized(x)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = optimized(x)
        torch.cuda.current_stream().wait_stream(stream)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, model(x), atol=2e-3, rtol=2e-3)
        assert optimized.attnopt_report.graphs == 2


def test_nothing_is_timed_or_kept_during_a_capture(short_and_long, monkeypatch):
    """A call of a new bucket made while a CUDA graph is captured runs the planned kernel where it supports the
    call, and that stand-in is not kept: the bucket's first call outside a capture chooses."""
    import attnopt.kernels.term_cache as term_cache
    import attnopt.ops as ops
    from attnopt.passes import tuning

    torch.manual_seed(0)
    model = Causal()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    with torch.no_grad():
        for n in (8, 24):
            optimized(torch.randn(2, n, 16))
        timed = []
        monkeypatch.setattr(tuning, "measured_seconds", lambda *a, **k: timed.append(a) or pytest.fail("timed"))
        for module in (term_cache, ops):
            monkeypatch.setattr(module, "capturing", lambda: True)
        x = torch.randn(2, 200, 16)
        torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)
        for module in (term_cache, ops):
            monkeypatch.setattr(module, "capturing", lambda: False)
        torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)
    # 8 and 24: reference; 200 during the capture: the planned reference; 200 after it: its bucket's sdpa_cpu
    assert short_and_long == ["reference", "reference", "reference", "sdpa_cpu"] and not timed


@pytest.fixture
def small_and_large_batches(monkeypatch):
    """The cost models say ``reference`` is the faster kernel up to a batch of 2 and ``sdpa_cpu`` beyond; the
    kernels' prepared inference calls are recorded by name."""
    used = []
    reference, sdpa = registry.get("reference"), registry.get("sdpa_cpu")
    monkeypatch.setattr(reference, "cost", lambda spec: 1e-6 if spec.batch <= 2 else 1.0)
    monkeypatch.setattr(sdpa, "cost", lambda spec: 1e-3)
    for kernel in (reference, sdpa):
        prepare = kernel.prepare

        def recording_prepare(spec, kernel=kernel, prepare=prepare):
            run = prepare(spec)
            return lambda *args: used.append(kernel.name) or run(*args)

        monkeypatch.setattr(kernel, "prepare", recording_prepare)
    return used


def test_a_symbolic_batch_alone_chooses_per_bucket(small_and_large_batches):
    """One length, batches of 1, 2, 3 and 40: after the second, dynamo's graph has a symbolic batch and static
    lengths; a batch of 40 is not run on the kernel chosen for a batch of 2."""
    torch.manual_seed(0)
    model = Causal()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    with torch.no_grad():
        for b in (1, 2, 3, 40, 2):
            x = torch.randn(b, 24, 16)
            torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)
    report = optimized.attnopt_report
    assert report.graphs == 2, str(report)
    # 1: the static graph; 2 and 3: the symbolic graph's planned bucket (at most 2 after rounding 2; 3 rounds
    # up to 4, chosen again: sdpa_cpu); 40: the bucket of 64; 2 again: the planned kernel
    assert small_and_large_batches == ["reference", "reference", "sdpa_cpu", "sdpa_cpu", "reference"]


def test_a_training_call_in_a_new_bucket_times_the_training_path_only(short_and_long, monkeypatch):
    """The first training call of a bucket chooses its kernel for training; the inference choice of that bucket
    (another timing of every candidate) waits for an inference call."""
    from attnopt.passes import plan

    chosen = []
    choose = plan.choose
    monkeypatch.setattr(plan, "choose", lambda spec, **kw: chosen.append(spec.requires_grad) or choose(spec, **kw))
    torch.manual_seed(0)
    model = Causal()
    optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
    for n in (8, 24):
        assert_same_function(optimized, model, torch.randn(2, n, 16))
    chosen.clear()
    assert_same_function(optimized, model, torch.randn(2, 200, 16))  # a new bucket, in training
    assert chosen == [True]
    with torch.no_grad():
        x = torch.randn(2, 200, 16)
        torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)
    assert chosen == [True, False]
