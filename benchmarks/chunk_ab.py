"""The band forward with and without ``heads_per_chunk``, interleaved in one process (A/B, B/A, .. five rounds).

    python benchmarks/chunk_ab.py        # on the GPU, about a minute

For each case (bf16, causal, B*N = 16k tokens, the head counts of ``kernels.py`` and of ``forward_sweep.py``), the
measured variant as ``triton_flash`` runs it and the same with ``heads_per_chunk`` 0, each checked against the other
first; then five rounds of ``do_bench`` medians in alternating order, and the median of the rounds.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch
import triton

from attnopt.kernels import triton_flash_tma as tma
from attnopt.kernels.spec import AttentionSpec

CASES = [(64, 32, 8), (64, 16, 16), (128, 16, 16), (128, 32, 8)]  # (head dim, query heads, kv heads), N 4k, B 4


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| D | heads | variant | ms, chunked | ms, grid order | grid / chunked |")
    print("|---|---|---|---|---|---|")
    for d, hq, hkv in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(4, hq, 4096, d, generator=g, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(4, hkv, 4096, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        spec = AttentionSpec.from_tensors(q, k, v, causal=True)
        chunked = tma.measured_variant(spec)
        if chunked is None:
            raise SystemExit(f"no measured variant on this GPU (the table's is sm_{tma.MEASURED_ON[0]}0)")
        plain = dataclasses.replace(chunked, heads_per_chunk=0)
        a, b = tma.forward(q, k, v, spec, variant=chunked)[0], tma.forward(q, k, v, spec, variant=plain)[0]
        assert (a.float() - b.float()).abs().max().item() < 1e-2, "the two orders disagree"
        rounds = {chunked: [], plain: []}
        for r in range(5):
            for variant in (chunked, plain) if r % 2 == 0 else (plain, chunked):
                rounds[variant].append(triton.testing.do_bench(
                    lambda variant=variant: tma.forward(q, k, v, spec, variant=variant), warmup=10, rep=50,
                    return_mode="median"))
        c, p = statistics.median(rounds[chunked]), statistics.median(rounds[plain])
        print(f"| {d} | {hq}/{hkv} | {chunked.name} | {c:.3f} | {p:.3f} | {p / c:.3f} |", flush=True)


if __name__ == "__main__":
    main()
