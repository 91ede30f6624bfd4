"""max_mem on the GPU: a Llama-style model whose eager attention does not fit 24 GB at 32k tokens.

Part 1 checks the memory model: for several models at 2k, 8k and 32k tokens, attnopt's
estimated peak (before and after the rewrite) against the measured one: the
model's weights and inputs plus the most its call allocates above what was
allocated before (``torch.cuda.max_memory_allocated``; the eager model and the
optimized copy are both on the GPU, so each is measured without the other's
weights). Part 2 runs the 32k-token model eagerly
(expected: out of a 24 GB budget, measured with the caching allocator capped
at 24 GB) and after ``attnopt.optimize(model, max_mem="24GB")``.

The model is hand-written Llama (RMSNorm, rotary, GQA via repeat_kv, SwiGLU,
causal ``masked_fill(-inf)`` eager attention) with random bf16 weights, so the
benchmark does not depend on the HF eager-attention detection.

    python benchmarks/memory_budget.py > benchmarks/results/memory_budget.md

``--cpu`` checks the memory model on the CPU instead (float32, ``tune=False``),
at 2k and 8k tokens: the peak of tensor memory one call allocates
(``attnopt.measure.cpu_peak_bytes``) plus what is resident (weights and
inputs), for eager and for the optimized model, after its first call and on
that first call (capture and rewrite included).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.report import format_bytes

GB = 10**9


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 2 * 4 * dim // 2, bias=False)
        self.down = nn.Linear(4 * dim // 2, dim, bias=False)

    def attention(self, x, cos, sin):
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, N, D]
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, Hkv, N, D]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        group = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, group, n, self.head_dim).reshape(b, self.heads, n, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, group, n, self.head_dim).reshape(b, self.heads, n, self.head_dim)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o((p @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x, cos, sin):
        x = x + self.attention(self.norm1(x), cos, sin)
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def rotate(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Llama(nn.Module):
    def __init__(self, dim=2048, heads=16, kv_heads=4, layers=4, vocab=32000):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head_dim = dim // heads

    def forward(self, ids):
        n = ids.shape[1]
        pos = torch.arange(n, device=ids.device, dtype=torch.float32)
        freq = 10000 ** (-torch.arange(0, self.head_dim // 2, device=ids.device) / (self.head_dim // 2))
        angle = pos[:, None] * freq[None, :]
        cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)  # hidden states: the LM head would add [N, vocab] logits


def peak_of(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def cpu_main():
    from attnopt.measure import cpu_peak_bytes

    torch.manual_seed(0)
    print(f"## CPU (not GPU): estimate vs measured peak (float32, batch 1, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__})\n")
    print("| model | tokens | kernel | eager est. | eager measured | est/measured | optimized est. | "
          "optimized measured | est/measured | first call measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    cfg = dict(dim=256, heads=4, kv_heads=2, layers=2, vocab=1000)
    model = Llama(**cfg).eval()
    for n in (2048, 8192):
        ids = torch.randint(0, cfg["vocab"], (1, n))
        resident = model_bytes(model) + ids.numel() * ids.element_size()
        with torch.no_grad():
            eager = cpu_peak_bytes(lambda: model(ids)) + resident
            optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
            first = cpu_peak_bytes(lambda: optimized(ids)) + resident
            after = cpu_peak_bytes(lambda: optimized(ids)) + resident
        mems = optimized.attnopt_report.memory
        before_est, after_est = max(m.before for m in mems), max(m.after for m in mems)
        kernel = optimized.attnopt_report.sites[0].kernel if optimized.attnopt_report.sites else "-"
        print(f"| llama-{cfg['layers']}L-{cfg['dim']}d | {n} | {kernel} | {format_bytes(before_est)} | "
              f"{format_bytes(eager)} | {before_est / eager:.2f} | {format_bytes(after_est)} | {format_bytes(after)} | "
              f"{after_est / after:.2f} | {format_bytes(first)} |", flush=True)
        torch._dynamo.reset()


def main():
    torch.manual_seed(0)
    print(f"# max_mem on {torch.cuda.get_device_name()} (torch {torch.__version__})\n")
    print("## Estimate vs torch.cuda.max_memory_allocated (inference, bf16, batch 1)\n")
    print("| model | tokens | kernel | eager est. | eager measured | err | optimized est. | optimized measured | err | "
          "kept by the first call |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    configs = [("llama-2L-1024d", dict(dim=1024, heads=8, kv_heads=2, layers=2)),
               ("llama-4L-2048d", dict(dim=2048, heads=16, kv_heads=4, layers=4))]
    for label, cfg in configs:
        model = Llama(**cfg).cuda().to(torch.bfloat16).eval()
        for n in (2048, 8192, 32768):
            ids = torch.randint(0, 32000, (1, n), device="cuda")
            # each model's own weights and inputs, plus what its call allocates above everything allocated
            # before it (the other model's copy of the weights included): what the estimates count
            resident = model_bytes(model) + ids.numel() * ids.element_size()
            base = allocated()
            try:
                eager = peak_of(lambda: model(ids)) - base + resident
            except torch.OutOfMemoryError:  # the GPU's whole memory (no cap here): its estimate stands alone
                eager = None
                torch.cuda.empty_cache()
            optimized = attnopt.optimize(copy.deepcopy(model), tune=False)
            before_first = allocated()
            peak_of(lambda: optimized(ids))  # capture, plan and rewrite on the first call
            # the steady call's peak above what is allocated before it: a base taken before the first call read the
            # 2-layer model at 32k 193 MiB low, since that first call freed what an earlier row had left allocated
            base = allocated()
            kept = base - before_first  # what the first call leaves allocated (negative: it freed earlier leftovers)
            after = peak_of(lambda: optimized(ids)) - base + resident
            mems = optimized.attnopt_report.memory
            before_est, after_est = max(m.before for m in mems), max(m.after for m in mems)
            kernel = optimized.attnopt_report.sites[0].kernel if optimized.attnopt_report.sites else "-"
            measured, err = ("out of memory", "-") if eager is None else (
                format_bytes(eager), f"{(before_est - eager) / eager:+.0%}")
            print(f"| {label} | {n} | {kernel} | {format_bytes(before_est)} | {measured} | {err} | "
                  f"{format_bytes(after_est)} | {format_bytes(after)} | {(after_est - after) / after:+.0%} | "
                  f"{'-' if kept < 0 else ''}{format_bytes(abs(kept))} |")
            del optimized
            torch._dynamo.reset()
        del model
    torch.cuda.empty_cache()

    print("\n## 32k tokens under max_mem='24GB'\n")
    model = Llama(dim=2048, heads=16, kv_heads=4, layers=4).cuda().to(torch.bfloat16).eval()
    n = 32768
    ids = torch.randint(0, 32000, (1, n), device="cuda")
    scores = 16 * n * n * 2
    print(f"model {format_bytes(model_bytes(model))} of bf16 weights; one layer's eager scores "
          f"[1, 16, {n}, {n}] bf16 = {format_bytes(scores)}, float32 probabilities twice that\n")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(24 * GB / total)
    try:
        eager = f"{format_bytes(peak_of(lambda: model(ids)))} (fits?!)"
    except torch.OutOfMemoryError:
        eager = "out of memory under the 24 GB cap"
    torch.cuda.empty_cache()
    print(f"- eager: {eager}")
    optimized = attnopt.optimize(model, max_mem="24GB")
    # as in part 1: the model's weights and inputs plus what a call allocates above what was allocated before it
    resident = model_bytes(model) + ids.numel() * ids.element_size()
    base = allocated()
    first = peak_of(lambda: optimized(ids)) - base + resident  # capture, proofs, plan and rewrite: in budget too
    base = allocated()
    peak = peak_of(lambda: optimized(ids)) - base + resident
    report = optimized.attnopt_report
    est = max(m.after for m in report.memory)
    print(f"- attnopt.optimize(max_mem='24GB'): measured peak {format_bytes(peak)} ({peak / GB:.2f} GB), "
          f"estimated {format_bytes(est)}, within budget: {peak <= 24 * GB}; first call (capture and rewrite "
          f"included) {format_bytes(first)}, within budget: {first <= 24 * GB}")
    print("\n```\n" + str(report) + "\n```")


if __name__ == "__main__":
    import sys

    cpu_main() if "--cpu" in sys.argv[1:] else main()
