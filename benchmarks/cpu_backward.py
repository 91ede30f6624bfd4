"""``sdpa_cpu``'s backward from the saved forward against recomputing the forward under autograd (CPU).

    python benchmarks/cpu_backward.py --out benchmarks/results/cpu_backward.md

GQA 8/2 heads, D 64, float32, batch 1 (2 with key padding): for each length and mask, the gradients of both
ways are compared (max abs difference), then each is timed as medians of interleaved runs. With boolean terms
only (bands, key padding, documents, boolean masks; rows without keys get their fill's gradient) the kernel
now takes the first way; the second is what every SDPA kernel did before, and still does with additive terms.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import time

import torch

from attnopt.kernels import AttentionSpec, Fill, Window, get
from attnopt.kernels import sdpa

def _left_padded(n: int) -> torch.Tensor:
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, : n // 4] = False  # the second row left-padded by a quarter: its first queries see no key
    return keep


#: (length, terms, fill); batch 2 with key padding (HF's call with its attention mask), else 1
CASES = [(1024, {"causal": True}, Fill.SAFE), (2048, {"causal": True}, Fill.SAFE), (1024, {}, Fill.SAFE),
         (2048, {"causal": True, "window": Window(256, 0)}, Fill.SAFE),
         (1024, {"causal": True, "key_padding": _left_padded(1024)}, Fill.FINITE)]


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
             f"{torch.__version__}; GQA 8/2, D 64, float32; medians of {args.repeat} interleaved runs", "",
             "| N | mask | from the saved forward ms | recomputing ms | speedup | max abs diff |", "|---|---|---|---|---|---|"]
    for n, terms, fill in CASES:
        g = torch.Generator().manual_seed(n)
        batch = 2 if "key_padding" in terms else 1
        q, k, v = (torch.randn(batch, h, n, 64, generator=g) for h in (8, 2, 2))
        spec = AttentionSpec.from_tensors(q, k, v, **terms, fill=fill, requires_grad=True)
        out, lse = kernel.forward(q, k, v, spec, 0)
        grad = torch.randn(out.shape, generator=g)
        saved = lambda: kernel.backward(grad, q, k, v, out, lse, spec, 0, False, False)[:3]  # noqa: E731
        empty = sdpa.mask_and_empty_rows(spec)[1] if spec.fill != Fill.SAFE else None

        def recompute():  # the kernel's backward before: a second forward under autograd, then the fill's gradient
            grads = sdpa.recompute_grads(kernel.attend, grad, q, k, v, spec, False, False)
            return sdpa._with_fill_grads(grads, empty, q, k, v, grad, spec, False, False)[:3]

        diff = max((a - b).abs().max().item() for a, b in zip(saved(), recompute()))
        runs = {"saved": [], "recompute": []}
        for _ in range(args.repeat):
            timed(saved, runs["saved"])
            timed(recompute, runs["recompute"])
        ms = {name: sorted(r)[len(r) // 2] for name, r in runs.items()}
        mask = ("+".join(spec.mask_terms) or "none") + (f" (batch 2, fill {fill.value})" if batch > 1 else "")
        lines.append(f"| {n} | {mask} | {ms['saved']:.1f} | {ms['recompute']:.1f} | "
                     f"{ms['recompute'] / ms['saved']:.2f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("# sdpa_cpu backward (`benchmarks/cpu_backward.py`)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
