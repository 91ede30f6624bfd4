"""The whole-graph memory model: estimates against measured CPU peaks, before and after the rewrite."""

import copy

import pytest
import torch

import attnopt
from attnopt.measure import cpu_peak_bytes

from .budget_models import SharpCausal


def test_estimates_track_measured_peaks():
    model = SharpCausal().eval()
    x = torch.randn(1, 1024, 128)
    with torch.no_grad():
        optimized = attnopt.optimize(copy.deepcopy(model), kernel="sdpa_cpu")
        optimized(x)
        (mem,) = optimized.attnopt_report.memory
        base = sum(t.numel() * t.element_size() for t in [x, *model.parameters(), *model.buffers()])
        eager = cpu_peak_bytes(lambda: model(x)) + base
        rewritten = cpu_peak_bytes(lambda: optimized(x)) + base
    assert mem.before > 3 * mem.after
    assert abs(mem.before - eager) / eager < 0.15, (mem, eager)
    assert abs(mem.after - rewritten) / rewritten < 0.3, (mem, rewritten)


def test_training_adds_saved_activations():
    model = SharpCausal()
    x = torch.randn(1, 256, 128)
    optimized = attnopt.optimize(model)
    optimized(x).sum().backward()
    (mem,) = optimized.attnopt_report.memory
    assert mem.training
    with torch.no_grad():
        inference = attnopt.optimize(model)
        inference(x)
    assert mem.after > inference.attnopt_report.memory[0].after


class _UpcastSoftmaxAttention(torch.nn.Module):
    """Eager attention with a float32 softmax of half scores, as Hugging Face models write it."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) * 0.125
        s = s + torch.full((q.shape[2], q.shape[2]), float("-inf"), dtype=q.dtype).triu(1)
        p = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return p @ v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eager_estimate_matches_the_measured_cpu_peak(dtype):
    """The liveness model, softmax's float32 copy of half scores included, equals what the allocator saw."""
    q, k, v = (torch.randn(1, 4, 512, 32, dtype=dtype) for _ in range(3))
    model = _UpcastSoftmaxAttention()
    with torch.no_grad():
        report = attnopt.explain(model, (q, k, v))
        measured = cpu_peak_bytes(lambda: model(q, k, v)) + 3 * q.numel() * q.element_size()
    assert report.memory[0].before == pytest.approx(measured, rel=0.05)
