"""A hand-written attention no library kernel takes as written: sliding window + ALiBi + softcap.

    python examples/custom_attention.py                  # CPU, 1024 tokens, a few seconds
    python examples/custom_attention.py --device cuda --dtype bfloat16 --length 16384 --window 1024

Each layer computes, in plain PyTorch ops,

    scores = q @ k^T / sqrt(d)                             # [B, H, N, N]
    scores = softcap * tanh(scores / softcap)              # Gemma-2's logit cap
    scores = scores + slope_h * (j - i)                    # ALiBi (BLOOM, MPT): a per-head linear distance bias
    scores = scores.masked_fill(not (i - window < j <= i), -inf)   # causal sliding window (Mistral)
    out = softmax(scores) @ v

SDPA has no softcap and materializes the window as a mask; FlashAttention and
FlexAttention can compute it only when it is rewritten for them. attnopt reads it
as written: the report lists the mask terms it proved (causal, window, bias,
softcap), notes what it recognized (the ALiBi slopes), and which kernels could
compute it and why the others could not. Random weights, nothing downloaded.
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


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8/H), 2^(-16/H), ... (Press et al., 2022)."""
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)


class WindowAlibiSoftcap(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, softcap: float):
        super().__init__()
        self.heads, self.window, self.softcap = heads, window, softcap
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def forward(self, x):  # x [B, N, C]
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in self.qkv(x).split(c, dim=-1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)  # [B, H, N, N]
        scores = self.softcap * torch.tanh(scores / self.softcap)
        pos = torch.arange(n, device=x.device)
        distance = pos[None, :] - pos[:, None]  # j - i, [N, N]
        scores = scores + self.slopes.to(scores.dtype)[:, None, None] * distance  # [B, H, N, N]
        keep = (distance <= 0) & (distance > -self.window)  # causal, and at most ``window`` keys back
        scores = scores.masked_fill(~keep, float("-inf"))
        y = F.softmax(scores, dim=-1) @ v  # [B, H, N, D]
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class Model(nn.Module):
    def __init__(self, vocab=256, dim=128, heads=4, layers=2, window=128, softcap=30.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.layers = nn.ModuleList(WindowAlibiSoftcap(dim, heads, window, softcap) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):  # ids [B, N]
        x = self.embed(ids)
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return self.head(x)


@dataclass
class Result:
    found: list[str]  # each site's attention as found ("causal+window+bias+softcap")
    mask_terms: list[tuple[str, ...]]
    notes: list[tuple[str, ...]]  # what the analysis recognized beyond the terms (the ALiBi slopes)
    replaced: int
    reasons: list[str]
    max_diff: float


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (medians)")
    add_planner_flags(parser)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = Model(layers=args.layers, window=args.window).to(device, dtype).eval()
    ids = torch.randint(0, 256, (args.batch, args.length), device=device)
    planner = planner_options(args)

    with torch.no_grad():
        original = copy.deepcopy(model)
        attnopt.optimize(model, **planner)
        expected, got = original(ids), model(ids)
        runs = compare({"as written": lambda: original(ids), "attnopt": lambda: model(ids)},
                       device=device, repeat=args.repeat)

    report = model.attnopt_report
    print(report)
    print()
    for i, site in enumerate(report.sites):
        print(f"site {i} ({site.where}): mask terms {' + '.join(site.mask_terms)}, causal={site.causal}; "
              f"{'; '.join(site.notes) or 'no notes'}")
    max_diff = (got.float() - expected.float()).abs().max().item()
    replaced = len(report.replaced)
    if replaced < len(report.sites):
        print(f"{len(report.sites) - replaced} site(s) kept as written: no kernel was faster here (see 'why'); "
              "--replace-all replaces them anyway")
    print(f"max |attnopt - original| = {max_diff:.2e}")
    print(f"forward, {args.batch} x {args.length} tokens (median of {args.repeat}):")
    for name, m in runs.items():
        print(f"  {name:<11} {m.seconds * 1e3:9.1f} ms   peak extra memory {format_bytes(m.peak_bytes):>10}")
    return Result(
        found=[s.found for s in report.sites], mask_terms=[s.mask_terms for s in report.sites],
        notes=[s.notes for s in report.sites], replaced=replaced, reasons=[s.reason for s in report.sites],
        max_diff=max_diff,
    )


if __name__ == "__main__":
    main()
