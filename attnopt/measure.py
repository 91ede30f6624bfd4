"""Time and peak memory of a call, so users can compare an optimized model with the original.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` above what was allocated
before the call. On CPU, where the allocator keeps no statistics, the call runs
once under the PyTorch profiler with memory recording: its allocation and free
events, summed in time order, give the peak of tensor memory above the start
(the time is measured separately, without the profiler). The profiler's own
start/stop log lines (Kineto writes them to the process's stderr) are kept out of
the user's output.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Measurement:
    seconds: float  # median over the timed repeats
    peak_bytes: int  # extra tensor memory at the peak of one call


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null for the block: C++ code below Python writes there directly."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn) -> int:
    """Peak CPU tensor memory allocated during ``fn()`` above the level at its start."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # only the profiler's start and stop: what fn() writes still shows
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
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
    return Measurement(times[len(times) // 2] if times else math.nan, peak)


def compare(fns: dict, *, device: str | torch.device = "cpu", repeat: int = 5, warmup: int = 1,
            peak: bool = True) -> dict[str, Measurement]:
    """Each callable's median seconds over ``repeat`` interleaved rounds (a, b, a, b, ...) and its peak memory.

    Interleaving spreads a change in the machine's load over every callable
    alike, which back-to-back runs do not. ``peak=False`` skips the memory run.
    """
    device = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    peaks = dict.fromkeys(names, 0)
    if peak:
        for name in names:
            peaks[name] = measure(fns[name], device=device, repeat=0, warmup=0).peak_bytes
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeat):
        for name in names:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: Measurement(sorted(t)[len(t) // 2] if t else math.nan, peaks[name]) for name, t in times.items()}


def add_planner_flags(parser, *, replace_all: bool = True) -> None:
    """The examples' planner flags: ``--no-tune`` and (unless asked not to) ``--replace-all``."""
    parser.add_argument("--no-tune", action="store_true",
                        help="rank kernels by their cost models instead of timing them on the first call")
    if replace_all:
        parser.add_argument("--replace-all", action="store_true",
                            help="replace every site a kernel supports, even where the code as written is faster "
                                 "(keep_original=False): the kernels at work at tiny sizes")


def planner_options(args) -> dict:
    """``optimize()`` / backend options from ``add_planner_flags``'s flags. Without ``--no-tune`` the
    candidates are timed on the first call, unless ``$ATTNOPT_TUNE=0``."""
    options = {}
    if hasattr(args, "replace_all"):
        options["keep_original"] = not args.replace_all
    if args.no_tune:
        options["tune"] = False
    return options
