"""Time and peak memory of a call, so users can compare an optimized model with the original.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` above what was allocated
before the call. On CPU, where the allocator keeps no statistics, the call runs
once under the PyTorch profiler with memory recording: its allocation and free
events, summed in time order, give the peak of tensor memory above the start
(the time is measured separately, without the profiler).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class Measurement:
    seconds: float  # median over the timed repeats
    peak_bytes: int  # extra tensor memory at the peak of one call


def cpu_peak_bytes(fn) -> int:
    """Peak CPU tensor memory allocated during ``fn()`` above the level at its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def measure(fn, *, device: str | torch.device = "cpu", repeat: int = 3, warmup: int = 1) -> Measurement:
    """Median seconds of ``fn()`` over ``repeat`` calls after ``warmup``, and its peak extra memory."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = cpu_peak_bytes(fn)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return Measurement(times[len(times) // 2], peak)
