"""Long context under a memory budget: too big for ``max_mem`` as written, fits after ``optimize(max_mem=...)``.

    python examples/long_context.py                      # CPU, 2048 tokens, under a minute
    python examples/long_context.py --device cuda --dtype bfloat16 --length 32768 --dim 1024 --heads 16 --layers 4

The model is a small decoder with hand-written attention: causal, with Gemma-2's
logit softcap (``softcap * tanh(scores / softcap)``), which PyTorch's SDPA cannot
compute, so the only way to run it is as written, with a ``[B, H, N, N]`` score
tensor per layer. Random weights, nothing downloaded.

1. ``max_mem`` defaults to the size of one layer's score tensor. The code as written
   needs several of them at once, so it does not fit; ``optimize(max_mem=...)``
   plans a kernel that never materializes the scores and fits, with the same output.
2. A tighter budget that no exact plan fits: ``optimize`` raises
   ``attnopt.MemoryBudgetError``, which says what would fit. With ``exact=False`` the
   planner may use an approximate kernel (Longformer-style window + global tokens,
   BigBird), each accepted for a site only when its relative error, measured on the
   example inputs of the first call, is under ``tol``; the report marks those sites
   APPROXIMATE with the error.

Approximations are accurate only where attention is local. These heads share their
query and key projection (as Reformer's do), sharpened by ``--focus``, so each token
attends mostly to itself, as local heads of trained models do. Random weights
alone (``--focus 1``) spread attention over the whole context: every approximation's
measured error is then far above ``tol``, and the planner refuses them.

On a CPU, "fits" is the planner's estimate (``passes/memory.py``: liveness over the
captured graph plus each kernel's workspace); the measured peak of tensor memory
(PyTorch profiler) is printed beside it. On CUDA the measured peak is
``torch.cuda.max_memory_allocated``. The model run as written measures above its
estimate: Python holds a variable's old value until the new one is assigned, where
the captured graph frees each tensor after its last use.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.measure import add_planner_flags, compare, planner_options
from attnopt.report import format_bytes


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, softcap: float, focus: float):
        super().__init__()
        self.heads, self.softcap, self.focus = heads, softcap, focus
        self.qk = nn.Linear(dim, dim, bias=False)  # shared query/key projection
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):  # x [B, N, C]
        b, n, c = x.shape
        d = c // self.heads
        k = self.qk(x).view(b, n, self.heads, d).transpose(1, 2)  # [B, H, N, D]
        q = k * self.focus
        v = self.v(x).view(b, n, self.heads, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # [B, H, N, N]
        scores = self.softcap * torch.tanh(scores / self.softcap)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        y = F.softmax(scores, dim=-1) @ v  # [B, H, N, D]
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class Decoder(nn.Module):
    def __init__(self, vocab=256, dim=128, heads=4, layers=2, softcap=50.0, focus=16.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.layers = nn.ModuleList(Attention(dim, heads, softcap, focus) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):  # ids [B, N]
        x = self.embed(ids)
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return self.head(self.norm(x))  # [B, N, vocab]


@dataclass
class Result:
    budget: int  # max_mem of step 1, bytes
    before: int  # estimated peak of the code as written
    after: int  # estimated peak of the exact plan under ``budget``
    exact_kernels: list[str]  # the kernel of each site under ``budget``
    max_diff: float  # max |exact plan - original|
    tight: int  # the tighter budget of step 2, bytes
    exact_error: str | None  # MemoryBudgetError's message for exact=True under ``tight`` (None: an exact plan fit)
    approx_kernels: list[str] | None  # each site's kernel with exact=False under ``tight`` (None: nothing fit)
    approx_after: int | None  # estimated peak of that plan
    site_errors: list[float | None]  # each site's measured relative error as the report gives it
    output_error: float | None  # relative L2 error of the approximate model's output against the original


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--focus", type=float, default=16.0, help="sharpness of the heads (1: random weights only)")
    parser.add_argument("--max-mem", default=None, help="step 1's budget (default: one layer's score tensor)")
    parser.add_argument("--tight-mem", default=None, help="step 2's budget (default: 0.8x step 1's exact plan)")
    parser.add_argument("--tol", type=float, default=0.05, help="relative error an approximation may have")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (medians)")
    add_planner_flags(parser, replace_all=False)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = Decoder(dim=args.dim, heads=args.heads, layers=args.layers, focus=args.focus).to(device, dtype).eval()
    ids = torch.randint(0, 256, (args.batch, args.length), device=device)
    scores_bytes = args.batch * args.heads * args.length**2 * dtype.itemsize
    budget = attnopt.parse_bytes(args.max_mem) if args.max_mem else scores_bytes
    tuning = planner_options(args)
    where = "the planner's estimate on CPU" if device.type == "cpu" else "estimated"

    with torch.no_grad():
        expected = model(ids)

        # 1. a budget the code as written does not meet; an exact plan does
        print(f"== 1. max_mem={format_bytes(budget)} (one layer's scores: {format_bytes(scores_bytes)}), exact")
        exact = attnopt.optimize(copy.deepcopy(model), max_mem=budget, **tuning)
        try:
            got = exact(ids)
        except attnopt.MemoryBudgetError as err:
            raise SystemExit(f"MemoryBudgetError: {err}\n(step 1 wants a --max-mem that an exact plan meets)") from None
        report = exact.attnopt_report
        print(report)
        (graph,) = report.memory
        max_diff = (got.float() - expected.float()).abs().max().item()
        print(f"peak memory, {where}: as written {format_bytes(graph.before)} "
              f"({'over' if graph.before > budget else 'within'} max_mem), optimized {format_bytes(graph.after)} "
              f"({'within' if graph.after <= budget else 'over'} max_mem)")
        print(f"output: max |optimized - original| = {max_diff:.2e}")

        # 2. a budget no exact plan meets: what exact=False buys
        tight = attnopt.parse_bytes(args.tight_mem) if args.tight_mem else int(0.8 * graph.after)
        print(f"\n== 2a. max_mem={format_bytes(tight)}, exact=True")
        exact_error = None
        try:
            attnopt.optimize(copy.deepcopy(model), max_mem=tight, **tuning)(ids)
            print("an exact plan fits this budget too: exact=False has nothing to add here")
        except attnopt.MemoryBudgetError as err:
            exact_error = str(err)
            print(f"MemoryBudgetError: {err}")
        print(f"\n== 2b. max_mem={format_bytes(tight)}, exact=False, tol={args.tol}")
        approx = attnopt.optimize(copy.deepcopy(model), max_mem=tight, exact=False, tol=args.tol, **tuning)
        approx_kernels = approx_after = output_error = None
        site_errors: list[float | None] = []
        try:
            approximate = approx(ids)
        except attnopt.MemoryBudgetError as err:
            approx = None
            print(f"MemoryBudgetError: {err}")
            print(f"(no approximation's measured error was under tol={args.tol}, or none fits)")
        else:
            approx_report = approx.attnopt_report
            print(approx_report)
            approx_kernels = [s.kernel if s.replaced else "original" for s in approx_report.sites]
            site_errors = [s.error for s in approx_report.sites]
            approx_after = approx_report.memory[0].after
            output_error = relative_error(approximate, expected)
            print(f"peak memory, {where}: {format_bytes(approx_after)} (max_mem {format_bytes(tight)})")
            print(f"output: relative error {output_error:.3g} against the original, "
                  f"max |difference| {(approximate.float() - expected.float()).abs().max().item():.3g}")

        # time and measured peak memory of each version
        runs = {"as written": lambda: model(ids), "exact plan": lambda: exact(ids)}
        if approx is not None:
            runs["approximate plan"] = lambda: approx(ids)
        measured = compare(runs, device=device, repeat=args.repeat)
    print(f"\n== forward, {args.batch} x {args.length} tokens (median of {args.repeat}; peak = "
          f"{'tensor memory, PyTorch profiler' if device.type == 'cpu' else 'torch.cuda.max_memory_allocated'})")
    budgets = {"exact plan": (budget, graph.after), "approximate plan": (tight, approx_after)}
    for name, m in measured.items():
        note = ""
        if name in budgets:
            limit, estimate = budgets[name]
            over = f", OVER it: the planner estimated {format_bytes(estimate)}" if m.peak_bytes > limit else ""
            note = f" (max_mem {format_bytes(limit)}{over})"
        print(f"  {name:<18} {m.seconds * 1e3:9.1f} ms   peak {format_bytes(m.peak_bytes):>10}{note}")
    return Result(
        budget=budget, before=graph.before, after=graph.after,
        exact_kernels=[s.kernel if s.replaced else "original" for s in report.sites], max_diff=max_diff,
        tight=tight, exact_error=exact_error, approx_kernels=approx_kernels, approx_after=approx_after,
        site_errors=site_errors, output_error=output_error,
    )


if __name__ == "__main__":
    main()
