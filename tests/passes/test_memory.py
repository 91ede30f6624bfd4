"""The whole-graph memory model: estimates against measured CPU peaks, before and after the rewrite."""

import torch

import attnopt
from attnopt.measure import cpu_peak_bytes

from .budget_models import SharpCausal


def test_estimates_track_measured_peaks():
    model = SharpCausal().eval()
    x = torch.randn(1, 1024, 128)
    with torch.no_grad():
        optimized = attnopt.optimize(model, kernel="sdpa_cpu")
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
