"""Where a replaced site's call spends its host time: the planner's own timed call (``tuning._runner``, new term
tensors each call as a model hands them over), profiled per kernel.

    python benchmarks/site_call_profile.py [--kernels sdpa_cudnn sdpa_efficient triton_flash] [--training]
                                           [--padding left|right|none] [--rows 15]

The site: causal + key padding with HF's ``finfo.min`` fill (a Llama layer given its ``attention_mask``), B 8,
12 heads, N 512, D 64, bfloat16. For each kernel: the call's median wall time (synchronized, 30 calls), its host
time with the GPU idle before it, then the profiler's table of 5 calls by self CPU time: which ops, how many.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from attnopt.kernels.spec import AttentionSpec, Fill
from attnopt.passes import tuning

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from host_cost import idle_host_and_total_us  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=["original", "sdpa_cudnn", "sdpa_efficient", "triton_flash"])
    parser.add_argument("--training", action="store_true")
    parser.add_argument("--padding", choices=["left", "right", "none"], default="right")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    b, h, n, d = 8, 12, 512, 64
    q = torch.empty(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    keep = torch.ones(b, n, dtype=torch.bool, device="cuda")
    for i in range(b):
        pad = i * n // 2 // (b - 1)
        if pad and args.padding == "left":
            keep[i, :pad] = False
        elif pad and args.padding == "right":
            keep[i, n - pad:] = False
    spec = AttentionSpec.from_tensors(q, q, q, causal=True, key_padding=keep, fill=Fill.FINITE_ADDED,
                                      requires_grad=args.training)
    original = tuning.Original("softmax")
    for name in args.kernels:
        run = tuning._runner(tuning.ORIGINAL if name == "original" else name, spec, original, padding=keep)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        host, total = idle_host_and_total_us(run, 30)
        print(f"## {name} ({'training' if args.training else 'inference'}, {args.padding} padding): "
              f"{total:.0f} us per call, host {host:.0f} us", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                run()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)


if __name__ == "__main__":
    main()
