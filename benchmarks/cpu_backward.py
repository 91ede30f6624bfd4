"""``sdpa_cpu``'s backward from the saved forward against recomputing the forward under autograd (CPU).

    python benchmarks/cpu_backward.py --out benchmarks/results/cpu_backward.md

GQA 8/2 heads, D 64, float32, batch 1: for each length and mask, the gradients of both ways are compared
(max abs difference), then each is timed as medians of interleaved runs. Where no row can be empty (no
terms, causal, windows) the kernel now takes the first way; the second is what every SDPA kernel did before.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import time

import torch

from attnopt.kernels import AttentionSpec, Window, get
from attnopt.kernels import sdpa

CASES = [(1024, {"causal": True}), (2048, {"causal": True}), (1024, {}),
         (2048, {"causal": True, "window": Window(256, 0)})]


def timed(fn, runs: list[float]) -> None:
    start = time.perf_counter()
    fn()
    runs.append((time.perf_counter() - start) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    kernel = get("sdpa_cpu")
    lines = [f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; GQA 8/2, D 64, float32, batch 1; medians of {args.repeat} interleaved runs", "",
             "| N | mask | from the saved forward ms | recomputing ms | speedup | max abs diff |", "|---|---|---|---|---|---|"]
    for n, terms in CASES:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, h, n, 64, generator=g) for h in (8, 2, 2))
        spec = AttentionSpec.from_tensors(q, k, v, **terms, requires_grad=True)
        out, lse = kernel.forward(q, k, v, spec, 0)
        grad = torch.randn(out.shape, generator=g)
        saved = lambda: kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)[:3]  # noqa: E731
        recompute = lambda: sdpa.recompute_grads(kernel.attend, grad, q, k, v, spec, False, False)[:3]  # noqa: E731
        diff = max((a - b).abs().max().item() for a, b in zip(saved(), recompute()))
        runs = {"saved": [], "recompute": []}
        for _ in range(args.repeat):
            timed(saved, runs["saved"])
            timed(recompute, runs["recompute"])
        ms = {name: sorted(r)[len(r) // 2] for name, r in runs.items()}
        mask = "+".join(spec.mask_terms) or "none"
        lines.append(f"| {n} | {mask} | {ms['saved']:.1f} | {ms['recompute']:.1f} | "
                     f"{ms['recompute'] / ms['saved']:.2f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("# sdpa_cpu backward (`benchmarks/cpu_backward.py`)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
